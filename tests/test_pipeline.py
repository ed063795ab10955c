"""The pipeline end to end, small: real Ray, real MLflow on sqlite, real Parquet shards."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def pipeline_overrides(tmp: Path) -> list[str]:
    # 9 validation images for 2 workers: a split that does not divide (every image is still validated)
    return tiny_overrides(tmp) + ["data.synthetic_val=9", "train.iterations=40", "train.val_every=20",
                                  "eval.overlays=2", "tracking.system_metrics_every=1"]


@pytest.fixture(scope="module")
def pipeline_run(ray_cluster, tmp_path_factory):
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, pipeline_overrides(tmp))
    start = time.time()
    results = run(cfg)
    return cfg, results, tmp, time.time() - start


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_default_dag_trains_evaluates_and_registers(pipeline_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg, results, tmp, _ = pipeline_run
    uri, run_id, eval_id = results["_run"]["uri"], results["_run"]["run_id"], results["_run"]["eval_run_id"]
    client = MlflowClient(uri)
    # the training run: the config, the curves
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 8 and loss[-1] < loss[0], loss  # logged every 5 of 40 iterations, and it learns
    assert steps(client, run_id, "loss") == list(range(5, 41, 5))  # each step once
    for key in ("loss_aux", "lr", "images_per_s_per_worker", "val_miou", "data_train_samples"):
        assert client.get_metric_history(run_id, key), key
    # each validation saw all 9 images, though they do not divide between the 2 workers
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_images")) == [(20, 9), (40, 9)]
    run = client.get_run(run_id)
    assert run.data.params["model.recurrence"] == "2" and run.data.params["train.iterations"] == "40"
    assert run.data.tags["pipeline.step"] == "train" and run.info.status == "FINISHED"
    # the evaluation run, nested under it: the scores, the figures, the config
    ev = client.get_run(eval_id)
    assert ev.data.tags["mlflow.parentRunId"] == run_id and ev.info.status == "FINISHED"
    assert ev.data.params["eval.mode"] == "whole" and "train.lr" not in ev.data.params
    artifacts = {a.path for a in client.list_artifacts(eval_id, "evaluation")}
    assert {"evaluation/iou.md", "evaluation/confusion.png", "evaluation/iou.png", "evaluation/metrics.json",
            "evaluation/overlays"} <= artifacts
    assert len(client.list_artifacts(eval_id, "evaluation/overlays")) == 2
    assert len(client.list_artifacts(eval_id, "evaluation/attention")) == 2  # an object pixel, pass by pass
    assert "config.yaml" in {a.path for a in client.list_artifacts(eval_id)}
    assert abs(ev.data.metrics["eval_miou"] - results["evaluate"]["miou"]) < 1e-9
    assert "eval_miou" not in run.data.metrics

    # registered under the task's name, through the alias; it predicts label maps of any size
    assert results["register"]["name"] == "ccnet-synthetic-5"
    mlflow.set_tracking_uri(uri)
    version = client.get_model_version_by_alias("ccnet-synthetic-5", "champion")
    assert int(version.version) == results["register"]["version"] and version.run_id == eval_id
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/ccnet-synthetic-5@champion")
        for shape in ((2, 64, 64, 3), (1, 40, 56, 3)):
            images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
            labels = model.predict(images)
            assert labels.shape == shape[:3] and labels.dtype == np.uint8 and labels.max() < 5
    assert not [w for w in caught if "type hint" in str(w.message).lower()]  # the pyfunc has them


def test_mlflow_shows_datasets_system_metrics_figures_and_source(pipeline_run):
    """What a user sees in the MLflow UI, read back through the client."""
    import hashlib
    import json

    import cv2
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    _, results, tmp, _ = pipeline_run
    uri, run_id, eval_id = results["_run"]["uri"], results["_run"]["run_id"], results["_run"]["eval_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    manifest = json.loads((Path(results["prepare"]["prepared"]) / "manifest.json").read_text())

    # the datasets: training and validation splits, digests of their shards, counts and classes
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for context, split, count in (("training", "train", 32), ("validation", "val", 9)):
        ds = inputs[context]
        shards = manifest["splits"][split]["shards"]
        assert ds.digest == hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        assert results["prepare"]["prepared"] in ds.source
        profile = json.loads(ds.profile)
        assert profile["num_samples"] == count and profile["classes"] == manifest["classes"]

    # system metrics sampled during training
    keys = set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, sorted(keys)

    # validation overlays by step (image, ground truth, prediction), two images at each validation
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    by_step = sorted((p.split("/")[-1].split("+")[0], int(p.split("+step+")[1].split("+")[0])) for p in images)
    assert by_step == [("val_overlay_0", 20), ("val_overlay_0", 40), ("val_overlay_1", 20), ("val_overlay_1", 40)]
    local = client.download_artifacts(run_id, images[0], str(tmp / "dl"))
    assert cv2.imread(local).shape[1] >= 900  # three panels side by side

    # the evaluation's figures are real figures, not a heat map of a few pixels
    for name in ("confusion.png", "iou.png"):
        fig = cv2.imread(client.download_artifacts(eval_id, f"evaluation/{name}", str(tmp / "dl")))
        assert min(fig.shape[:2]) >= 200, (name, fig.shape)

    # where the code came from
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert "pytest" in run.data.tags["command"]

    # the registered model: any image size, an input example, a checkpoint without optimizer state
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/ccnet-synthetic-5@champion")
    spec = info.signature.inputs.inputs[0]
    assert spec.shape == (-1, -1, -1, 3) and spec.type == np.dtype(np.uint8)
    assert info.saved_input_example_info is not None
    served = Path(mlflow.artifacts.download_artifacts("models:/ccnet-synthetic-5@champion", dst_path=str(tmp / "m")))
    ckpt = torch.load(next(served.rglob("checkpoint.pt")), weights_only=True)
    assert ckpt["optimizer"] is None and ckpt["scheduler"] is None
    assert ckpt["classes"] == manifest["classes"] and ckpt["config"]["model"]["recurrence"] == 2 and ckpt["model"]
    # what serving it needs, pinned to the release that logged it: torch among them
    from importlib.metadata import version

    requirements = (served / "requirements.txt").read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in requirements, requirements
    assert f"mlflow=={version('mlflow')}" in requirements
    assert not any(r.startswith("ccnet") for r in requirements)  # PyPI's ccnet is another project
    training = torch.load(Path(results["train"]["checkpoint"]) / "checkpoint.pt", weights_only=True)
    assert training["optimizer"]["state"] and training["scheduler"] is not None


def test_evaluation_matches_an_independent_count(pipeline_run):
    """The evaluate step's mIoU, recomputed from its confusion matrix with numpy."""
    import json

    _, results, _, _ = pipeline_run
    metrics = json.loads((Path(results["evaluate"]["evaluation"]) / "metrics.json").read_text())
    mat = np.array(metrics["confusion"], dtype=float)
    assert mat.sum() == 9 * 64 * 64  # every validation pixel (the synthetic labels have no 255)
    tp, union = np.diag(mat), mat.sum(0) + mat.sum(1) - np.diag(mat)
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    assert abs(np.nanmean(iou) - metrics["miou"]) < 1e-9


