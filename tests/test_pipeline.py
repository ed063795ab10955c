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
    return tiny_overrides(tmp) + ["train.iterations=40", "train.val_every=20", "eval.overlays=2",
                                  "tracking.model_name=ccnet_test"]


@pytest.fixture(scope="module")
def pipeline_run(ray_cluster, tmp_path_factory):
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, pipeline_overrides(tmp))
    start = time.time()
    results = run(cfg)
    return cfg, results, tmp, time.time() - start


def test_default_dag_trains_evaluates_and_registers(pipeline_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg, results, tmp, _ = pipeline_run
    uri, run_id = results["_run"]["uri"], results["_run"]["run_id"]
    client = MlflowClient(uri)
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 8 and loss[-1] < loss[0], loss  # logged every 5 of 40 iterations, and it learns
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(5, 41, 5))  # each step once
    for key in ("loss_aux", "lr", "images_per_s_per_worker", "val_miou", "eval_miou", "eval_pixel_accuracy"):
        assert client.get_metric_history(run_id, key), key
    run = client.get_run(run_id)
    assert run.data.params["model.recurrence"] == "2" and run.data.params["train.iterations"] == "40"
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/iou.md", "evaluation/confusion.png", "evaluation/metrics.json", "evaluation/overlays"} <= artifacts
    assert len(client.list_artifacts(run_id, "evaluation/overlays")) == 2
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/checkpoint.pt"}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    eval_miou = client.get_metric_history(run_id, "eval_miou")[0].value
    assert abs(eval_miou - results["evaluate"]["miou"]) < 1e-9

    # the registered model, through the alias, loads and predicts label maps
    mlflow.set_tracking_uri(uri)
    version = client.get_model_version_by_alias("ccnet_test", "champion")
    assert int(version.version) == results["register"]["version"]
    model = mlflow.pyfunc.load_model("models:/ccnet_test@champion")
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    labels = model.predict(images)
    assert labels.shape == (2, 64, 64) and labels.dtype == np.uint8 and labels.max() < 5


def test_evaluation_matches_an_independent_count(pipeline_run):
    """The evaluate step's mIoU, recomputed from its confusion matrix with numpy."""
    import json

    _, results, _, _ = pipeline_run
    metrics = json.loads((Path(results["evaluate"]["evaluation"]) / "metrics.json").read_text())
    mat = np.array(metrics["confusion"], dtype=float)
    assert mat.sum() == 8 * 64 * 64  # every validation pixel (the synthetic labels have no 255)
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
    assert main(["--model", "models:/ccnet_test@champion", "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out"), "--tracking-uri", results["_run"]["uri"]]) == 0
    label = cv2.imread(str(tmp_path / "out" / "img1_label.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (40, 56) and (tmp_path / "out" / "img1_overlay.png").is_file()
    # a checkpoint path works the same
    assert main(["--model", results["train"]["checkpoint"], "--input", str(tmp_path / "in" / "img0.png"),
                 "--out", str(tmp_path / "out2")]) == 0


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
    for name in ("default", "cityscapes_r101", "ade20k_r101", "voc_r101"):
        cfg = load_config(name)
        assert cfg.name == name
    paper = load_config("cityscapes_r101")
    assert (paper.train.crop, paper.train.lr, paper.train.iterations, paper.model.recurrence) == (769, 0.01, 60000, 2)
    assert paper.train.ohem and paper.train.sync_bn and paper.train.amp == "bf16"
    assert paper.train.batch_size * paper.scaling.num_workers == 8
