"""Ray Tune search on one machine, and the cluster config (the cluster itself: test_cluster.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # the launcher's own merge of provider defaults + schema
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "secret" not in text.lower()
    assert "--dashboard-host=127.0.0.1" in text
    assert "0.0.0.0" not in text
    assert "python -m ops.build" in text
    types = config["available_node_types"]
    gpus = sorted(t["resources"].get("GPU", 0) for t in types.values())
    assert 1 in gpus and 8 in gpus  # a 1-GPU and an 8-GPU worker type
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in types.values())
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["idle_timeout_minutes"] > 0
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token, every node
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands",
                                                                       "worker_start_ray_commands"))
    assert any("--artifacts-destination s3://" in c for c in config["head_start_ray_commands"])


SEARCH = """
import json, sys, time
import ray
from pipeline.config import load_config
from pipeline.tune import search

cfg = load_config(None, json.loads(sys.argv[1]))
ray.init(address=cfg.ray_address)
before = ray.available_resources().get("CPU")
summary = search(cfg)
deadline = time.time() + 60  # the stopped trials' trainers give their CPUs back
while ray.available_resources().get("CPU") != before and time.time() < deadline:
    time.sleep(1)
print("SUMMARY " + json.dumps({**summary, "cpus_before": before, "cpus_after": ray.available_resources().get("CPU")},
                              default=str))
"""


def test_small_search_with_asha(ray_cluster, tmp_path):
    """2 tiny trials: ASHA stops one early; every trial is in MLflow; resources return. 15
    iterations, validated every 10: the trial that ASHA keeps reports its final result (15).
    The search's seed draws a learning rate too small to learn for the second trial, so ASHA
    stops it at the first rung, against the first.

    One trial at a time, so ASHA sees the trials in the same order on every run (with several at
    once, which trial reaches a rung first depends on timing). The search runs in a driver of its
    own, joined to the session's Ray, as ``python -m pipeline.tune ray_address=...`` does."""
    from mlflow.tracking import MlflowClient

    overrides = tiny_overrides(tmp_path) + [
        "train.iterations=15", "train.val_every=10", "tune.num_samples=2", "tune.max_concurrent=1",
        "tune.lr_min=1e-6", "tune.lr_max=0.1", "tune.recurrence=[2]",  # lr from useless to brisk: trials differ
        "tune.grace_period=1", "tune.reduction_factor=2", "tracking.model_name=ccnet_tuned",
        f"ray_address={ray_cluster}"]
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("ccnet-*"))
    proc = subprocess.run([sys.executable, "-c", SEARCH, json.dumps(overrides)], cwd=ROOT, capture_output=True,
                          text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(temp.glob("ccnet-*")) <= before  # the best trial's download is removed once registered
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    iterations = sorted(t["iteration"] for t in trials)
    assert iterations[-1] == 15 and iterations[0] < 15, iterations  # ASHA stopped at least one early
    stopped, kept = sorted(trials, key=lambda t: t["iteration"])
    assert stopped["params"]["lr"] < kept["params"]["lr"] and stopped["val_miou"] < kept["val_miou"], trials
    client = MlflowClient(summary["uri"])
    parent = client.get_run(summary["parent_run_id"])
    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(nested) == 2
    for run in nested:
        assert run.info.status == "FINISHED"  # closed, the trials ASHA stopped too
        assert {"lr", "weight_decay", "recurrence", "ohem"} <= set(run.data.params)
        assert client.get_metric_history(run.info.run_id, "loss")
    best = summary["best"]
    assert best["val_miou"] == max(t["val_miou"] for t in trials)
    assert client.get_model_version("ccnet_tuned", str(best["version"])) is not None
    assert summary["cpus_after"] == summary["cpus_before"]  # the stopped trials' trainers gave their CPUs back


def test_interrupted_search_resumes(ray_cluster, tmp_path):
    """SIGKILL ``pipeline.tune`` after its first trial finished, run it again: the search resumes
    (the finished trial is not run again, the others complete), one nested run per trial."""
    import os
    import time

    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "pipeline.tune", *tiny_overrides(tmp_path), f"ray_address={ray_cluster}",
           "train.iterations=20", "train.val_every=10", "tune.num_samples=2", "tune.max_concurrent=1",
           "tune.recurrence=[1]", "tune.grace_period=2", "tracking.model_name=ccnet_resumed"]
    log = tmp_path / "tune_1.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:  # Tune's own record of the search says a trial has finished
        assert proc.poll() is None, log.read_text()[-3000:]
        state = list((tmp_path / "runs" / "ray_storage").glob("tune-*/experiment_state-*.json"))
        if state and "TERMINATED" in state[0].read_text():
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no trial finished:\n" + log.read_text()[-3000:])
    proc.kill()
    proc.wait()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("ccnet").experiment_id],
                                "tags.`pipeline.kind` = 'tune'")[0]
    nested = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    before = {r.data.tags["tune.trial_id"]: r for r in client.search_runs([parent.info.experiment_id], nested)}
    done = [tid for tid, r in before.items() if [m.step for m in client.get_metric_history(r.info.run_id, "val_miou")]
            == [10, 20]]
    assert done, before

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming the search" in proc.stdout
    assert f"MLflow parent run {parent.info.run_id}" in proc.stdout
    after = client.search_runs([parent.info.experiment_id], nested)
    assert len(after) == 2 and len({r.data.tags["tune.trial_id"] for r in after}) == 2  # no trial twice
    assert set(before) <= {r.data.tags["tune.trial_id"] for r in after}
    for run in after:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [5, 10, 15, 20]
    finished = {r.data.tags["tune.trial_id"]: r for r in after}
    for tid in done:  # the finished trial was not trained again
        assert finished[tid].data.metrics["val_miou"] == before[tid].data.metrics["val_miou"]
        assert len(client.get_metric_history(finished[tid].info.run_id, "num_workers")) == 1
    assert client.get_registered_model("ccnet_resumed") is not None


