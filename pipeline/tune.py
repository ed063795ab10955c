"""Hyper-parameter search with Ray Tune over the pipeline's training.

    python -m pipeline.tune                                       # the default config, 8 trials
    python -m pipeline.tune --config cityscapes_r101 tune.num_samples=16 ray_address=auto \\
        storage=s3://bucket/ccnet/ray
    python -m pipeline.tune tune.recurrence=[1,2] tune.lr_min=0.005   # the space, from the config

Each trial is a Tune function that builds its own ``TorchTrainer`` (``pipeline.train.fit``, the
one ``pipeline.run`` uses) with ``TuneReportCallback``; ASHA stops weak trials early. The data
comes from the pipeline's own prepare step. MLflow gets a parent run for the search and a nested
run per trial (its parameters and metric curves); the best trial is named in the summary and its
model registered. Rerunning the same command resumes an interrupted search.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .config import PipelineConfig, from_dict, load_for_cli, presets, to_dict


def search_space(cfg: PipelineConfig) -> dict:
    from ray import tune

    t = cfg.tune
    space = {"lr": tune.loguniform(t.lr_min, t.lr_max), "weight_decay": tune.choice(t.weight_decay),
             "recurrence": tune.choice(t.recurrence), "ohem": tune.choice(t.ohem)}
    if t.crop:
        space["crop"] = tune.choice(t.crop)
    return space


def apply(cfg: PipelineConfig, params: dict) -> PipelineConfig:
    """The trial's config: the base config with the sampled values."""
    train = dataclasses.replace(cfg.train, lr=params["lr"], weight_decay=params["weight_decay"],
                                ohem=params["ohem"], crop=params.get("crop", cfg.train.crop))
    model = dataclasses.replace(cfg.model, recurrence=params["recurrence"])
    return dataclasses.replace(cfg, train=train, model=model)


def trial_run(uri: str, parent_id: str, trial_id: str, trial_name: str, cfg: PipelineConfig, params: dict) -> str:
    """The trial's nested MLflow run (reused when a resumed search restarts the trial)."""
    from mlflow.entities import Param

    from .tracking import client

    c = client(uri)
    experiment = c.get_run(parent_id).info.experiment_id
    found = c.search_runs([experiment], f"tags.`tune.trial_id` = '{trial_id}' and "
                          f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = c.create_run(experiment, run_name=trial_name,
                       tags={"mlflow.parentRunId": parent_id, "tune.trial_id": trial_id})
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()]
                + [Param("model.recurrence", str(cfg.model.recurrence)), Param("train.lr", str(cfg.train.lr))])
    return run.info.run_id


def trial(params: dict, *, base: dict, prepared: str, manifest: dict, uri: str, parent_id: str, storage: str) -> None:
    """One trial: its own TorchTrainer, reporting to Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import fit

    cfg = apply(from_dict(base), params)
    ctx = tune.get_context()
    name = f"{ctx.get_experiment_name()}-{ctx.get_trial_id()}"
    run_id = trial_run(uri, parent_id, ctx.get_trial_id(), ctx.get_trial_name(), cfg, params)
    result = fit(cfg, prepared, manifest, storage=storage, name=name, tracking_uri=uri, run_id=run_id,
                 callbacks=[TuneReportCallback()])
    if result.error:
        raise result.error


def concurrency(cfg: PipelineConfig) -> int:
    """Trials at once: ``tune.max_concurrent``; unset, every trial when joining a cluster (each
    trial's trainer asks for its workers' placement group, the demand an autoscaler answers with
    nodes, whatever the cluster holds at the start), and what fits on a local Ray's fixed CPUs
    (GPUs), leaving a CPU per trial to Ray Data."""
    import ray

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    if cfg.ray_address:
        return cfg.tune.num_samples
    total = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu:
        return max(1, int(total.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    return max(1, int(total.get("CPU", 1) // (s.num_workers * s.cpus_per_worker + 1)))


def search(cfg: PipelineConfig) -> dict:
    """Prepares the data (the pipeline's own step), runs or resumes the search, registers the best."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from data_prep.loader import load_manifest

    from .dag import run_dag, step_keys
    from .run import absolute_run_dir, preflight
    from .tracking import client, parent_run, tracking_uri
    from .storage import join
    from .train import storage_for

    cfg = absolute_run_dir(cfg)
    uri, key = tracking_uri(cfg), step_keys(cfg)["tune"]
    preflight(cfg, uri)
    parent_id = parent_run(cfg, uri, key)
    client(uri).set_tag(parent_id, "pipeline.kind", "tune")
    prepared = run_dag(cfg, {"uri": uri, "run_id": parent_id}, only="prepare")["prepare"]["prepared"]
    storage, name = storage_for(cfg), f"tune-{key}"
    trainable = tune.with_parameters(trial, base=to_dict(cfg), prepared=prepared, manifest=load_manifest(prepared),
                                     uri=uri, parent_id=parent_id, storage=storage)
    trainable = tune.with_resources(trainable, {"CPU": 0.1})  # it waits on its trainer, which asks for its own
    path = join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming the search in {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        t, n = cfg.tune, concurrency(cfg)
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric="val_miou", mode="max", num_samples=t.num_samples, max_concurrent_trials=n,
                scheduler=ASHAScheduler(time_attr="training_iteration",
                                        max_t=max(1, cfg.train.iterations // cfg.train.val_every),
                                        grace_period=t.grace_period, reduction_factor=t.reduction_factor),
                # the limit goes to the generator too: Tune cannot see the resources a trial's
                # trainer asks for, so the number of trials at once is the one limit
                search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=n)),
            # a trial whose node goes (a spot node reclaimed) starts again, its trainer from its checkpoint
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures)))
    grid = tuner.fit()
    best = grid.get_best_result(metric="val_miou", mode="max")
    summary = {"parent_run_id": parent_id, "uri": uri, "trials": [], "best": None}
    close_trial_runs(client(uri), parent_id, grid)
    for r in grid:
        summary["trials"].append({"trial_id": r.path.rstrip("/").split("/")[-1], "params": r.config,
                                  "val_miou": (r.metrics or {}).get("val_miou"),
                                  "iteration": (r.metrics or {}).get("iteration"),
                                  "error": None if r.error is None else str(r.error).splitlines()[0]})
    if best is not None and best.metrics and best.metrics.get("checkpoint_path"):
        summary["best"] = register_best(cfg, best, uri, parent_id)
    client(uri).set_terminated(parent_id, status="FINISHED")
    return summary