def test_rerun_skips_completed_steps_and_alias_stays(pipeline_run):
    from pipeline.run import run

    cfg, first, _, _ = pipeline_run
    again = run(cfg)
    assert all(again[s]["skipped"] for s in ("prepare", "train", "evaluate", "register"))
    assert again["_run"]["run_id"] == first["_run"]["run_id"]  # one parent run per pipeline run
    assert again["register"]["version"] == first["register"]["version"]


def test_only_evaluate_reruns_one_step(pipeline_run):
    from pipeline.run import run

    cfg, first, _, _ = pipeline_run
    again = run(cfg, only="evaluate")
    assert set(again) == {"evaluate", "_run"} and not again["evaluate"]["skipped"]
    assert abs(again["evaluate"]["miou"] - first["evaluate"]["miou"]) < 1e-9  # same checkpoint, same score


def test_predict_command(pipeline_run, tmp_path):
    import cv2

    from pipeline.predict import main

    _, results, tmp, _ = pipeline_run
    (tmp_path / "in").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "in" / f"img{i}.png"), np.full((40, 56, 3), 60 * i, np.uint8))
    assert main(["--model", "models:/ccnet-synthetic-5@champion", "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out"), "--tracking-uri", results["_run"]["uri"]]) == 0
    label = cv2.imread(str(tmp_path / "out" / "img1_label.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (40, 56) and (tmp_path / "out" / "img1_overlay.png").is_file()
    # a checkpoint path works the same
    assert main(["--model", results["train"]["checkpoint"], "--input", str(tmp_path / "in" / "img0.png"),
                 "--out", str(tmp_path / "out2")]) == 0


def test_predict_names_the_registered_models_when_one_is_missing(pipeline_run, tmp_path, capsys):
    from pipeline.predict import main

    _, results, _, _ = pipeline_run
    image = tmp_path / "img.png"
    image.write_bytes(b"")
    assert main(["--model", "models:/nope@champion", "--input", str(image), "--out", str(tmp_path / "o"),
                 "--tracking-uri", results["_run"]["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: models:/nope@champion cannot be loaded"), err
    assert "ccnet-synthetic-5 @champion" in err[0] and "Traceback" not in err[0]


def test_bad_config_is_refused_before_ray_starts():
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "train.iterationz=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.iterationz'" in proc.stderr and "Did you mean: 'iterations'" in proc.stderr
    assert "ray" not in (proc.stdout + proc.stderr).lower().replace("array", "")
    for bad, message in [(["train.lr=fast"], "train.lr"), (["model.backbone=vgg"], "model.backbone"),
                         (["data.source=cityscapes"], "data.root is required")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)
    assert time.time() - start < 60


def test_presets_load():
    for name in ("default", "cityscapes_r101", "ade20k_r101", "voc_r101", "ablation"):
        cfg = load_config(name)
        assert cfg.name == name
    paper = load_config("cityscapes_r101")
    assert (paper.train.crop, paper.train.lr, paper.train.iterations, paper.model.recurrence) == (769, 0.01, 60000, 2)
    assert paper.train.ohem and paper.train.sync_bn and paper.train.amp == "bf16"
    assert paper.train.batch_size * paper.scaling.num_workers == 8
    for name in ("cityscapes_r101", "ade20k_r101", "voc_r101"):  # the paper's initialisation
        assert load_config(name).model.gamma_init == 0.0


def test_embedded_default_is_the_default_preset():
    """`pipeline.run` without --config reads configs/default.yaml; tests that compute a CLI run's
    step keys and paths from load_config(None) rely on both giving one config, and one key."""
    from pipeline.config import to_dict
    from pipeline.dag import step_keys

    embedded, preset = load_config(None), load_config("default")
    assert {**to_dict(embedded), "name": None} == {**to_dict(preset), "name": None}
    assert step_keys(embedded) == step_keys(preset)


def test_alias_moves_only_for_a_better_score_under_the_same_protocol(pipeline_run, monkeypatch):
    """Both branches, and scores measured differently are never compared. The versions go to the
    registry at the given URI, never to the process's default registry (the environment's here)."""
    from mlflow.tracking import MlflowClient

    from pipeline.register import register_model

    _, results, tmp, _ = pipeline_run
    elsewhere = f"sqlite:///{tmp / 'elsewhere.db'}"
    MlflowClient(elsewhere).search_experiments()  # its tables exist
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    uri, checkpoint = results["_run"]["uri"], results["train"]["checkpoint"]
    client = MlflowClient(uri, registry_uri=uri)
    same, other = "whole scales=1 flip=false amp=none data=val@aaaa", "slide crop=64 stride=32 data=val@aaaa"

    def register(miou, protocol):
        return register_model(uri=uri, run_id=results["_run"]["eval_run_id"], checkpoint=checkpoint,
                              model_name="alias-test", alias="champion", miou=miou, protocol=protocol,
                              classes=["a", "b", "c", "d", "e"])

    def champion():
        return int(client.get_model_version_by_alias("alias-test", "champion").version)

    first = register(0.5, same)
    assert first["alias_moved"] and champion() == first["version"]
    better = register(0.6, same)
    assert better["alias_moved"] and champion() == better["version"]
    assert f"moved here from version {first['version']}" in better["alias_note"]
    worse = register(0.4, same)
    assert not worse["alias_moved"] and champion() == better["version"]
    assert f"kept on version {better['version']}, which scores higher" in worse["alias_note"]
    measured_otherwise = register(0.9, other)
    assert not measured_otherwise["alias_moved"] and champion() == better["version"]
    assert "another protocol" in measured_otherwise["alias_note"]
    tags = client.get_model_version("alias-test", str(better["version"])).tags
    assert tags["eval_protocol"] == same and float(tags["val_miou"]) == 0.6
    assert MlflowClient(elsewhere, registry_uri=elsewhere).search_registered_models() == []


def test_model_name_derives_from_the_task():
    from pipeline.config import DataConfig
    from pipeline.register import model_name_for

    def manifest(n):
        return {"classes": [f"c{i}" for i in range(n)]}

    assert model_name_for(DataConfig(source="cityscapes", root="/d/cs"), manifest(19)) == "ccnet-cityscapes"
    assert model_name_for(DataConfig(source="cityscapes", root="/d/cs"), manifest(7)) == "ccnet-cityscapes-7"
    assert model_name_for(DataConfig(source="voc", root="/d/voc"), manifest(21)) == "ccnet-voc"
    assert model_name_for(DataConfig(source="synthetic"), manifest(5)) == "ccnet-synthetic-5"
    assert model_name_for(DataConfig(source="folder", root="s3://b/My Roads/"), manifest(3)) == "ccnet-my-roads-3"


def test_from_train_trains_again_under_a_new_name(pipeline_run):
    """``--from train`` after a complete run: a new attempt from iteration 0, its own Ray Train
    run and MLflow run; the earlier attempt's checkpoints and curves stay as they were."""
    from mlflow.tracking import MlflowClient

    from pipeline.run import run, summary
    from pipeline.train import storage_for

    cfg, first, tmp, _ = pipeline_run
    client = MlflowClient(first["_run"]["uri"])
    before = steps(client, first["_run"]["run_id"], "loss")
    again = run(cfg, start="train")
    train = again["train"]
    assert not train["skipped"] and train["resumed_from"] == 0 and train["attempt"] == 1
    assert train["ray_run"] == first["train"]["ray_run"] + "-1"
    assert again["_run"]["run_id"] != first["_run"]["run_id"]
    assert steps(client, again["_run"]["run_id"], "loss") == list(range(5, 41, 5))  # from the first steps
    assert steps(client, first["_run"]["run_id"], "loss") == before
    runs = Path(storage_for(cfg))
    assert list((runs / first["train"]["ray_run"]).glob("checkpoint_*"))  # the earlier attempt's, kept
    assert list((runs / train["ray_run"]).glob("checkpoint_*"))
    text = summary(again, 1.0)
    assert "prepare: skipped (complete)" in text and "train: ran from iteration 0 to 40 (attempt 1" in text
    assert "evaluate: ran" in text and "register: ran" in text
    # a plain rerun now skips, in the new attempt's runs
    plain = run(cfg)
    assert all(plain[s]["skipped"] for s in ("prepare", "train", "evaluate", "register"))
    assert plain["_run"]["run_id"] == again["_run"]["run_id"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(pipeline_run):
    """The latest checkpoint truncated: the training resumes from the previous intact one (the
    first attempt kept iterations 20 and 40), with a message; none intact is an error that says
    how to start afresh."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from data_prep.loader import load_manifest
    from pipeline.checkpoint import DamagedCheckpoint, verify
    from pipeline.train import fit, storage_for

    cfg, first, _, _ = pipeline_run
    run_dir = Path(storage_for(cfg)) / first["train"]["ray_run"]
    kept = {verify(str(d))["iteration"]: d for d in run_dir.glob("checkpoint_*") if d.is_dir()}
    assert sorted(kept) == [20, 40]
    latest = kept[40] / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(DamagedCheckpoint, match="truncated"):
        verify(str(kept[40]))

    client = MlflowClient(first["_run"]["uri"])
    observer = client.create_run(client.get_run(first["_run"]["run_id"]).info.experiment_id).info.run_id
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=60))
    prepared = first["prepare"]["prepared"]
    result = fit(longer, prepared, load_manifest(prepared), storage=storage_for(cfg), name=first["train"]["ray_run"],
                 tracking_uri=first["_run"]["uri"], run_id=observer)
    assert result.error is None and result.metrics["iteration"] == 60
    assert steps(client, observer, "loss") == list(range(25, 61, 5))  # resumed from 20, not 40, nor 0

    # no intact checkpoint left: the choice the workers make on restore (rank 0's, the run above)
    # stops, saying how to start afresh (an error in the training function ends the run: the
    # non-finite loss tests)
    import pyarrow.fs as pafs

    from pipeline.train import intact_checkpoint

    for d in run_dir.glob("checkpoint_*"):
        if d.is_dir():
            (d / "checkpoint.pt").write_bytes(b"")
    latest = max((d for d in run_dir.glob("checkpoint_*") if d.is_dir()), key=lambda d: d.name)
    with pytest.raises(DamagedCheckpoint, match="no other intact checkpoint") as failed:
        intact_checkpoint(str(latest), pafs.LocalFileSystem())
    assert "truncated" in str(failed.value) and "--from train" in str(failed.value)


@pytest.mark.slow
def test_bench_leaves_the_users_tracking_alone(tmp_path):
    """``python -m pipeline.bench`` in a user's directory, with the user's tracking and registry
    URIs in the environment (of the driver and of the Ray it starts): nothing appears in that
    directory (no mlflow.db, no mlruns, no runs), and nothing reaches the user's database."""
    import os

    from mlflow.tracking import MlflowClient

    user_db = f"sqlite:///{tmp_path / 'user' / 'mlflow.db'}"
    (tmp_path / "user").mkdir()
    (tmp_path / "cwd").mkdir()
    MlflowClient(user_db).search_experiments()  # the user's database exists, with its tables
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env |= {"MLFLOW_TRACKING_URI": user_db, "MLFLOW_REGISTRY_URI": user_db, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "data.synthetic_train=16", "data.synthetic_val=4",
                           "data.synthetic_size=64", "data.shard_size=16", "train.batch_size=4", "train.crop=64",
                           "train.iterations=10", "train.log_every=5", "train.val_every=10", "num_cpus=2"],
                          cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "images/s per worker" in proc.stdout
    assert list((tmp_path / "cwd").iterdir()) == []
    user = MlflowClient(user_db, registry_uri=user_db)
    assert user.search_registered_models() == []
    assert [e.name for e in user.search_experiments()] == ["Default"]