def test_local_search_too_small_for_a_trial_is_refused():
    """A trial holds its workers' CPUs and 0.1 of its own, and its Ray Data needs a whole CPU beside
    them: on 2 CPUs a 2 x 0.5-CPU trial would wait forever for its data, so the search refuses to
    start and says what to set (the ablation preset declares 3 logical CPUs for this)."""
    from pipeline.config import load_config
    from pipeline.tune import concurrency

    cfg = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])
    with pytest.raises(ValueError, match=r"a trial needs 2.1 CPUs .* which has 2: set num_cpus=3"):
        concurrency(cfg, {"CPU": 2.0})
    assert concurrency(cfg, {"CPU": 3.0}) == 1 and concurrency(cfg, {"CPU": 8.0}) == 3
    assert concurrency(cfg, {"CPU": 6.3}) == 3  # 6.3 / 2.1, not 6.3 // 2.1 == 2.0
    # tune.max_concurrent is a ceiling, never a way past the data's CPU
    assert concurrency(load_config(None, ["tune.max_concurrent=2"]), {"CPU": 3.0}) == 1
    assert load_config("ablation").num_cpus == 3 and concurrency(load_config("ablation"), {"CPU": 3.0}) == 1


def test_ablation_grid_and_table():
    """``--config ablation``: every variant with every seed, each one's config as it says; the
    table's mean and spread are those of the trials' final mIoU."""
    import statistics

    from ray.tune.search.variant_generator import generate_variants

    from pipeline.config import load_config
    from pipeline.tune import ablation_table, apply, format_ablation, search_space

    cfg = load_config("ablation")
    points = [spec for _, spec in generate_variants(search_space(cfg))]
    assert len(points) == 12 and {(p["variant"], p["seed"]) for p in points} == {
        (v, s) for v in ("r0", "r1", "r2", "non_local") for s in (0, 1, 2)}
    trial = apply(cfg, {"variant": "non_local", "seed": 2})
    assert (trial.model.attention, trial.model.recurrence, trial.train.seed) == ("non_local", 1, 2)
    assert apply(cfg, {"variant": "r0", "seed": 1}).model.recurrence == 0
    trials = [{"params": {"variant": v, "seed": s}, "val_miou": m, "step_time_s": 0.1 * (i + 1),
               "peak_memory_gb": 1.0 + i}
              for i, (v, s, m) in enumerate([("r2", 0, 0.88), ("r2", 1, 0.73), ("r2", 2, 0.80), ("r0", 0, 0.45)])]
    trials = [trials[2], trials[0], trials[3], trials[1]]  # as trials finish: any order
    rows = {r["variant"]: r for r in ablation_table(trials)}
    assert [r["variant"] for r in ablation_table(trials)] == ["r0", "r2"]  # the paper's order
    assert abs(rows["r2"]["miou_mean"] - statistics.fmean([0.88, 0.73, 0.80])) < 1e-12
    assert abs(rows["r2"]["miou_std"] - statistics.stdev([0.88, 0.73, 0.80])) < 1e-12
    assert rows["r0"]["miou_std"] == 0.0 and rows["r2"]["seeds"] == [0, 1, 2]
    assert abs(rows["r2"]["step_time_s"] - 0.2) < 1e-12 and abs(rows["r2"]["step_time_std"] - 0.1) < 1e-12
    assert rows["r2"]["peak_memory_gb"] == 2.0 and rows["r2"]["peak_memory_std"] == 1.0
    assert rows["r0"]["step_time_std"] == rows["r0"]["peak_memory_std"] == 0.0
    assert "| r2 | 0,1,2 | 0.803 ± 0.075 | 0.880, 0.730, 0.800 | 0.200 ± 0.100 | 2.00 ± 1.00 |" in format_ablation(
        list(rows.values()))
