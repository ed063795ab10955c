"""The pipeline as a DAG of Ray tasks: prepare -> train -> evaluate -> register.

Each step is a Ray task that receives the previous step's result as an ObjectRef and writes its
output under ``<root>/<step>-<key>`` on the run's storage root (``storage``, else the local
``run_dir``; see ``pipeline.storage``), the key a hash of the step's inputs and of the config it
reads. Steps hand each other locations on the root, never a node's own paths. A step whose
folder holds ``result.json`` is complete and is skipped on a rerun (unless the run starts from
it, ``start``); ``only`` runs a single step over the results of the earlier ones.

A training that starts from scratch (the first, or ``--from train``/``--from prepare``) is a new
*attempt*: a Ray Train run of its own name (``train-<key>``, then ``train-<key>-1``, ...),
recorded in the step's ``attempt.json``, so that it never resumes the checkpoints of an earlier
one, which stay under their own name. A rerun without ``--from`` resumes the recorded attempt.
"""

from __future__ import annotations

import ray

from . import storage
from .config import PipelineConfig, digest, from_dict, to_dict

STEPS = ("prepare", "train", "evaluate", "register")
RESULT = "result.json"
ATTEMPT = "attempt.json"


def step_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Each step's key: its own config and the keys of the steps it depends on."""
    d = to_dict(cfg)
    if d["model"]["gamma_init"] == 0.0:  # its value before the key existed: those runs keep their keys
        del d["model"]["gamma_init"]
    if d["model"]["fused_attention"] == "auto":  # likewise
        del d["model"]["fused_attention"]
    keys = {"prepare": digest("prepare", d["data"])}
    keys["train"] = digest("train", keys["prepare"], d["model"], d["train"], d["scaling"]["num_workers"])
    keys["evaluate"] = digest("evaluate", keys["train"], d["eval"])
    keys["register"] = digest("register", keys["evaluate"], d["tracking"])
    keys["tune"] = digest("tune", keys["prepare"], d["model"], d["train"], d["scaling"], d["tune"])
    return keys


def step_dir(cfg: PipelineConfig, step: str, key: str) -> str:
    """The step's folder on the storage root: a local path or a URI."""
    return storage.join(storage.root(cfg), f"{step}-{key}")


def completed(location: str) -> dict | None:
    return storage.read_json(storage.join(location, RESULT))


def finish(location: str, result: dict) -> dict:
    storage.write_json(storage.join(location, RESULT), result)
    return result


def stale(done: dict, upstream: dict | None) -> bool:
    """Whether a complete evaluate or register step belongs to another training attempt than
    the one upstream (``--only train`` trained a new one since)."""
    return upstream is not None and "attempt" in upstream and done.get("attempt") != upstream["attempt"]


def _step(name: str):
    """Wraps a step body: skip when complete (and not forced), else run and record."""
    def decorate(body):
        @ray.remote(num_cpus=0, max_retries=0)
        def task(cfg_dict: dict, location: str, force: bool, ctx: dict, upstream: dict | None):
            done = None if force else completed(location)
            if done is not None and stale(done, upstream):
                print(f"[{name}] complete for training attempt {done.get('attempt')}, not for attempt "
                      f"{upstream['attempt']}: running again", flush=True)
            elif done is not None:
                print(f"[{name}] complete, skipped ({location})", flush=True)
                return {**done, "skipped": True}
            if force:
                storage.delete(storage.join(location, RESULT))
            storage.make_dir(location)
            print(f"[{name}] running ({location})", flush=True)
            upstream = {k: v for k, v in upstream.items() if k != "skipped"} if upstream else upstream
            return {**finish(location, body(from_dict(cfg_dict), location, ctx, upstream)), "skipped": False}
        task.__name__ = name
        return task
    return decorate


@_step("prepare")
def prepare_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: None) -> dict:
    from data_prep.__main__ import make_source
    from data_prep.prepare import prepare

    data = cfg.data
    source, desc = make_source(data.source, root=data.root, classes=data.classes,
                               synthetic_train=data.synthetic_train, synthetic_val=data.synthetic_val,
                               synthetic_size=data.synthetic_size, synthetic_classes=data.synthetic_classes,
                               seed=data.seed)
    out = data.prepared or storage.join(d, "shards")
    manifest = prepare(source, out, source_desc=desc, splits=[data.train_split, data.val_split],
                       shard_size=data.shard_size, max_rejected=data.max_rejected, progress=False)
    counts = {s: e["samples"] for s, e in manifest["splits"].items()}
    rejected = sum(len(e["rejected"]) for e in manifest["splits"].values())
    return {"prepared": out, "samples": counts, "rejected": rejected}


def attempt(cfg: PipelineConfig, *, forced: bool) -> int:
    """The training attempt this run belongs to: the recorded one; when the training starts from
    scratch (forced), the first after it whose Ray Train run does not exist yet (a run of the
    same key from before attempts were recorded is attempt 0)."""
    from .train import storage_for

    key = step_keys(cfg)["train"]
    recorded = storage.read_json(storage.join(step_dir(cfg, "train", key), ATTEMPT))
    if not forced:
        return recorded["attempt"] if recorded else 0
    n = recorded["attempt"] + 1 if recorded else 0
    while storage.exists(storage.join(storage_for(cfg), train_run_name(key, n))):
        n += 1
    return n


def train_run_name(key: str, attempt: int) -> str:
    return f"train-{key}" + (f"-{attempt}" if attempt else "")


