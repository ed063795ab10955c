"""Run the whole pipeline: prepare -> train -> evaluate -> register, on Ray, tracked in MLflow.

    python -m pipeline.run                                  # the embedded default (synthetic, CPU)
    python -m pipeline.run --config cityscapes_r101         # a preset under configs/, or a YAML file
    python -m pipeline.run model.recurrence=0 train.iterations=500     # key.sub=value overrides
    python -m pipeline.run --from train                     # rerun from a step
    python -m pipeline.run --only evaluate                  # run one step over earlier results

Completed steps are skipped on a rerun; an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import PipelineConfig, load_for_cli, presets
from .dag import STEPS, run_dag, step_keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.iterations=500 model.backbone=resnet50")
    p.add_argument("--config", default="default", help=f"a YAML file or a preset: {', '.join(presets())}")
    p.add_argument("--from", dest="start", choices=STEPS, help="rerun this step and the ones after it")
    p.add_argument("--only", choices=STEPS, help="run only this step (earlier ones must be complete)")
    return p.parse_args(argv)


def init_ray(cfg: PipelineConfig) -> None:
    """Ray, quietly: the pipeline's own lines stay readable. The driver's ``CCNET_*`` variables
    (the op's switches, fault injection) go to every worker, on a cluster too."""
    import logging

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    logging.getLogger("ray").setLevel(logging.WARNING)
    if not ray.is_initialized():
        env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
               "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints reach the driver once, not twice
               "PYTHONWARNINGS": "ignore::UserWarning"}
        env |= {k: v for k, v in os.environ.items() if k.startswith("CCNET_")}
        local = {} if cfg.ray_address else {  # a new local Ray; joining a cluster takes its settings
            "num_cpus": cfg.num_cpus, "include_dashboard": True,  # Ray Train's state queries need it
            "dashboard_host": "127.0.0.1"}
        if not cfg.ray_address and not os.environ.get("RAY_ADDRESS"):
            loopback_node()
        ray.init(address=cfg.ray_address, **local, logging_level="warning", log_to_driver=True,
                 logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
                 runtime_env={"env_vars": env})


LOCAL_NODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_node() -> None:
    """A local Ray of one machine listens on 127.0.0.1 only: its GCS, raylet, object manager,
    agents and workers bind to the node's IP address, and Ray takes 127.0.0.1 as that address
    when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0 (on Linux it otherwise takes the outward
    interface's, where another machine could connect). Ray reads the variable when it is
    imported: it is set for the processes Ray starts, and applied to this one. A value the user
    set is kept."""
    from ray._private import ray_constants

    os.environ.setdefault(LOCAL_NODE_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOCAL_NODE_VAR].lower() in ("true", "1")  # as Ray's env_bool


def absolute_run_dir(cfg: PipelineConfig) -> PipelineConfig:
    """run_dir as an absolute path, resolved once on the driver: Ray's workers run elsewhere."""
    import dataclasses
    from pathlib import Path

    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))


def preflight(cfg: PipelineConfig, uri: str) -> None:
    """Before any work: the storage root answers (written, read back, deleted), then Ray; on a
    cluster of several nodes, every location a step reads or writes must be one they all reach."""
    from . import storage

    storage.probe(storage.root(cfg))  # an unwritable storage fails now, not hours in
    if cfg.data.prepared:
        storage.probe(cfg.data.prepared, "data.prepared")
    init_ray(cfg)
    nodes = storage.cluster_nodes()  # asked once, for every check below
    storage.check_reachable(storage.root(cfg), "storage" if cfg.storage else "run_dir (the storage root)", nodes)
    if cfg.data.prepared:
        storage.check_reachable(cfg.data.prepared, "data.prepared", nodes)
    if cfg.data.root and cfg.data.source != "synthetic":
        storage.check_reachable(cfg.data.root, "data.root", nodes)
    check_tracking(uri, nodes)


def check_tracking(uri: str, nodes: tuple[int, bool]) -> None:
    """A sqlite file (or a local folder) as MLflow's backend is one node's: on a cluster the
    workers would log into a database of their own, on their own disk."""
    count, elsewhere = nodes
    if elsewhere and not uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"tracking.tracking_uri={uri!r} is one node's own database, but the Ray cluster has "
                         f"{count} node(s) and runs its tasks on other nodes than this one: start an MLflow "
                         "server on the head (see cluster.yaml) and set tracking.tracking_uri=http://<head>:5000 "
                         "(or MLFLOW_TRACKING_URI)")


def run(cfg: PipelineConfig, *, start: str | None = None, only: str | None = None) -> dict:
    """Runs the DAG for cfg; returns each step's result, and under ``_run`` the MLflow runs."""
    from .dag import attempt, check_steps, forced
    from .tracking import client, evaluation_run, tracking_uri, training_run

    check_steps(start, only)
    cfg = absolute_run_dir(cfg)
    uri = tracking_uri(cfg)
    preflight(cfg, uri)
    keys = step_keys(cfg)
    n = attempt(cfg, forced=forced("train", start, only))
    run_id = training_run(cfg, uri, keys["train"], n)
    eval_run_id = evaluation_run(cfg, uri, keys["evaluate"], run_id)
    runs = (run_id, eval_run_id)
    try:
        results = run_dag(cfg, {"uri": uri, "run_id": run_id, "eval_run_id": eval_run_id, "attempt": n},
                          start=start, only=only)
    except BaseException:
        for r in runs:
            client(uri).set_terminated(r, status="FAILED")
        raise
    for r in runs:
        client(uri).set_terminated(r, status="FINISHED")
    return {**results, "_run": {"run_id": run_id, "eval_run_id": eval_run_id, "uri": uri, "attempt": n}}


def summary(results: dict, seconds: float) -> str:
    run = results["_run"]
    lines = [f"\npipeline finished in {seconds:.0f} s"]
    if "evaluate" in results:
        ev = results["evaluate"]
        lines.append(f"  mIoU {ev['miou']:.4f} (pixel accuracy {ev['pixel_accuracy']:.4f}) on the validation split")
        lines.append(f"  evaluation: {ev['evaluation']}")
    if "train" in results:
        lines.append(f"  checkpoint: {results['train']['checkpoint']}")
    if "register" in results:
        reg = results["register"]
        note = reg.get("alias_note") or f"alias @{reg['alias']} {'moved here' if reg['alias_moved'] else 'kept'}"
        lines.append(f"  model: models:/{reg['name']}/{reg['version']} ({note})")
    for step in STEPS:
        if step in results:
            lines.append(f"  {step}: {step_outcome(step, results[step])}")
    lines.append(f"  MLflow: training run {run['run_id']}, evaluation run {run['eval_run_id']} (nested) at {run['uri']}")
    if run["uri"].startswith("sqlite:///"):
        db_dir = os.path.dirname(run["uri"][len("sqlite:///"):])
        lines.append(f"  browse: cd {db_dir} && mlflow ui --backend-store-uri {run['uri']} --host 127.0.0.1")
    return "\n".join(lines)


def step_outcome(step: str, result: dict) -> str:
    """What the step did: skipped (complete), ran, or for the training, resumed and from where."""
    if result.get("skipped"):
        return "skipped (complete)"
    if step == "train":
        how = f"resumed from the checkpoint of iteration {result['resumed_from']}" if result.get("resumed_from") \
            else "ran from iteration 0"
        return f"{how} to {result['trained_to']} (attempt {result['attempt']}, Ray Train run {result['ray_run']})"
    return "ran"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    start = time.time()
    results = run(cfg, start=args.start, only=args.only)
    print(summary(results, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
