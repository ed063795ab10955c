"""What every dataset source provides: the samples of a split, and how to load one.

A source lists ``SampleRef``s (a stable key and where the image and label live) and loads a
ref into a ``Sample``: the image's encoded bytes (kept as they are, so nothing is lost to
re-encoding), its size, and the label map as uint8 train ids (255 = ignore). Anything wrong with
a sample raises ``SampleError`` with the reason; the preparation records it and goes on.
"""

from __future__ import annotations

import dataclasses
import io
import cv2
import numpy as np
from PIL import Image

from .files import is_uri, read_bytes

IGNORE_INDEX = 255
INVALID = -1  # a raw label value outside the class set


class SampleError(Exception):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


@dataclasses.dataclass(frozen=True)
class SampleRef:
    key: str
    image: str | None = None  # path; None when missing
    label: str | None = None
    index: int | None = None  # generated sources: the sample's number


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str
    image: bytes  # encoded (PNG, JPEG, ...)
    image_format: str
    label: np.ndarray  # (H, W) uint8 train ids, 255 = ignore
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """A lookup table raw value -> train id over 0..65535; unmapped values are INVALID."""
    lut = np.full(65536, INVALID, dtype=np.int32)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


class UnreachableError(RuntimeError):
    """A dataset file that this node cannot reach at all: an error of the run, not of the sample."""


def _read(path: str, what: str) -> bytes:
    """The file's bytes. A file that is missing or unreadable is the sample's fault (SampleError); an
    object store that does not answer is not (UnreachableError, which stops the preparation)."""
    try:
        return read_bytes(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise SampleError(f"unreadable {what} {path}: {exc.strerror or exc}") from None
    except OSError as exc:  # a PermissionError on an object store is the node's credentials
        if not is_uri(path):
            raise SampleError(f"unreadable {what} {path}: {exc.strerror or exc}") from None
        raise UnreachableError(f"cannot read {path}: {exc}") from exc


def read_image(path: str) -> tuple[bytes, str, int, int]:
    """(bytes, format, height, width) of an image file that decodes to a colour image."""
    data = _read(path, "image")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise SampleError(f"unreadable image {path}: not a decodable image")
    fmt = "jpeg" if data[:2] == b"\xff\xd8" else "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "other"
    return data, fmt, decoded.shape[0], decoded.shape[1]


def read_label(path: str, lut: np.ndarray) -> np.ndarray:
    """The label file's values mapped through lut to uint8 train ids (palette PNGs: indices)."""
    data = _read(path, "label")
    try:
        with Image.open(io.BytesIO(data)) as img:
            raw = np.array(img)
    except (OSError, ValueError) as exc:
        raise SampleError(f"unreadable label {path}: {exc}") from None
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0 or raw.max() >= len(lut):
        raise SampleError(f"unreadable label {path}: expected a single-channel integer map, "
                          f"got shape {raw.shape} dtype {raw.dtype}")
    mapped = lut[raw]
    if (mapped == INVALID).any():
        bad = np.unique(raw[mapped == INVALID])[:10].tolist()
        raise SampleError(f"label {path} has values outside the class set: {bad}")
    return mapped.astype(np.uint8)


def load_pair(ref: SampleRef, lut: np.ndarray) -> Sample:
    """Load and validate an image/label file pair."""
    if ref.image is None:
        raise SampleError(f"missing image for label {ref.label}")
    if ref.label is None:
        raise SampleError(f"missing label for image {ref.image}")
    data, fmt, h, w = read_image(ref.image)
    label = read_label(ref.label, lut)
    if label.shape != (h, w):
        raise SampleError(f"size mismatch: image {ref.image} is {h}x{w}, label {ref.label} is "
                          f"{label.shape[0]}x{label.shape[1]}")
    return Sample(ref.key, data, fmt, label, h, w)


def pair_by_stem(images: dict[str, str], labels: dict[str, str]) -> list[SampleRef]:
    """Refs for the union of keys, sorted; a key with one side missing keeps None there."""
    return [SampleRef(key, images.get(key), labels.get(key)) for key in sorted(set(images) | set(labels))]


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise SampleError("could not encode PNG")
    return buf.tobytes()


def decode_label(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))
