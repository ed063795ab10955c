"""The pipeline as a DAG of Ray tasks: prepare -> train -> evaluate -> register.

Each step is a Ray task that receives the previous step's result as an ObjectRef and writes its
output under ``<root>/<step>-<key>`` on the run's storage root (``storage``, else the local
``run_dir``; see ``pipeline.storage``), the key a hash of the step's inputs and of the config it
reads. Steps hand each other locations on the root, never a node's own paths. A step whose
folder holds ``result.json`` is complete and is skipped on a rerun (unless the run starts from
it, ``start``); ``only`` runs a single step over the results of the earlier ones.
"""

from __future__ import annotations

import ray

from . import storage
from .config import PipelineConfig, digest, from_dict, to_dict

STEPS = ("prepare", "train", "evaluate", "register")
RESULT = "result.json"


def step_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Each step's key: its own config and the keys of the steps it depends on."""
    d = to_dict(cfg)
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


def _step(name: str):
    """Wraps a step body: skip when complete (and not forced), else run and record."""
    def decorate(body):
        @ray.remote(num_cpus=0, max_retries=0)
        def task(cfg_dict: dict, location: str, force: bool, ctx: dict, upstream: dict | None):
            if not force and (done := completed(location)) is not None:
                print(f"[{name}] complete, skipped ({location})", flush=True)
                return {**done, "skipped": True}
            if force:
                storage.delete(storage.join(location, RESULT))
            storage.make_dir(location)
            print(f"[{name}] running ({location})", flush=True)
            return {**finish(location, body(from_dict(cfg_dict), location, ctx, upstream)), "skipped": False}
        task.__name__ = name
        return task
    return decorate


@_step("prepare")
def prepare_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: None) -> dict:
    from data_prep.__main__ import source_from_args
    import argparse

    from data_prep.prepare import prepare

    data = cfg.data
    args = argparse.Namespace(source=data.source, root=data.root, classes=data.classes,
                              synthetic_train=data.synthetic_train, synthetic_val=data.synthetic_val,
                              synthetic_size=data.synthetic_size, synthetic_classes=data.synthetic_classes,
                              seed=data.seed)
    out = data.prepared or storage.join(d, "shards")
    source, desc = source_from_args(args)
    manifest = prepare(source, out, source_desc=desc, splits=[data.train_split, data.val_split],
                       shard_size=data.shard_size, max_rejected=data.max_rejected, progress=False)
    counts = {s: e["samples"] for s, e in manifest["splits"].items()}
    rejected = sum(len(e["rejected"]) for e in manifest["splits"].values())
    _log(ctx, metrics={"data_rejected": rejected} | {f"data_{s}_samples": n for s, n in counts.items()})
    return {"prepared": out, "samples": counts, "rejected": rejected}


@_step("train")
def train_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    from data_prep.loader import load_manifest

    from .train import best_and_latest, fit, storage_for

    prepared = upstream["prepared"]
    manifest = load_manifest(prepared)  # fit's datasets check their shards' sha256 before training
    result = fit(cfg, prepared, manifest, storage=storage_for(cfg), name=f"train-{step_keys(cfg)['train']}",
                 tracking_uri=ctx["uri"], run_id=ctx["run_id"])
    if result.error:
        raise result.error
    best, latest, metrics = best_and_latest(result)
    final = storage.join(d, "final_checkpoint")  # the best one, kept beside the step's result
    storage.copy_tree(best.path, final, src_fs=best.filesystem)
    return {"prepared": prepared, "checkpoint": final, "latest": storage.uri(latest.filesystem, latest.path),
            "val_miou": metrics.get("val_miou"), "iteration": metrics.get("iteration")}


@_step("evaluate")
def evaluate_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    from omegaconf import OmegaConf

    from .evaluate import evaluate_checkpoint

    # written locally (and logged to MLflow from there), then copied to the step's folder
    with storage.local_copy(upstream["checkpoint"]) as checkpoint, storage.writable_dir(d) as out:
        result = evaluate_checkpoint(checkpoint, upstream["prepared"], cfg.data.val_split, cfg, out)
        metrics = {"eval_miou": result["miou"], "eval_pixel_accuracy": result["pixel_accuracy"]}
        metrics |= {f"eval_iou/{c}": v for c, v in result["iou"].items() if v is not None}
        config_path = out / "config.yaml"
        config_path.write_text(OmegaConf.to_yaml(to_dict(cfg)))
        _log(ctx, metrics=metrics, artifacts=[(out / "iou.md", "evaluation"), (out / "confusion.png", "evaluation"),
                                              (out / "metrics.json", "evaluation"),
                                              (out / "overlays", "evaluation/overlays"),
                                              (config_path, ""), (checkpoint, "checkpoint")])
    return {**upstream, "miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"], "evaluation": d}


@_step("register")
def register_step(cfg: PipelineConfig, d: str, ctx: dict, upstream: dict) -> dict:
    import numpy as np

    from .register import register_model

    size = cfg.data.synthetic_size if cfg.data.source == "synthetic" else 64
    example = np.zeros((1, size, size, 3), np.uint8)
    with storage.local_copy(upstream["checkpoint"]) as checkpoint:
        reg = register_model(uri=ctx["uri"], run_id=ctx["run_id"], checkpoint=checkpoint,
                             model_name=cfg.tracking.model_name, alias=cfg.tracking.alias, miou=upstream["miou"],
                             input_example=example)
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
    """Chains the steps as Ray tasks; returns {step: result}."""
    for opt, value in (("--from", start), ("--only", only)):
        if value is not None and value not in STEPS:
            raise ValueError(f"{opt} {value!r}: choose one of {STEPS}")
    keys = step_keys(cfg)
    cfg_dict = to_dict(cfg)
    refs, upstream = {}, None
    for i, step in enumerate(STEPS):
        directory = step_dir(cfg, step, keys[step])
        forced = (start is not None and i >= STEPS.index(start)) or only == step
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
        upstream = refs[step] = task.remote(cfg_dict, str(directory), forced, ctx, upstream)
    return dict(zip(refs, ray.get(list(refs.values()))))
