"""Dataset sources: each lists the samples of a split and loads one (see ``base``)."""

from __future__ import annotations

from pathlib import Path

from .ade20k import ADE20K
from .base import DatasetInfo, Sample, SampleError, SampleRef
from .cityscapes import Cityscapes
from .files import StoragePath, as_path
from .folder import Folder
from .synthetic import Synthetic, SyntheticConfig
from .voc import VOC

SOURCES = ("cityscapes", "ade20k", "voc", "folder", "synthetic")


def build_source(name: str, root: str | Path | None = None, *, classes: str | Path | None = None,
                 synthetic: SyntheticConfig | None = None):
    """The source called name over root (synthetic needs no root)."""
    if name == "synthetic":
        return Synthetic(synthetic)
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {SOURCES}")
    if root is None or not as_path(root).is_dir():
        raise FileNotFoundError(f"{name}: dataset root {root!r} is not a directory")
    if name == "folder":
        return Folder(root, classes)
    return {"cityscapes": Cityscapes, "ade20k": ADE20K, "voc": VOC}[name](root)


__all__ = ["SOURCES", "StoragePath", "as_path", "DatasetInfo", "Sample", "SampleError", "SampleRef", "SyntheticConfig", "build_source"]
