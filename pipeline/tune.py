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
import math
import sys
import time

from .config import ConfigError, PipelineConfig, from_dict, load_for_cli, presets, to_dict

TRIAL_CPUS = 0.1  # a trial's own reservation: it only waits on its trainer, which asks for its workers

# the ablation's variants (``tune.variants``): the head's attention and its recurrence
VARIANTS = {"r0": {"recurrence": 0, "attention": "cca"}, "r1": {"recurrence": 1, "attention": "cca"},
            "r2": {"recurrence": 2, "attention": "cca"}, "r3": {"recurrence": 3, "attention": "cca"},
            "non_local": {"recurrence": 1, "attention": "non_local"}}


def search_space(cfg: PipelineConfig) -> dict:
    from ray import tune

    t = cfg.tune
    if t.variants:  # the ablation: every variant with every seed, the rest of the config as it is
        return {"variant": tune.grid_search(list(t.variants)), "seed": tune.grid_search(list(t.seeds))}
    space = {"lr": tune.loguniform(t.lr_min, t.lr_max), "weight_decay": tune.choice(t.weight_decay),
             "recurrence": tune.choice(t.recurrence), "ohem": tune.choice(t.ohem)}
    if t.crop:
        space["crop"] = tune.choice(t.crop)
    return space


def apply(cfg: PipelineConfig, params: dict) -> PipelineConfig:
    """The trial's config: the base config with the sampled values."""
    if "variant" in params:
        v = VARIANTS[params["variant"]]
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **v),
                                   train=dataclasses.replace(cfg.train, seed=int(params["seed"])))
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
                + [Param("model.recurrence", str(cfg.model.recurrence)), Param("model.attention", cfg.model.attention),
                   Param("train.lr", str(cfg.train.lr)), Param("train.seed", str(cfg.train.seed))])
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


def concurrency(cfg: PipelineConfig, total: dict[str, float] | None = None) -> int:
    """Trials at once: ``tune.max_concurrent`` (on a local Ray, at most what fits); unset, every
    trial when joining a cluster (each trial's trainer asks for its workers' placement group, the
    demand an autoscaler answers with nodes, whatever the cluster holds at the start), and what
    fits on a local Ray's fixed CPUs (GPUs), leaving a whole CPU per trial to Ray Data; a local Ray
    too small for one trial is an error that says so (a trial that cannot get its data would wait
    forever)."""
    import ray

    if cfg.ray_address:
        return cfg.tune.max_concurrent or cfg.tune.num_samples
    total = ray.cluster_resources() if total is None else total  # the local Ray's logical resources
    s = cfg.scaling
    trial = s.num_workers * s.cpus_per_worker + TRIAL_CPUS + 1  # workers, the trial itself, Ray Data
    if total.get("CPU", 0) < trial:
        # Ray Data needs a whole free CPU beside a trial's reservations, or the trial's fit waits forever
        raise ConfigError(
            f"a trial needs {trial:g} CPUs on this local Ray ({s.num_workers} workers x {s.cpus_per_worker:g}, "
            f"{TRIAL_CPUS:g} for the trial itself and 1 for Ray Data), which has {total.get('CPU', 0):g}: set "
            f"num_cpus={math.ceil(trial)} (Ray's logical CPUs may exceed the cores), or lower "
            "scaling.num_workers or scaling.cpus_per_worker")
    fit = max(1, math.floor(total.get("CPU", 0) / trial + 1e-9))  # trials whose data still gets a CPU
    if s.use_gpu:
        fit = min(fit, max(1, math.floor(total.get("GPU", 0) / (s.num_workers * s.gpus_per_worker) + 1e-9)))
    return min(cfg.tune.max_concurrent, fit) if cfg.tune.max_concurrent else fit


def validations(cfg: PipelineConfig) -> int:
    """The results a trial reports: one every train.val_every iterations, and one at the end
    (ASHA's max_t: a trial is never stopped before its final result)."""
    return math.ceil(cfg.train.iterations / cfg.train.val_every)


