"""The cluster path, on one machine whose Ray nodes share no disk (``local_cluster``): a job
submitted with ``ray job submit --working-dir``, every step's output on S3, MLflow as a server
with its artifacts on S3, a worker node lost mid-training, a rerun that skips every step, the
registered model served from another node, and two Tune trials at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import tiny_overrides
from local_cluster import BUCKET, LocalCluster, namespaces_refused, wait_until

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "pipeline"  # the run's storage root: s3://ccnet/pipeline
# each test starts processes with timeouts of their own; the first one also starts the cluster
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def cluster():
    if reason := namespaces_refused():
        pytest.skip(reason)
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def overrides(c: LocalCluster, extra: list[str]) -> list[str]:
    """The tiny pipeline, its storage root on S3, its metrics on the head's MLflow server; 2
    workers of half a CPU, one per worker node."""
    return tiny_overrides(c.base / "driver") + [
        f"storage=s3://{BUCKET}/{PREFIX}", f"tracking.tracking_uri={c.tracking_uri}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD",
        "train.val_every=10", "tracking.model_name=ccnet_cluster", *extra]


def mlflow_client(c: LocalCluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(c.tracking_uri)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def parent_run_id(out: str) -> str:
    return re.search(r"MLflow: training run (\w+),", out).group(1)


# 60 iterations: after the first checkpoint (10), time to see it and kill a node before the end
LOST = ["train.iterations=60", "train.max_failures=3", "train.seed=1"]


def test_job_from_a_laptop_runs_on_nodes_that_share_no_disk_and_survives_a_lost_node(cluster):
    """``ray job submit --working-dir .``: the code travels in the runtime environment, the op
    builds on each worker node, every step writes to S3 and nothing to a node's disk. Mid-training,
    SIGKILL every process of a worker node and start the node again (empty disk): the run resumes
    from its checkpoint on S3 and logs every iteration once. The same command again skips every
    step. (One run for both claims: each end-to-end run costs a minute here.)"""
    from pipeline.config import load_config
    from pipeline.dag import step_dir, step_keys
    from pipeline.tracking import RUN_KEY_TAG

    c = cluster
    client = mlflow_client(c)
    cfg = load_config(None, overrides(c, LOST))
    train_dir = step_dir(cfg, "train", step_keys(cfg)["train"]).rsplit("/", 1)[-1]
    snapshot_key = f"{PREFIX}/ray_storage/{train_dir}/checkpoint_manager_snapshot.json"

    def training_past_a_committed_checkpoint():
        """(run id, iteration) once Ray Train has committed a checkpoint (the one a restart
        uses) and training has gone on past it."""
        snapshot = c.s3_read(snapshot_key)
        if snapshot is None:
            return None
        kept = json.loads(snapshot)["latest_checkpoint_result"]["metrics"]["iteration"]
        runs = client.search_runs([client.get_experiment_by_name("ccnet").experiment_id],
                                  f"tags.`{RUN_KEY_TAG}` = '{step_keys(cfg)['train']}'")
        loss = steps(client, runs[0].info.run_id, "loss") if runs else []
        return (runs[0].info.run_id, kept) if loss and loss[-1] > kept else None

    log, submission = c.base / "laptop_job.log", f"ccnet-{uuid.uuid4().hex[:8]}"
    cmd = ["ray", "job", "submit", f"--address={c.dashboard}", f"--submission-id={submission}",
           f"--working-dir={ROOT}", "--", "python", "-m", "pipeline.run", *overrides(c, LOST), "ray_address=auto"]
    with log.open("w") as sink:
        job = subprocess.Popen(cmd, env=c.env, cwd=c.base, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        run_id, kept_at = wait_until(training_past_a_committed_checkpoint, "training past a committed checkpoint",
                                     timeout=400, proc=job, log=log)
        assert c.kill_worker(1) >= 2  # the raylet and at least one worker process
        time.sleep(3)
        c.start_worker(1)
        job.wait(timeout=600)
    except BaseException:  # killing the client leaves the job training on the cluster: stop it too
        job.kill()
        try:
            subprocess.run(["ray", "job", "stop", f"--address={c.dashboard}", submission], env=c.env,
                           capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            pass
        raise
    out = log.read_text()
    assert job.returncode == 0 and "succeeded" in out, out[-5000:]
    assert "[train] 2 workers on 2 node(s)" in out, out[-5000:]
    # built on the nodes (each has a cache of its own, the restarted node's empty), not found in a shared cache
    assert len(re.findall(r"ops: ccnet_ops\S* compiled in", out)) >= 3, out[-5000:]
    keys = c.s3_keys(PREFIX + "/")
    for step in ("prepare", "train", "evaluate", "register"):
        assert any(re.fullmatch(rf"{PREFIX}/{step}-\w+/result\.json", k) for k in keys), (step, keys)
    assert any(k.endswith("/shards/manifest.json") for k in keys)
    assert any(re.fullmatch(rf"{PREFIX}/train-\w+/final_checkpoint/checkpoint\.pt", k) for k in keys)
    assert any(re.fullmatch(rf"{PREFIX}/evaluate-\w+/(metrics\.json|iou\.md|confusion\.png)", k) for k in keys)
    assert any(k.startswith(f"{PREFIX}/ray_storage/train-") and k.endswith("checkpoint.pt") for k in keys)
    assert any(k.endswith("/MLmodel") for k in c.s3_keys("mlflow-artifacts/"))  # the model, through the server
    assert not (c.base / "driver").exists()  # no step wrote to the run_dir of the head's disk
    # the lost node: one restart, from a committed checkpoint, nothing logged twice or lost
    assert parent_run_id(out) == run_id
    restarts = steps(client, run_id, "num_workers")
    assert len(restarts) == 2 and restarts[0] == 0, restarts
    assert restarts[1] >= kept_at and restarts[1] % 10 == 0, (restarts, kept_at)  # no checkpoint lost
    assert f"resumed from the checkpoint of iteration {restarts[1]}" in out
    assert steps(client, run_id, "loss") == list(range(5, 61, 5))  # none lost, none twice
    assert steps(client, run_id, "val_miou") == list(range(10, 61, 10))
    assert client.get_run(run_id).info.status == "FINISHED"

    # the same command again, from a driver on the head: every step is complete on S3
    rerun = subprocess.run([sys.executable, "-m", "pipeline.run", *overrides(c, LOST), f"ray_address={c.gcs}"],
                           env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for step in ("prepare", "train", "evaluate", "register"):
        assert f"{step}: skipped (complete)" in rerun.stdout, rerun.stdout[-3000:]
    assert parent_run_id(rerun.stdout) == run_id


def test_node_local_paths_are_refused_before_any_work(cluster):
    """On a cluster whose work runs on other nodes, a plain path as the storage root (the default
    run_dir) or a sqlite file as MLflow's backend stops the run before Ray runs anything."""
    c = cluster
    base = [*tiny_overrides(c.base / "refused"), f"ray_address={c.gcs}", "train.iterations=10"]
    local = subprocess.run([sys.executable, "-m", "pipeline.run", *base, f"tracking.tracking_uri={c.tracking_uri}"],
                           env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert local.returncode != 0
    assert "in preflight" in local.stderr and "[prepare]" not in local.stdout  # before any step ran
    assert "is a local path, but the Ray cluster has 3 node(s)" in local.stderr, local.stderr[-3000:]
    sqlite = subprocess.run([sys.executable, "-m", "pipeline.run", *base, f"storage=s3://{BUCKET}/refused"],
                            env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sqlite.returncode != 0
    assert "in preflight" in sqlite.stderr and "[prepare]" not in sqlite.stdout
    assert "is one node's own database" in sqlite.stderr, sqlite.stderr[-3000:]
    assert not (c.base / "refused").exists() and not c.s3_keys("refused/")  # nothing written anywhere


SERVE = '''
import json, sys
import mlflow, numpy as np
from data_prep.loader import eval_dataset
from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.evaluate import inference_config, predict_labels

checkpoint, shards = sys.argv[1], sys.argv[2]
row = next(iter(eval_dataset(shards, "val").iter_rows()))
rgb = np.clip((row["image"].transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255 + 0.5, 0, 255).astype(np.uint8)
served = np.asarray(mlflow.pyfunc.load_model("models:/ccnet_cluster@champion").predict(rgb[None]))
net, cfg = model_from_checkpoint(load_checkpoint(checkpoint))  # the trained weights, read from S3 directly
direct = predict_labels(net, rgb[None], inference_config(cfg))
print("SERVED " + json.dumps({"shape": list(served.shape), "agree": float((served == direct).mean()),
                              "classes": sorted(np.unique(served).tolist())}))
'''


def test_registered_model_loads_on_another_node(cluster):
    """``models:/<name>@champion`` loaded through the tracking server in a process whose disk is
    not the head's; its predictions are those of the checkpoint on S3."""
    c = cluster
    keys = c.s3_keys(PREFIX + "/")
    checkpoint = next(k for k in keys if re.fullmatch(rf"{PREFIX}/train-\w+/final_checkpoint/checkpoint\.pt", k))
    shards = next(k for k in keys if k.endswith("/shards/manifest.json")).rsplit("/", 1)[0]
    script = ROOT / ".pytest_cache" / "serve_on_another_node.py"  # outside the hidden folder
    script.parent.mkdir(exist_ok=True)
    script.write_text(SERVE)
    code = f"{sys.executable} {script} s3://{BUCKET}/{checkpoint} s3://{BUCKET}/{shards}"
    proc = subprocess.run(c.private(f"env PYTHONPATH={ROOT} {code}"), env=c.env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("SERVED ", 1)[1])
    assert out["shape"][-2:] == [64, 64]
    assert out["agree"] == 1.0, out
    assert set(out["classes"]) <= set(range(5))


def test_tune_runs_trials_at_once_on_the_cluster(cluster):
    """tune.max_concurrent=2 is the only limit: two trials, each a one-worker trainer that asks for
    its own resources, train at the same time (their MLflow runs overlap). 40 iterations: each
    trial trains for longer than the trials' start-ups lag one another here (13-19 s); no ASHA
    rung before the end (grace period 4 of 4 validations), so both train to the end."""
    c = cluster
    cmd = [sys.executable, "-m", "pipeline.tune", *overrides(c, [
        "train.iterations=40", "train.val_every=10", "scaling.num_workers=1", "scaling.placement_strategy=PACK",
        "tune.num_samples=2", "tune.max_concurrent=2", "tune.recurrence=[1]", "tune.grace_period=4",
        "tracking.model_name=ccnet_cluster_tuned"]), f"ray_address={c.gcs}"]
    proc = subprocess.run(cmd, env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow_client(c)
    parent = re.search(r"MLflow parent run (\w+)", proc.stdout).group(1)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    spans = []
    for r in runs:
        assert steps(client, r.info.run_id, "loss") == list(range(5, 41, 5))
        # from the worker group's start (num_workers) to the last validation: the trial's training
        start = client.get_metric_history(r.info.run_id, "num_workers")[0].timestamp
        end = max(m.timestamp for m in client.get_metric_history(r.info.run_id, "val_miou"))
        spans.append((start, end))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # both trained at once