@_step("train")
def train_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    from data_prep.loader import load_manifest

    from .tracking import log_datasets
    from .train import best_and_latest, fit, latest_iteration, storage_for

    prepared = upstream["prepared"]
    manifest = load_manifest(prepared)  # fit's datasets check their shards' sha256 before training
    name = train_run_name(step_keys(cfg)["train"], ctx["attempt"])
    storage.write_json(storage.join(d, ATTEMPT), {"attempt": ctx["attempt"], "name": name})
    resumed_from = latest_iteration(storage_for(cfg), name)
    _log(ctx, metrics={"data_rejected": upstream["rejected"]}
         | {f"data_{s}_samples": n for s, n in upstream["samples"].items()})
    log_datasets(ctx["uri"], ctx["run_id"], prepared, manifest,
                 {"training": cfg.data.train_split, "validation": cfg.data.val_split})
    result = fit(cfg, prepared, manifest, storage=storage_for(cfg), name=name,
                 tracking_uri=ctx["uri"], run_id=ctx["run_id"])
    if result.error:
        raise result.error
    best, latest, metrics = best_and_latest(result)
    final = storage.join(d, "final_checkpoint")  # the best one, kept beside the step's result
    storage.copy_tree(best.path, final, src_fs=best.filesystem)
    return {**upstream, "checkpoint": final, "latest": storage.uri(latest.filesystem, latest.path),
            "val_miou": metrics.get("val_miou"), "iteration": metrics.get("iteration"), "attempt": ctx["attempt"],
            "ray_run": name, "resumed_from": resumed_from,
            "trained_to": (result.metrics or {}).get("iteration")}


@_step("evaluate")
def evaluate_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    from omegaconf import OmegaConf

    from .evaluate import evaluate_checkpoint

    eval_ctx = {**ctx, "run_id": ctx["eval_run_id"]}
    # written locally (and logged to MLflow from there), then copied to the step's folder
    with storage.local_copy(upstream["checkpoint"]) as checkpoint, storage.writable_dir(d) as out:
        result = evaluate_checkpoint(checkpoint, upstream["prepared"], cfg.data.val_split, cfg, out)
        metrics = {"eval_miou": result["miou"], "eval_pixel_accuracy": result["pixel_accuracy"]}
        metrics |= {f"eval_iou/{c}": v for c, v in result["iou"].items() if v is not None}
        config_path = out / "config.yaml"
        config_path.write_text(OmegaConf.to_yaml(to_dict(cfg)))
        _log(eval_ctx, metrics=metrics,
             artifacts=[(out / name, "evaluation") for name in EVALUATION_FILES if (out / name).exists()]
             + [(out / "overlays", "evaluation/overlays"), (config_path, "")])
        if (out / "attention").is_dir():
            _log(eval_ctx, artifacts=[(out / "attention", "evaluation/attention")])
    return {**upstream, "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "evaluation": d,
            "protocol": result["protocol"]}


EVALUATION_FILES = ("iou.md", "metrics.json", "confusion.png", "iou.png")


@_step("register")
def register_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    from data_prep.shards import read_manifest

    from .register import model_name_for, register_model

    manifest = read_manifest(upstream["prepared"])
    name = cfg.tracking.model_name or model_name_for(cfg.data, manifest)
    with storage.local_copy(upstream["checkpoint"]) as checkpoint:
        reg = register_model(uri=ctx["uri"], run_id=ctx["eval_run_id"], checkpoint=checkpoint, model_name=name,
                             alias=cfg.tracking.alias, miou=upstream["miou"], protocol=upstream["protocol"],
                             classes=manifest["classes"])
    return {**upstream, **reg}


def _log(ctx: dict, metrics: dict | None = None, artifacts: list | None = None) -> None:
    from .tracking import client

    c = client(ctx["uri"])
    for k, v in (metrics or {}).items():
        c.log_metric(ctx["run_id"], k, float(v))
    for path, where in artifacts or []:
        if path.is_dir():
            c.log_artifacts(ctx["run_id"], str(path), where)
        else:
            c.log_artifact(ctx["run_id"], str(path), where or None)


TASKS = {"prepare": prepare_step, "train": train_step, "evaluate": evaluate_step, "register": register_step}


def run_dag(cfg: PipelineConfig, ctx: dict, *, start: str | None = None, only: str | None = None) -> dict:
    """Chains the steps as Ray tasks; returns {step: result}. ``ctx``: the tracking URI, the
    training attempt (``attempt``) and its MLflow runs (``run_id``, ``eval_run_id``)."""
    check_steps(start, only)
    keys = step_keys(cfg)
    cfg_dict = to_dict(cfg)
    refs, upstream = {}, None
    for step in STEPS:
        directory = step_dir(cfg, step, keys[step])
        if only is not None and step != only:
            if STEPS.index(step) < STEPS.index(only):
                done = completed(directory)
                if done is None:
                    raise ValueError(f"--only {only}: the earlier step {step!r} has not completed "
                                     f"({directory}); run the pipeline first")
                upstream = done
            continue
        task = TASKS[step]
        if step == "evaluate":  # inference runs in the task itself: on a GPU when training has them
            task = task.options(num_gpus=1) if cfg.scaling.use_gpu else task.options(num_cpus=1)
        upstream = refs[step] = task.remote(cfg_dict, str(directory), forced(step, start, only), ctx, upstream)
    return dict(zip(refs, ray.get(list(refs.values()))))


def check_steps(start: str | None, only: str | None) -> None:
    for opt, value in (("--from", start), ("--only", only)):
        if value is not None and value not in STEPS:
            raise ValueError(f"{opt} {value!r}: choose one of {STEPS}")


def forced(step: str, start: str | None, only: str | None) -> bool:
    """Whether the step reruns although it may be complete: from ``start`` on, or ``only``."""
    return (start is not None and STEPS.index(step) >= STEPS.index(start)) or only == step
