"""Data errors and the checked file decoding that every real-data reader shares.

A real data set fails in a handful of ways: a listed file is missing, a file is truncated or not an
image, an image and its mask differ in size, or a mask holds values that are not class ids. Each
surfaces here as a one-line error naming the file (and the split list it came from, when known), so a
broken download is found at the first read rather than as a silent drop in mIoU. ``ListReader`` is
the common ``SegmentationReader`` over ``(image relpath, mask relpath)`` entries in a root folder;
``s4mc.data.voc`` / ``cityscapes`` / ``coco`` subclass it with their class tables and mask decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from s4mc.vocab import IGNORE_INDEX  # noqa: F401 (masks use it: docs/architecture.md)

_MAX_SHOWN = 10  # bad mask values listed in an error message


class DataError(ValueError):
    """A data file exists but is unusable (corrupt, wrong size, wrong values, wrong format)."""


def source_note(source: str | None, index: int | None = None) -> str:
    """`` (entry 3 of unimatch/pascal/92/labeled.txt)`` or ``""``: where a failing file was listed."""
    if source is None:
        return ""
    return f" (entry {index} of {source})" if index is not None else f" (from {source})"


def require_file(path: Path, kind: str, source: str | None = None, index: int | None = None) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} does not exist{source_note(source, index)}")


def open_image(path: Path, kind: str, source: str | None = None, index: int | None = None) -> Image.Image:
    """Open and fully decode ``path`` (PIL decodes lazily: ``load`` is what finds a truncated file)."""
    require_file(path, kind, source, index)
    try:
        with Image.open(path) as img:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {kind} {str(path)!r}{source_note(source, index)}: "
                        f"{type(err).__name__}: {err}") from None


def read_rgb(path: Path, source: str | None = None, index: int | None = None) -> Tensor:
    """An image file -> uint8 ``3 x H x W`` RGB (grey / palette / RGBA images are converted)."""
    img = open_image(path, "image", source, index)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_index_png(path: Path, source: str | None = None, index: int | None = None) -> np.ndarray:
    """A single-channel class-id PNG ("L" / "I" / "I;16") or a palette PNG ("P") -> int64 ``H x W``.

    For a palette PNG the palette *index* is the class id (PASCAL VOC stores its masks this way:
    VOCdevkit ``SegmentationClass``), so the colours are never looked at. An RGB mask is refused: it
    would need a colour -> id table, and silently converting it to grey would give wrong ids.
    """
    img = open_image(path, "mask", source, index)
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"mask {str(path)!r}{source_note(source, index)}: mode {img.mode!r}; expected a "
                        "single-channel class-id PNG (L / I) or a palette PNG (P)")
    return np.asarray(img, dtype=np.int64)


def check_mask_values(mask: np.ndarray, num_classes: int, path: Path, source: str | None = None,
                      index: int | None = None) -> None:
    lo, hi = int(mask.min(initial=0)), int(mask.max(initial=0))
    if lo >= 0 and hi < num_classes:
        return  # the common case, without a pass over the pixel values
    if lo >= 0 and hi < 1 << 16:
        # bincount is ~15x faster than unique on a 2-Mpixel Cityscapes mask (measured: 2 ms vs 38 ms).
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=IGNORE_INDEX + 1))
    else:
        values = np.unique(mask)
    bad = values[((values >= num_classes) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:_MAX_SHOWN]) + (" ..." if bad.size > _MAX_SHOWN else "")
        raise DataError(f"mask {str(path)!r}{source_note(source, index)}: values {shown} outside "
                        f"0..{num_classes - 1} and {IGNORE_INDEX}")


class ListReader:
    """``SegmentationReader`` over ``entries`` = ``(image relpath, mask relpath or None)`` in ``root``.

    ``source`` names where the entries came from (a split list), for error messages. With
    ``with_masks=False`` (or a None mask relpath) ``read`` returns no mask and never opens one.
    Subclasses set ``name`` / ``class_names`` and may override ``load_mask`` (format conversion) and
    ``item_id``. Files are read on every call: nothing is cached, so a reader is cheap to pickle into
    DataLoader workers.
    """

    name = "list"
    class_names: list[str] = []
    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, entries: Sequence[tuple[str, str | None]], *,
                 source: str | None = None, with_masks: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name} data root {str(self.root)!r} does not exist")
        self.entries = [(str(e[0]), None if e[1] is None else str(e[1])) for e in entries]
        self.source = source
        self.with_masks = with_masks
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> Path:
        return self.root / self.entries[index][0]

    def mask_path(self, index: int) -> Path | None:
        rel = self.entries[index][1]
        return None if rel is None else self.root / rel

    def item_id(self, index: int) -> str:
        return Path(self.entries[index][0]).stem

    def load_mask(self, path: Path, index: int) -> tuple[np.ndarray, Path]:
        """Decode the mask listed at ``path`` -> (class ids int64 ``H x W``, the file actually read)."""
        return read_index_png(path, self.source, index), path

    def read(self, index: int) -> tuple[Tensor, Tensor | None]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} reader of size {len(self)}")
        index %= len(self)
        image_path = self.image_path(index)
        image = read_rgb(image_path, self.source, index)
        mask_path = self.mask_path(index) if self.with_masks else None
        if mask_path is None:
            return image, None
        mask, used = self.load_mask(mask_path, index)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise DataError(f"mask {str(used)!r}{source_note(self.source, index)}: size "
                            f"{mask.shape[1]}x{mask.shape[0]} differs from image {str(image_path)!r} "
                            f"{image.shape[2]}x{image.shape[1]} (W x H)")
        check_mask_values(mask, self.num_classes, used, self.source, index)
        return image, torch.from_numpy(mask)
