"""Ray Data datasets over the shards: decoding and paired augmentation on the workers.

    ds = training_dataset("data/synthetic", "train", augment=AugmentConfig(crop=64), seed=0, epoch=3)
    ev = eval_dataset("data/synthetic", "val")

The shards are checked against the manifest's sha256 before anything is read. The training
dataset is shuffled with ``random_shuffle(seed)``, the seed derived from (seed, epoch), in a
fixed order (``preserve_order`` on this dataset's context), and each
sample's augmentation draws from a generator seeded by (seed, epoch, key): an epoch is
reproducible from the seed, and every epoch differs from the last.
"""

from __future__ import annotations

import dataclasses
import zlib

import cv2
import numpy as np

from .shards import read_manifest, shard_paths, verify_shards
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


def split_dataset(location: str, split: str, *, verify: bool = True):
    """The raw rows of a split (key, image, image_format, label, height, width)."""
    import ray.data

    manifest = load_manifest(location)
    if verify:
        verify_shards(location, manifest, [split])
    fs, paths = shard_paths(location, manifest, split)
    if not paths:
        raise ValueError(f"split {split!r} under {location} has no samples")
    return ray.data.read_parquet(paths, filesystem=fs)


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


def training_dataset(location: str, split: str, *, augment: AugmentConfig, seed: int, epoch: int,
                     batch_size: int = 16):
    """Shuffled (seed, epoch) and augmented rows: key, image (3, crop, crop) float32, label uint8."""
    ds = split_dataset(location, split).random_shuffle(seed=seed * 100_003 + epoch)
    ds.context.execution_options.preserve_order = True  # this dataset only: the seed fixes the order
    return ds.map_batches(augment_batch, fn_kwargs={"augment": augment, "seed": seed, "epoch": epoch},
                          batch_format="numpy", batch_size=batch_size)


def eval_dataset(location: str, split: str, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Rows of key, image (3, H, W) float32 normalised, label (H, W) uint8, in shard order."""
    return split_dataset(location, split).map_batches(eval_batch, fn_kwargs={"mean": mean, "std": std},
                                                      batch_format="numpy", batch_size=8)