def close_trial_runs(c, parent_id: str, grid) -> None:
    """Marks each nested run FINISHED or FAILED. Tune itself ends a trial that ASHA stops or that
    reaches max_t, before the trial function returns, so the driver closes the runs."""
    errors = {(r.metrics or {}).get("trial_id"): r.error for r in grid}
    for run in c.search_runs([c.get_run(parent_id).info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        trial_id = run.data.tags.get("tune.trial_id")
        ok = trial_id in errors and errors[trial_id] is None
        c.set_terminated(run.info.run_id, status="FINISHED" if ok else "FAILED")


def register_best(cfg: PipelineConfig, best, uri: str, parent_id: str) -> dict:
    import tempfile

    import numpy as np
    import ray.train

    from .register import register_model

    from data_prep.shards import resolve

    from .train import storage_for

    local = tempfile.mkdtemp(prefix="ccnet-best-")
    fs, _ = resolve(storage_for(cfg))  # the trainer reports the path bare, on the search's storage
    ray.train.Checkpoint(best.metrics["checkpoint_path"], filesystem=fs).to_directory(local)
    from .tracking import client

    client(uri).log_metric(parent_id, "best_val_miou", best.metrics["val_miou"])
    size = cfg.data.synthetic_size if cfg.data.source == "synthetic" else 64
    reg = register_model(uri=uri, run_id=parent_id, checkpoint=local, model_name=cfg.tracking.model_name,
                         alias=cfg.tracking.alias, miou=best.metrics["val_miou"],
                         input_example=np.zeros((1, size, size, 3), np.uint8))
    return {"params": best.config, "val_miou": best.metrics["val_miou"], **reg}


def format_summary(summary: dict, seconds: float) -> str:
    lines = [f"\nsearch finished in {seconds:.0f} s: {len(summary['trials'])} trials",
             "| trial | lr | weight decay | R | OHEM | val mIoU | iterations |", "|---|---|---|---|---|---|---|"]
    for t in sorted(summary["trials"], key=lambda t: -(t["val_miou"] or -1)):
        p = t["params"]
        lines.append(f"| {t['trial_id']} | {p['lr']:.4g} | {p['weight_decay']:g} | {p['recurrence']} | {p['ohem']} | "
                     f"{'-' if t['val_miou'] is None else format(t['val_miou'], '.4f')} | {t['iteration']} |")
    if summary["best"]:
        b = summary["best"]
        lines.append(f"best: val mIoU {b['val_miou']:.4f} with {b['params']}; registered as "
                     f"models:/{b['name']}/{b['version']}" + (f" (@{b['alias']})" if b["alias_moved"] else ""))
    lines.append(f"MLflow parent run {summary['parent_run_id']} at {summary['uri']} (one nested run per trial)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (tune.* for the space)")
    p.add_argument("--config", default="default", help=f"a YAML file or a preset: {', '.join(presets())}")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.config, args.overrides)
    if cfg is None:
        return 2
    start = time.time()
    print(format_summary(search(cfg), time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
