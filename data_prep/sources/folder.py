"""A folder of images and masks paired by file stem.

    root/classes.yaml          names: [road, car, ...]   (optional palette: [[r, g, b], ...])
    root/images/{split}/*.jpg|png
    root/masks/{split}/*.png   values 0..K-1 = class index, 255 = ignore

``classes.json`` is read the same way. Without split folders (``images/*.jpg``) everything is
the split "train".
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .ade20k import random_palette
from .base import IGNORE_INDEX, DatasetInfo, SampleRef, label_lut, load_pair, pair_by_stem
from .files import as_path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_classes(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    spec = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    names = spec.get("names") if isinstance(spec, dict) else spec
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected 'names: [class, ...]' (a non-empty list of strings)")
    if len(names) >= IGNORE_INDEX:
        raise ValueError(f"{path}: at most {IGNORE_INDEX} classes (255 is the ignore index)")
    palette = spec.get("palette") if isinstance(spec, dict) else None
    if palette is not None and (len(palette) != len(names) or any(len(c) != 3 for c in palette)):
        raise ValueError(f"{path}: palette must give one [r, g, b] per class")
    return tuple(names), tuple(tuple(int(v) for v in c) for c in palette) if palette else random_palette(len(names))


class Folder:
    def __init__(self, root: str | Path, classes: str | Path | None = None) -> None:
        self.root = as_path(root)
        candidates = [as_path(classes)] if classes else [self.root / n for n in ("classes.yaml", "classes.yml", "classes.json")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no class list: looked for {', '.join(map(str, candidates))}")
        names, palette = read_classes(found)
        self.info = DatasetInfo(self.root.name or "folder", names, palette)
        self.lut = label_lut({**{k: k for k in range(len(names))}, IGNORE_INDEX: IGNORE_INDEX})
        split_dirs = sorted(p.name for p in (self.root / "images").iterdir() if p.is_dir()) if (self.root / "images").is_dir() else []
        self.splits = tuple(split_dirs) or ("train",)
        self._flat = not split_dirs

    def list(self, split: str) -> list[SampleRef]:
        sub = "" if self._flat else split

        def files(kind: str, extensions: set[str]) -> dict[str, str]:
            return {p.stem: str(p) for p in sorted((self.root / kind / sub).glob("*")) if p.suffix.lower() in extensions}

        return pair_by_stem(files("images", IMAGE_EXTENSIONS), files("masks", {".png"}))

    def load(self, ref: SampleRef):
        return load_pair(ref, self.lut)