def search(cfg: PipelineConfig) -> dict:
    """Prepares the data (the pipeline's own step), runs or resumes the search, registers the best."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from data_prep.loader import load_manifest

    from .dag import run_dag, step_keys
    from .run import absolute_run_dir, preflight
    from .storage import join
    from .tracking import client, parent_run, tracking_uri
    from .train import storage_for

    cfg = absolute_run_dir(cfg)
    uri, key = tracking_uri(cfg), step_keys(cfg)["tune"]
    preflight(cfg, uri)
    n = concurrency(cfg)  # a local Ray too small for one trial stops here, before any run is opened
    parent_id = parent_run(cfg, uri, key)
    client(uri).set_tag(parent_id, "pipeline.kind", "tune")
    prepared = run_dag(cfg, {"uri": uri, "run_id": parent_id}, only="prepare")["prepare"]["prepared"]
    storage, name = storage_for(cfg), f"tune-{key}"
    trainable = tune.with_parameters(trial, base=to_dict(cfg), prepared=prepared, manifest=load_manifest(prepared),
                                     uri=uri, parent_id=parent_id, storage=storage)
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPUS})
    path = join(storage, name)
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming the search in {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        t = cfg.tune
        # the ablation trains every trial to the end (no early stopping), once per grid point
        scheduler = None if t.variants else ASHAScheduler(time_attr="training_iteration", max_t=validations(cfg),
                                                          grace_period=t.grace_period,
                                                          reduction_factor=t.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric="val_miou", mode="max", num_samples=1 if t.variants else t.num_samples,
                max_concurrent_trials=n, scheduler=scheduler,
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
                                  "step_time_s": (r.metrics or {}).get("step_time_s"),
                                  "peak_memory_gb": (r.metrics or {}).get("peak_memory_gb"),
                                  "error": None if r.error is None else str(r.error).splitlines()[0]})
    if cfg.tune.variants:  # an ablation compares variants; it registers none of them
        summary["ablation"] = ablation_table(summary["trials"])
        log_ablation(client(uri), parent_id, summary["ablation"])
    elif best is not None and best.metrics and best.metrics.get("checkpoint_path"):
        summary["best"] = register_best(cfg, best, uri, parent_id, prepared)
    client(uri).set_terminated(parent_id, status="FINISHED")
    return summary


def ablation_table(trials: list[dict]) -> list[dict]:
    """Per variant, over its seeds: the mean and sample standard deviation of the final val mIoU,
    of the seconds per iteration and of the peak memory; in VARIANTS' order."""
    import statistics

    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else 0.0 if values else None

    rows = []
    for variant in [v for v in VARIANTS if any(t["params"].get("variant") == v for t in trials)]:
        runs = sorted((t for t in trials if t["params"].get("variant") == variant and t["val_miou"] is not None),
                      key=lambda t: int(t["params"]["seed"]))  # "per seed" in the seeds' order
        mious = [t["val_miou"] for t in runs]
        times = [t["step_time_s"] for t in runs if t.get("step_time_s") is not None]
        memory = [t["peak_memory_gb"] for t in runs if t.get("peak_memory_gb") is not None]
        rows.append({"variant": variant, "seeds": [int(t["params"]["seed"]) for t in runs],
                     "miou_mean": statistics.fmean(mious) if mious else None, "miou_std": spread(mious),
                     "mious": mious, "step_time_s": statistics.fmean(times) if times else None,
                     "step_time_std": spread(times),
                     "peak_memory_gb": statistics.fmean(memory) if memory else None,
                     "peak_memory_std": spread(memory)})
    return rows


def format_ablation(rows: list[dict]) -> str:
    lines = ["| variant | seeds | val mIoU (mean ± std) | per seed | s / iteration (mean ± std) "
             "| peak memory GB (mean ± std) |", "|---|---|---|---|---|---|"]

    def cell(mean: float | None, std: float | None, digits: int) -> str:
        return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    for r in rows:
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {cell(r['miou_mean'], r['miou_std'], 3)} | "
                     f"{', '.join(f'{m:.3f}' for m in r['mious'])} | {cell(r['step_time_s'], r['step_time_std'], 3)} | "
                     f"{cell(r['peak_memory_gb'], r['peak_memory_std'], 2)} |")
    return "\n".join(lines)


def log_ablation(c, parent_id: str, rows: list[dict]) -> None:
    """The table on the search's parent run: ``ablation.md``, and per variant its metrics."""
    import tempfile
    from pathlib import Path

    for r in rows:
        for key in ("miou_mean", "miou_std", "step_time_s", "step_time_std", "peak_memory_gb", "peak_memory_std"):
            if r[key] is not None:
                c.log_metric(parent_id, f"ablation/{r['variant']}/{key}", float(r[key]))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ablation.md"
        path.write_text(format_ablation(rows) + "\n")
        c.log_artifact(parent_id, str(path))


def close_trial_runs(c, parent_id: str, grid) -> None:
    """Marks each nested run FINISHED or FAILED. Tune itself ends a trial that ASHA stops or that
    reaches max_t, before the trial function returns, so the driver closes the runs."""
    errors = {(r.metrics or {}).get("trial_id"): r.error for r in grid}
    for run in c.search_runs([c.get_run(parent_id).info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        trial_id = run.data.tags.get("tune.trial_id")
        ok = trial_id in errors and errors[trial_id] is None
        c.set_terminated(run.info.run_id, status="FINISHED" if ok else "FAILED")


def register_best(cfg: PipelineConfig, best, uri: str, parent_id: str, prepared: str) -> dict:
    """Registers the best trial's last checkpoint; its score is the training's validation
    (whole images, the protocol says so)."""
    import tempfile

    import ray.train

    from data_prep.shards import read_manifest, resolve

    from .evaluate import eval_precision, protocol
    from .register import model_name_for, register_model
    from .tracking import client
    from .train import storage_for

    fs, _ = resolve(storage_for(cfg))  # the trainer reports the path bare, on the search's storage
    client(uri).log_metric(parent_id, "best_val_miou", best.metrics["val_miou"])
    manifest = read_manifest(prepared)
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    with tempfile.TemporaryDirectory(prefix="ccnet-best-") as local:  # the model's files are logged from it
        ray.train.Checkpoint(best.metrics["checkpoint_path"], filesystem=fs).to_directory(local)
        reg = register_model(uri=uri, run_id=parent_id, checkpoint=local,
                             model_name=cfg.tracking.model_name or model_name_for(cfg.data, manifest),
                             alias=cfg.tracking.alias, miou=best.metrics["val_miou"],
                             protocol=protocol(cfg, manifest, cfg.data.val_split, eval_precision(cfg, device),
                                               "whole"),
                             classes=manifest["classes"])
    return {"params": best.config, "val_miou": best.metrics["val_miou"], **reg}


def format_summary(summary: dict, seconds: float) -> str:
    if summary.get("ablation") is not None:
        return (f"\nablation finished in {seconds:.0f} s: {len(summary['trials'])} trials\n"
                + format_ablation(summary["ablation"])
                + f"\nMLflow parent run {summary['parent_run_id']} at {summary['uri']} (one nested run per trial)")
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
    try:
        summary = search(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
