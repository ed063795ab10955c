"""Dataset preparation: every layout to shards that decode to exactly the inputs, bad input,
idempotence, interruption, and the Ray Data loader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.loader import AugmentConfig, decode_image, eval_dataset, training_dataset
from data_prep.prepare import TooManyRejected, prepare
from data_prep.shards import ShardChecksumError, read_manifest, verify_shards
from data_prep.sources import SyntheticConfig, build_source
from data_prep.sources.base import decode_label
from data_prep.sources.synthetic import KEY_WIDTH, generate

ROOT = Path(__file__).resolve().parents[1]


def rng_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def read_rows(out: Path) -> dict[str, dict]:
    manifest = read_manifest(str(out))
    rows = {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            for row in pq.read_table(out / shard["file"]).to_pylist():
                assert (split, row["key"]) not in rows, "a sample landed twice"
                rows[(split, row["key"])] = row
    return rows


def run(name, root, out, **kw):
    source = build_source(name, root, classes=kw.pop("classes", None))
    return prepare(source, str(out), source_desc={"name": name, "root": str(root)}, progress=False, **kw)


# --- layouts --------------------------------------------------------------------------------

def test_cityscapes_layout(ray_cluster, tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    rng = np.random.default_rng(0)
    expected = {}
    for split, city, n in [("train", "aachen", 2), ("train", "bremen", 1), ("val", "lindau", 1)]:
        for i in range(n):
            stem = f"{city}_000000_{i:06d}"
            img = rng_image(rng, 12, 20)
            ids = rng.choice([0, 4, 7, 8, 11, 26, 33], size=(12, 20)).astype(np.uint8)
            (tmp_path / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (tmp_path / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), img)
            cv2.imwrite(str(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), ids)
            train_ids = np.vectorize(lambda v: id2label[int(v)].trainId)(ids)
            train_ids[(train_ids == -1) | (train_ids == 255)] = 255
            expected[(split, stem)] = (img[..., ::-1], train_ids.astype(np.uint8))
    manifest = run("cityscapes", tmp_path, tmp_path / "out", shard_size=2)
    assert manifest["classes"][13] == "car" and len(manifest["classes"]) == 19
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(expected)
    for k, (img, lab) in expected.items():
        np.testing.assert_array_equal(decode_image(rows[k]["image"]), img)
        np.testing.assert_array_equal(decode_label(rows[k]["label"]), lab)
    assert 255 in np.concatenate([decode_label(r["label"]).ravel() for r in rows.values()])


def test_ade20k_layout(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "ADEChallengeData2016"
    expected = {}
    for split, sub in (("train", "training"), ("val", "validation")):
        (base / "images" / sub).mkdir(parents=True)
        (base / "annotations" / sub).mkdir(parents=True)
        for i in range(2):
            stem = f"ADE_{sub}_{i:08d}"
            cv2.imwrite(str(base / "images" / sub / f"{stem}.jpg"), rng_image(rng, 10, 14))
            ann = rng.integers(0, 151, (10, 14)).astype(np.uint8)
            ann[0] = 0
            cv2.imwrite(str(base / "annotations" / sub / f"{stem}.png"), ann)
            lab = np.where(ann == 0, 255, ann.astype(int) - 1).astype(np.uint8)
            jpeg = cv2.imread(str(base / "images" / sub / f"{stem}.jpg"))[..., ::-1]
            expected[(split, stem)] = (jpeg, lab)
    manifest = run("ade20k", tmp_path, tmp_path / "out")
    assert len(manifest["classes"]) == 150 and manifest["classes"][0] == "wall"
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(expected)
    for k, (img, lab) in expected.items():
        np.testing.assert_array_equal(decode_image(rows[k]["image"]), img)  # JPEG bytes kept as they are
        np.testing.assert_array_equal(decode_label(rows[k]["label"]), lab)


def test_voc_layout_with_palette_pngs(ray_cluster, tmp_path):
    from data_prep.sources.voc import voc_palette

    rng = np.random.default_rng(2)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    expected = {}
    for key in ("2007_000032", "2007_000039", "2008_000002"):
        cv2.imwrite(str(root / "JPEGImages" / f"{key}.jpg"), rng_image(rng, 16, 12))
        idx = rng.integers(0, 21, (16, 12)).astype(np.uint8)
        idx[:, 5] = 255  # object border
        png = Image.fromarray(idx, mode="P")
        png.putpalette([v for c in voc_palette() for v in c])
        png.save(root / "SegmentationClass" / f"{key}.png")
        expected[("train", key)] = idx
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(k for _, k in expected) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    run("voc", tmp_path, tmp_path / "out", splits=["train"])
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(expected)
    for k, idx in expected.items():
        np.testing.assert_array_equal(decode_label(rows[k]["label"]), idx)


def make_folder(root: Path, rng, n=6, size=(8, 10)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.yaml").write_text("names: [sky, road, car]\n")
    expected = {}
    for i in range(n):
        img, mask = rng_image(rng, *size), rng.choice([0, 1, 2, 255], size=size).astype(np.uint8)
        cv2.imwrite(str(root / "images" / "train" / f"s{i:03d}.png"), img)
        cv2.imwrite(str(root / "masks" / "train" / f"s{i:03d}.png"), mask)
        expected[f"s{i:03d}"] = (img[..., ::-1], mask)
    return expected


def test_folder_layout(ray_cluster, tmp_path):
    expected = make_folder(tmp_path / "data", np.random.default_rng(3))
    manifest = run("folder", tmp_path / "data", tmp_path / "out", shard_size=4)
    assert manifest["classes"] == ["sky", "road", "car"]
    rows = read_rows(tmp_path / "out")
    for key, (img, mask) in expected.items():
        np.testing.assert_array_equal(decode_image(rows[("train", key)]["image"]), img)
        np.testing.assert_array_equal(decode_label(rows[("train", key)]["label"]), mask)


def test_dataset_root_as_a_uri(ray_cluster, tmp_path):
    """data.root given as a URI (here file://, read through pyarrow as s3:// is) lists and loads
    the same samples into the same shards as the plain path."""
    make_folder(tmp_path / "data", np.random.default_rng(3))
    run("folder", tmp_path / "data", tmp_path / "plain", shard_size=4)
    run("folder", f"file://{tmp_path / 'data'}", tmp_path / "uri", shard_size=4)
    plain, uri = read_manifest(str(tmp_path / "plain")), read_manifest(str(tmp_path / "uri"))
    assert [s["sha256"] for s in uri["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in plain["splits"]["train"]["shards"]]
    assert uri["splits"]["train"]["samples"] == plain["splits"]["train"]["samples"] > 0


def test_a_root_missing_where_the_task_runs_stops_the_run(ray_cluster, tmp_path):
    """The root was there when the samples were listed, but not where a shard is prepared (another
    node's disk): an error of the run, not a shard of rejected samples."""
    from data_prep.sources.base import UnreachableError

    class ListedOnAnotherDisk:
        """The folder as the driver lists it; where the shards are prepared, it is not there."""

        def __init__(self, source):
            self.source, self.root, self.info, self.splits = source, source.root, source.info, source.splits

        def list(self, split):
            refs = self.source.list(split)
            self.root.rename(self.root.with_name("elsewhere"))
            return refs

        def load(self, ref):
            return self.source.load(ref)

    make_folder(tmp_path / "data", np.random.default_rng(3))
    source = ListedOnAnotherDisk(build_source("folder", tmp_path / "data"))
    with pytest.raises(UnreachableError, match=r"is not a folder on the node that prepares train-0000\d"):
        prepare(source, str(tmp_path / "out"), source_desc={"name": "folder"}, shard_size=4, progress=False)


def test_synthetic_is_deterministic_and_needs_context():
    cfg = SyntheticConfig()
    a, b = generate(cfg, "train", 5), generate(cfg, "train", 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(generate(cfg, "train", 6)[0], a[0])
    border = np.zeros((cfg.size, cfg.size), bool)
    border[:KEY_WIDTH] = border[:, :KEY_WIDTH] = True
    for i in range(30):
        image, label = generate(cfg, "train", i)
        objects, keys = (label > 0) & ~border, (label > 0) & border
        assert objects.any() and keys.any()
        ys, xs = np.nonzero(objects)
        ky, kx = np.nonzero(keys)
        # every object pixel is at least gap - KEY_WIDTH pixels from every key pixel
        dist = np.maximum(np.abs(ys[:, None] - ky[None]), np.abs(xs[:, None] - kx[None])).min()
        assert dist >= cfg.gap - KEY_WIDTH
        # objects of different classes look alike: one texture, two values
        assert set(np.unique(image[objects])) <= {150, 190}
        # each object's class is the class of the key on its rows or its columns
        for cls in np.unique(label[objects]):
            rows, cols = np.nonzero((label == cls) & ~border)
            key_on_rows = (label[rows, :KEY_WIDTH] == cls).all()
            key_on_cols = (label[:KEY_WIDTH, cols] == cls).all()
            assert key_on_rows or key_on_cols


# --- bad input ----------------------------------------------------------------------------

def test_bad_samples_are_rejected_with_reasons(ray_cluster, tmp_path, capsys):
    root = tmp_path / "data"
    expected = make_folder(root, np.random.default_rng(4), n=4)
    img_dir, mask_dir = root / "images" / "train", root / "masks" / "train"
    (img_dir / "broken_image.png").write_bytes(b"not an image")
    cv2.imwrite(str(mask_dir / "broken_image.png"), np.zeros((8, 10), np.uint8))
    cv2.imwrite(str(img_dir / "broken_label.png"), rng_image(np.random.default_rng(5), 8, 10))
    (mask_dir / "broken_label.png").write_bytes(b"\x89PNG garbage")
    cv2.imwrite(str(img_dir / "mismatch.png"), rng_image(np.random.default_rng(6), 8, 10))
    cv2.imwrite(str(mask_dir / "mismatch.png"), np.zeros((9, 10), np.uint8))
    cv2.imwrite(str(img_dir / "bad_values.png"), rng_image(np.random.default_rng(7), 8, 10))
    cv2.imwrite(str(mask_dir / "bad_values.png"), np.full((8, 10), 7, np.uint8))
    cv2.imwrite(str(img_dir / "no_mask.png"), rng_image(np.random.default_rng(8), 8, 10))
    cv2.imwrite(str(mask_dir / "no_image.png"), np.zeros((8, 10), np.uint8))

    manifest = run("folder", root, tmp_path / "out", shard_size=3)
    reasons = {r["key"]: r["reason"] for r in manifest["splits"]["train"]["rejected"]}
    assert set(reasons) == {"broken_image", "broken_label", "mismatch", "bad_values", "no_mask", "no_image"}
    assert "unreadable image" in reasons["broken_image"]
    assert "unreadable label" in reasons["broken_label"]
    assert "size mismatch" in reasons["mismatch"]
    assert "outside the class set: [7]" in reasons["bad_values"]
    assert "missing label" in reasons["no_mask"] and "missing image" in reasons["no_image"]
    assert {k for _, k in read_rows(tmp_path / "out")} == set(expected)  # every good sample landed
    assert manifest["splits"]["train"]["samples"] == len(expected)
    printed = capsys.readouterr().out
    assert "6 rejected" in printed and "rejected mismatch: size mismatch" in printed
    with pytest.raises(TooManyRejected, match="6 of 10"):
        run("folder", root, tmp_path / "out2", shard_size=3, max_rejected=0.5)


def test_bad_source_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_source("cityscapes", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown source"):
        build_source("coco", tmp_path)
    (tmp_path / "classes.yaml").write_text("names: 3\n")
    with pytest.raises(ValueError, match="names"):
        build_source("folder", tmp_path)


# --- idempotence and interruption ---------------------------------------------------------

def test_rerun_skips_complete_shards(ray_cluster, tmp_path):
    make_folder(tmp_path / "data", np.random.default_rng(9), n=7)
    first = run("folder", tmp_path / "data", tmp_path / "out", shard_size=3)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    second = run("folder", tmp_path / "data", tmp_path / "out", shard_size=3)
    assert second["splits"] == first["splits"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == mtimes
    # a damaged shard is detected and rewritten
    victim = tmp_path / "out" / first["splits"]["train"]["shards"][1]["file"]
    victim.write_bytes(b"damaged")
    with pytest.raises(ShardChecksumError, match=victim.name):
        verify_shards(str(tmp_path / "out"), first)
    third = run("folder", tmp_path / "data", tmp_path / "out", shard_size=3)
    assert third["splits"] == first["splits"]
    verify_shards(str(tmp_path / "out"), third)
    with pytest.raises(ValueError, match="different preparation"):
        run("folder", tmp_path / "data", tmp_path / "out", shard_size=2)


SLOW_SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    import ray
    from data_prep.prepare import prepare
    from data_prep.sources import Synthetic, SyntheticConfig

    class Slow(Synthetic):
        """Synthetic samples, slowly; with kill-task, the first attempt at sample 9 kills its worker."""
        def __init__(self, cfg, marker, kill, delay):
            super().__init__(cfg)
            self.marker, self.kill, self.delay = marker, kill, delay

        def load(self, ref):
            if ref.index == 9 and self.kill and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(self.delay)
            return super().load(ref)

    ray.init(address=sys.argv[1], logging_level="warning")
    cfg = SyntheticConfig(size=32, gap=16, samples=(("train", 24),))
    source = Slow(cfg, os.path.join(sys.argv[3], "killed"), sys.argv[4] == "kill-task", float(sys.argv[5]))
    prepare(source, sys.argv[2], source_desc={"name": "slow"}, shard_size=4, progress=False)
''')


def run_script(tmp_path, address, out, mode, delay, wait=True):
    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), address, str(out), str(tmp_path), mode, str(delay)],
                            env=env, start_new_session=True)
    if wait:
        assert proc.wait(timeout=300) == 0
    return proc


def test_interrupted_runs_resume_to_identical_output(ray_cluster, tmp_path):
    reference = tmp_path / "reference"
    run_script(tmp_path, ray_cluster, reference, "plain", 0)

    # a task killed midway: Ray retries it, and the output is the same
    killed_task = tmp_path / "killed_task"
    run_script(tmp_path, ray_cluster, killed_task, "kill-task", 0)
    assert (tmp_path / "killed").exists()

    # the driver killed midway, then started again with the same arguments
    resumed = tmp_path / "resumed"
    proc = run_script(tmp_path, ray_cluster, resumed, "plain", 0.25, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = read_manifest(str(resumed)) if (resumed / "manifest.json").exists() else None
        if m and m["splits"]["train"]["shards"]:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_manifest(str(resumed))
    assert not partial["complete"] and 0 < len(partial["splits"]["train"]["shards"]) < 6
    run_script(tmp_path, ray_cluster, resumed, "plain", 0)

    want = json.loads((reference / "manifest.json").read_text())
    for out in (killed_task, resumed):
        got = json.loads((out / "manifest.json").read_text())
        assert got["complete"] and got["splits"] == want["splits"]
        assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in reference.glob("*.parquet"))
        assert not list(out.glob("*.tmp-*"))
        rows = read_rows(out)
        assert len(rows) == 24


# --- the loader -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("synthetic")
    cfg = SyntheticConfig(size=48, gap=24, samples=(("train", 24), ("val", 8)))
    prepare(build_source("synthetic", synthetic=cfg), str(out), source_desc={"name": "synthetic"},
            shard_size=8, progress=False)
    return out


def epoch_batches(out, seed, epoch):
    ds = training_dataset(str(out), "train", augment=AugmentConfig(crop=32, jitter=True), seed=seed, epoch=epoch)
    return list(ds.iter_batches(batch_size=8, batch_format="numpy"))


def test_training_dataset_is_reproducible_per_epoch(synthetic_shards):
    a, b, c = (epoch_batches(synthetic_shards, 0, e) for e in (0, 0, 1))
    keys = lambda bs: [k for x in bs for k in x["key"]]  # noqa: E731
    assert keys(a) == keys(b) and keys(a) != keys(c) and sorted(keys(a)) == sorted(keys(c))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    batch = a[0]
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8, 32, 32) and batch["label"].dtype == np.uint8
    assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, 4, 255}


def test_eval_dataset_is_unaugmented(synthetic_shards):
    from data_prep.transforms import normalize

    cfg = SyntheticConfig(size=48, gap=24, samples=(("train", 24), ("val", 8)))
    rows = list(eval_dataset(str(synthetic_shards), "val").iter_rows())
    assert sorted(r["key"] for r in rows) == [f"val-{i:06d}" for i in range(8)]
    for r in rows:
        image, label = generate(cfg, "val", int(r["key"].split("-")[1]))
        np.testing.assert_allclose(r["image"], normalize(image), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(r["label"], label)


def test_paired_transforms_keep_image_and_label_aligned():
    from data_prep.transforms import RandomCrop, RandomHorizontalFlip, RandomScale

    rng = np.random.default_rng(0)
    label = np.arange(12 * 16, dtype=np.int64).reshape(12, 16) % 250
    image = np.repeat(label.astype(np.uint8)[..., None], 3, axis=2)
    for t in (RandomScale(0.5, 2.0), RandomCrop(20), RandomHorizontalFlip(1.0)):
        img, lab = t(image, label.astype(np.uint8), rng)
        if isinstance(t, RandomScale):  # nearest on the label; the image is interpolated
            assert img.shape[:2] == lab.shape
            continue
        valid = lab != 255
        np.testing.assert_array_equal(img[..., 0][valid], lab[valid])
        if isinstance(t, RandomCrop):  # padding: image 0, label 255
            assert lab.shape == (20, 20) and (lab[12:] == 255).all() and (img[12:] == 0).all()
