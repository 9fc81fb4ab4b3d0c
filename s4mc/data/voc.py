"""PASCAL VOC 2012 with the SBD augmented masks (21 classes, 255 = boundary / ignore).

On-disk layout under the data root: ``JPEGImages/<id>.jpg`` and the class masks, either
``SegmentationClassAug/<id>.png`` (SBD-augmented, single-channel class ids; the U2PL layout) or
``SegmentationClass/<id>.png`` (UniMatch ships the same augmented masks there; the original VOC
devkit keeps its 2,913 fine masks there as palette PNGs). A palette PNG's index is the class id, so
both encodings decode to the same ids without a colour table. Because the two families' split lists
name different mask folders for the same masks, a listed mask that is absent is looked up in the
sibling folder before failing, so either download works with either family's lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ListReader, read_index_png

# VOCdevkit VOC2012 development kit documentation, section "Classes" (index 0 = background; the order
# is the class-id order of SegmentationClass / SegmentationClassAug masks).
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
VOC_NUM_CLASSES = len(VOC_CLASSES)  # 21
_SIBLING_MASK_DIRS = {"SegmentationClass": "SegmentationClassAug",
                      "SegmentationClassAug": "SegmentationClass"}


def voc_palette(n: int = 256) -> list[int]:
    """The VOC colour map (VOCdevkit ``VOClabelcolormap.m``): flat ``[r0, g0, b0, r1, ...]``, n entries.

    Used to write palette PNGs in the devkit's format (fixtures, prediction dumps); reading never
    needs it.
    """
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


class VOCReader(ListReader):
    """``SegmentationReader`` for VOC 2012 (+ SBD aug) entries; see the module docstring for layout."""

    name = "pascal"
    class_names = VOC_CLASSES

    def load_mask(self, path: Path, index: int) -> tuple[np.ndarray, Path]:
        if not path.is_file():
            sibling = _sibling(path)
            if sibling is not None and sibling.is_file():
                path = sibling
        # A still-missing file raises FileNotFoundError naming the listed path.
        return read_index_png(path, self.source, index), path


def _sibling(path: Path) -> Path | None:
    other = _SIBLING_MASK_DIRS.get(path.parent.name)
    return None if other is None else path.parent.parent / other / path.name
