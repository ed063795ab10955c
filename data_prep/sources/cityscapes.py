"""Cityscapes in its own layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
``gtFine/{split}/{city}/*_gtFine_labelIds.png``. labelIds map to the 19 train ids with the
official table (``cityscapesscripts.helpers.labels``); every other label id maps to 255."""

from __future__ import annotations

from .base import IGNORE_INDEX, DatasetInfo, SampleRef, label_lut, load_pair, pair_by_stem
from .files import as_path

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


class Cityscapes:
    splits = ("train", "val")

    def __init__(self, root: str) -> None:
        from cityscapesscripts.helpers.labels import labels

        self.root = as_path(root)
        train = sorted((lab for lab in labels if lab.trainId not in (255, -1)), key=lambda lab: lab.trainId)
        self.info = DatasetInfo("cityscapes", tuple(lab.name for lab in train),
                                tuple(tuple(lab.color) for lab in train))
        mapping = {lab.id: (lab.trainId if lab.trainId not in (255, -1) else IGNORE_INDEX)
                   for lab in labels if lab.id >= 0}
        self.lut = label_lut(mapping)

    def list(self, split: str) -> list[SampleRef]:
        def files(kind: str, suffix: str) -> dict[str, str]:
            return {p.name[: -len(suffix)]: str(p) for p in (self.root / kind / split).glob(f"*/*{suffix}")}

        return pair_by_stem(files("leftImg8bit", IMAGE_SUFFIX), files("gtFine", LABEL_SUFFIX))

    def load(self, ref: SampleRef):
        return load_pair(ref, self.lut)
