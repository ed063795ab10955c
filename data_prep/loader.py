"""Ray Data datasets over the shards: decoding and paired augmentation on the workers.

    ds = training_dataset("data/synthetic", "train", augment=AugmentConfig(crop=64), seed=0, epoch=3, epochs=10)
    ev = eval_dataset("data/synthetic", "val")

The shards are checked against the manifest's sha256 before anything is read. The training
dataset shuffles shards and the rows within each shard from (seed, epoch), streaming one shard per
task (``preserve_order`` on the dataset's own context keeps that order), and each sample's
augmentation draws from a generator seeded by (seed, epoch, key): an epoch is reproducible from
the seed, and every epoch differs from the last.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import cv2
import numpy as np

from .shards import read_manifest, resolve, shard_paths, verify_shards
from .sources.base import decode_label
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, training_transform


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop: int
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def load_manifest(location: str) -> dict:
    manifest = read_manifest(location)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json under {location}: run `python -m data_prep` first")
    if not manifest.get("complete"):
        raise ValueError(f"the preparation under {location} did not finish: run `python -m data_prep` "
                         "again with the same arguments to complete it")
    return manifest


def _split_shards(location: str, split: str, *, verify: bool = True):
    """(filesystem, non-empty shard paths) of a split, checked against the manifest's sha256."""
    manifest = load_manifest(location)
    if verify:
        verify_shards(location, manifest, [split])
    fs, paths = shard_paths(location, manifest, split)
    if not paths:
        raise ValueError(f"split {split!r} under {location} has no samples")
    return fs, paths


def _one_block_each(items: list[dict]):
    """A dataset of one row per item (a shard to read), one block each, kept in this order: a task
    reads one shard, and ``preserve_order`` on this dataset's own context keeps the items' order."""
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True
    return ds


def _read_shards(batch: dict, *, rows: int, columns: list[str], transform):
    """Shard items -> their rows in file order through ``transform``, ``rows`` at a time: a shard
    of large images is never held decoded at once."""
    import pyarrow.parquet as pq

    for path, location in zip(batch["shard"], batch["location"]):
        fs, _ = resolve(str(location))
        with fs.open_input_file(str(path)) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns):
                yield transform(record_batch.to_pydict())


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, zlib.crc32(key.encode())))


def augment_batch(batch: dict, *, augment: AugmentConfig, seed: int, epoch: int) -> dict:
    transform = training_transform(augment.crop, scale=augment.scale, flip=augment.flip, jitter=augment.jitter)
    images, labels = [], []
    for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
        img, lab = transform(decode_image(image), decode_label(label), sample_rng(seed, epoch, str(key)))
        images.append(normalize(img, augment.mean, augment.std))
        labels.append(np.ascontiguousarray(lab))
    return {"key": np.asarray(batch["key"]), "image": np.stack(images), "label": np.stack(labels)}


def eval_batch(batch: dict, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Decoded, normalised, not augmented; images keep their sizes."""
    images = [normalize(decode_image(b), mean, std) for b in batch["image"]]
    labels = [decode_label(b) for b in batch["label"]]
    return {"key": np.asarray(batch["key"]), "image": images, "label": labels}


def _shard_batch(batch: dict, *, augment: AugmentConfig, seed: int) -> dict:
    """One (epoch, shard) item -> the shard's rows in a seeded order, decoded and augmented."""
    import pyarrow.parquet as pq

    epoch, path, location = int(batch["epoch"][0]), str(batch["shard"][0]), str(batch["location"][0])
    fs, _ = resolve(location)
    table = pq.read_table(path, filesystem=fs, columns=["key", "image", "label"])
    order = np.random.default_rng((seed, epoch, zlib.crc32(path.encode()))).permutation(table.num_rows)
    rows = table.take(order).to_pydict()
    return augment_batch(rows, augment=augment, seed=seed, epoch=epoch)


def training_dataset(location: str, split: str, *, augment: AugmentConfig, seed: int, epoch: int = 0,
                     epochs: int = 1):
    """Epochs [epoch, epoch + epochs) of augmented rows: key, image (3, crop, crop) float32, label uint8.

    Each epoch visits the shards in an order drawn from (seed, epoch) and the rows of a shard in
    an order drawn from (seed, epoch, shard); one shard is read per task, so any number of epochs
    streams through in the memory of a few shards.
    """
    _, paths = _split_shards(location, split)
    items = [{"epoch": e, "shard": paths[i], "location": location}
             for e in range(epoch, epoch + epochs)
             for i in np.random.default_rng((seed, e)).permutation(len(paths))]
    ds = _one_block_each(items)  # the seed fixes the order
    return ds.map_batches(_shard_batch, fn_kwargs={"augment": augment, "seed": seed}, batch_size=1,
                          batch_format="numpy")


def eval_dataset(location: str, split: str, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Rows of key, image (3, H, W) float32 normalised, label (H, W) uint8, in shard order.

    One task per shard reads it with pyarrow and decodes 8 rows at a time. ``ray.data.read_parquet``
    would list and plan the files again on every pass: a pass over 8 images of 64 px took 3.5-9.6 s
    with it here, and 0.06-0.5 s without (README, "Feeding training")."""
    _, paths = _split_shards(location, split)
    ds = _one_block_each([{"shard": path, "location": location} for path in paths])
    decode = functools.partial(eval_batch, mean=mean, std=std)
    return ds.map_batches(_read_shards, batch_size=1, batch_format="numpy",
                          fn_kwargs={"rows": 8, "columns": ["key", "image", "label"], "transform": decode})
