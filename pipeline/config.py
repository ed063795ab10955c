"""The pipeline's configuration: typed dataclasses, YAML presets, ``key.sub=value`` overrides.

    cfg = load_config("configs/cityscapes_r101.yaml", ["train.iterations=1000", "model.recurrence=1"])

OmegaConf's structured configs check every key and type against the dataclasses when the
preset and the overrides are merged, so an unknown key or a wrong type stops the run before
any Ray work, with a message naming it. Inside Ray workers the config travels as a plain dict
(``to_dict``) and becomes the dataclass again on the first line (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclasses.dataclass
class DataConfig:
    source: str = "synthetic"  # cityscapes | ade20k | voc | folder | synthetic
    root: str | None = None  # raw dataset root (not for synthetic)
    prepared: str | None = None  # shard directory or URI; default: under the run directory
    classes: str | None = None  # folder source: class list file
    shard_size: int = 64
    max_rejected: float | None = None
    train_split: str = "train"
    val_split: str = "val"
    synthetic_train: int = 256
    synthetic_val: int = 64
    synthetic_size: int = 96
    synthetic_classes: int = 5
    seed: int = 0


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "tiny"
    recurrence: int = 2
    share_weights: bool = True
    attention: str = "cca"  # cca | non_local
    attention_impl: str = "compiled"  # compiled (C++/CUDA kernels; training stops if they cannot build) | reference
    # the op's fused mode, which never stores the attention map: auto (by size, ops.fused_by_default,
    # with the compiled implementation) | always | never
    fused_attention: str = "auto"
    aux: bool = True
    head_channels: int | None = None
    pretrained: str | None = None  # backbone weights file, or "hub"
    # the attention's initial residual scale. 1 here; 0 is the paper's code (the dataset presets
    # keep it), which starts the attention as the identity and on the synthetic default left one
    # pass at the level of no attention in 2 seeds of 3, and a non-local block in all 3
    # (README, "The ablation")
    gamma_init: float = 1.0


@dataclasses.dataclass
class TrainConfig:
    iterations: int = 2000
    batch_size: int = 8  # per worker
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    crop: int = 96
    scale_min: float = 1.0
    scale_max: float = 1.0
    flip: bool = False
    jitter: bool = False
    aux_weight: float = 0.4
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    sync_bn: bool = False
    amp: str = "none"  # none | bf16 (GPU or CPU) | fp16 (GPU only, with a gradient scaler)
    val_every: int = 500
    log_every: int = 50
    seed: int = 0
    max_failures: int = 2  # restarts from the latest checkpoint after a worker error
    nonfinite: str = "stop"  # a NaN/inf loss: stop (keeping the last good checkpoint) | skip the step
    max_skipped_steps: int = 10  # nonfinite=skip: stop after more skipped steps than this


@dataclasses.dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray placement groups)


@dataclasses.dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop: int = 769
    stride: int = 513
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    overlays: int = 4  # validation images drawn with their predictions
    attention_maps: int = 2  # validation images whose attention of one object pixel is drawn, pass by pass
    amp: str | None = None  # inference precision: none | bf16 | fp16; None: train.amp on CUDA, none on CPU
    batch_size: int = 4  # images per forward in evaluation and prediction


@dataclasses.dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "ccnet"
    model_name: str | None = None  # registered model; default: the task's (ccnet-cityscapes, ccnet-synthetic-5)
    alias: str = "champion"
    system_metrics_every: float = 10.0  # seconds between MLflow's system metric samples in training; 0: none


@dataclasses.dataclass
class TuneConfig:
    """The search of ``python -m pipeline.tune``: a space over the training config, ASHA, trials."""

    num_samples: int = 8
    # the only limit on trials at once; default: every trial on a cluster (each trial's trainer asks
    # for its workers, and an autoscaler adds nodes for them), what the CPUs/GPUs fit on a local Ray
    max_concurrent: int | None = None
    lr_min: float = 1e-3  # lr: log-uniform in [lr_min, lr_max]
    lr_max: float = 5e-2
    weight_decay: list[float] = field(default_factory=lambda: [1e-4, 5e-4])
    recurrence: list[int] = field(default_factory=lambda: [1, 2, 3])
    ohem: list[bool] = field(default_factory=lambda: [False, True])
    crop: list[int] = field(default_factory=list)  # empty: train.crop for every trial
    # the ablation instead of a search (configs/ablation.yaml): a grid of these variants (r0, r1, r2,
    # r3: criss-cross with R passes; non_local: one dense non-local block) times tune.seeds, no early stop
    variants: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    grace_period: int = 1  # ASHA: validations before a trial may be stopped
    reduction_factor: int = 2
    seed: int = 0


@dataclasses.dataclass
class PipelineConfig:
    name: str = "default"
    run_dir: str = "runs"  # the storage root on one machine, when storage is not set
    # the storage root of every step's output (shards, results, checkpoints, evaluation): a URI
    # every node reaches on a cluster (s3://bucket/prefix, gs://..., file:///shared/mount)
    storage: str | None = None
    ray_address: str | None = None  # None: start Ray locally; "auto": join a cluster
    num_cpus: int | None = None  # for a local Ray
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


CHOICES = {
    "data.source": ("cityscapes", "ade20k", "voc", "folder", "synthetic"),
    "model.attention": ("cca", "non_local"),
    "model.attention_impl": ("compiled", "reference"),
    "model.fused_attention": ("auto", "always", "never"),
    "train.amp": ("none", "bf16", "fp16"),
    "eval.amp": (None, "none", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "eval.mode": ("whole", "slide"),
    "scaling.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def _check(cfg: PipelineConfig) -> None:
    from ccnet.backbone import BACKBONES

    flat = flatten(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r}: choose one of {allowed}")
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: choose one of {sorted(BACKBONES)}")
    positive = ["train.iterations", "train.batch_size", "train.crop", "train.val_every", "train.log_every",
                "scaling.num_workers", "data.shard_size", "eval.batch_size"]
    for key in positive:
        if flat[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {flat[key]}")
    if cfg.model.fused_attention == "always" and cfg.model.attention != "cca":
        raise ConfigError("model.fused_attention=always applies to the criss-cross attention (model.attention=cca), "
                          f"not {cfg.model.attention!r}")
    if cfg.model.recurrence < 0:
        raise ConfigError(f"model.recurrence must be >= 0, got {cfg.model.recurrence}")
    if not 0 < cfg.train.scale_min <= cfg.train.scale_max:
        raise ConfigError("train.scale_min and train.scale_max must satisfy 0 < min <= max")
    if cfg.data.source != "synthetic" and not cfg.data.root and not cfg.data.prepared:
        raise ConfigError(f"data.root is required for data.source={cfg.data.source!r}")
    if not 0 < cfg.tune.lr_min <= cfg.tune.lr_max:
        raise ConfigError("tune.lr_min and tune.lr_max must satisfy 0 < min <= max")
    unknown = [v for v in cfg.tune.variants if v not in ("r0", "r1", "r2", "r3", "non_local")]
    if unknown:
        raise ConfigError(f"tune.variants: unknown {unknown}; choose from r0, r1, r2, r3, non_local")
    if cfg.tune.variants and not cfg.tune.seeds:
        raise ConfigError("tune.seeds must list at least one seed for the ablation")
    for key in ("weight_decay", "recurrence", "ohem"):
        if not getattr(cfg.tune, key):
            raise ConfigError(f"tune.{key} must list at least one value")
    if cfg.train.amp == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError("train.amp='fp16' needs scaling.use_gpu=true (float16 training needs a CUDA gradient "
                          "scaler); on CPU use train.amp=bf16")
    if cfg.train.sync_bn and not cfg.scaling.use_gpu:
        raise ConfigError("train.sync_bn=true needs scaling.use_gpu=true: SyncBatchNorm runs on CUDA only "
                          "(PyTorch has no CPU kernels for it); on CPU workers set train.sync_bn=false")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The default config, updated by the preset at path (a file, or a name under configs/) and
    by ``key.sub=value`` overrides; raises ConfigError naming any bad key or value."""
    try:
        merged = OmegaConf.structured(PipelineConfig)
        if path is not None:
            p = Path(path)
            if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
                p = CONFIG_DIR / f"{path}.yaml"
            if not p.is_file():
                raise ConfigError(f"config file {path} not found (presets: {presets()})")
            merged = OmegaConf.merge(merged, OmegaConf.load(p))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    _check(cfg)
    return cfg


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown key {key!r}: {msg}"
    return f"{key}: {msg}" if key else msg


def load_for_cli(path: str | Path | None, overrides: list[str]) -> PipelineConfig | None:
    """load_config for an entry point: None, after printing what is wrong, for a bad config."""
    import sys

    try:
        return load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def to_dict(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> PipelineConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PipelineConfig), d))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts: the key of a step's output directory."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
