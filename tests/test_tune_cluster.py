"""Ray Tune search, the cluster config, and training across two Ray nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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


def test_small_search_with_asha(ray_cluster, tmp_path):
    """4 tiny trials: ASHA stops some early; every trial is in MLflow; resources return.

    One trial at a time, so ASHA sees the trials in the same order on every run (with several at
    once, which trial reaches a rung first depends on timing)."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.tune import search

    cfg = load_config(None, tiny_overrides(tmp_path) + [
        "train.iterations=40", "train.val_every=10", "tune.num_samples=4", "tune.max_concurrent=1",
        "tune.lr_min=1e-6", "tune.lr_max=0.1", "tune.recurrence=[2]",  # lr from useless to brisk: trials differ
        "tune.grace_period=1", "tune.reduction_factor=2", "tracking.model_name=ccnet_tuned"])
    before = ray.available_resources().get("CPU")
    summary = search(cfg)
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    iterations = sorted(t["iteration"] for t in trials)
    assert iterations[-1] == 40 and iterations[0] < 40, iterations  # ASHA stopped at least one early
    client = MlflowClient(summary["uri"])
    parent = client.get_run(summary["parent_run_id"])
    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(nested) == 4
    for run in nested:
        assert run.info.status == "FINISHED"  # closed, the trials ASHA stopped too
        assert {"lr", "weight_decay", "recurrence", "ohem"} <= set(run.data.params)
        assert client.get_metric_history(run.info.run_id, "loss")
    best = summary["best"]
    assert best["val_miou"] == max(t["val_miou"] for t in trials)
    assert client.get_model_version("ccnet_tuned", str(best["version"])) is not None
    # the stopped trials' trainers gave their CPUs back
    import time

    deadline = time.time() + 60
    while ray.available_resources().get("CPU") != before and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU") == before


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


MULTI_NODE = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    import socket
    with socket.socket() as s:  # the dashboard on a free port: another Ray may hold the default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": port})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    from pipeline.config import load_config
    from pipeline.run import run
    from pipeline.train import check_storage

    try:
        check_storage("/tmp/local/path")
        local_refused = None
    except ValueError as exc:
        local_refused = str(exc)
    cfg = load_config(None, json.loads(sys.argv[1]))
    results = run(cfg)
    print("RESULT " + json.dumps({"local_refused": local_refused, "uri": results["_run"]["uri"],
                                  "run_id": results["_run"]["run_id"], "train": results["train"],
                                  "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_training_across_two_nodes(tmp_path):
    """A real two-node Ray cluster on this machine; the two workers on different nodes (DDP over gloo)."""
    from mlflow.tracking import MlflowClient

    overrides = tiny_overrides(tmp_path) + ["train.iterations=20", "train.val_every=10", "scaling.num_workers=2",
                                  "scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD",
                                  f"storage=file://{tmp_path / 'shared'}", "ray_address=auto"]
    script = tmp_path / "multi_node.py"
    script.write_text(MULTI_NODE)
    proc = subprocess.run([sys.executable, str(script), json.dumps(overrides)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["nodes"] == 2
    assert "local path" in out["local_refused"] and "2 nodes" in out["local_refused"]
    client = MlflowClient(out["uri"])
    assert client.get_metric_history(out["run_id"], "num_nodes")[0].value == 2  # one worker per node
    steps = sorted(m.step for m in client.get_metric_history(out["run_id"], "loss"))
    assert steps == [5, 10, 15, 20]
    assert [m.step for m in sorted(client.get_metric_history(out["run_id"], "val_miou"), key=lambda m: m.step)] == [10, 20]
    from pipeline.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out["train"]["checkpoint"])
    assert ckpt["iteration"] in (10, 20) and ckpt["metrics"]["val_miou"] == pytest.approx(out["train"]["val_miou"])

