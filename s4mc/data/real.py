"""The real data sets (PASCAL VOC, Cityscapes, COCO) behind one small factory.

``build_real_reader(name, root, entries)`` returns the ``SegmentationReader`` for ``name`` over
``entries`` (``(image relpath, mask relpath)`` pairs, as ``s4mc.data.splits.resolve_split`` returns
them). ``root`` must be a LOCAL folder: this package never talks to object storage; the orchestration
layer syncs an ``s3://`` data root to a local cache first and passes the cache path here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .cityscapes import CITYSCAPES_CLASSES, CityscapesReader
from .coco import COCO_CLASSES, COCOReader
from .errors import ListReader
from .voc import VOC_CLASSES, VOCReader

# data.name (s4mc.config.DataConfig) -> reader class. Adding a data set = one line here.
REAL_DATASETS: dict[str, type[ListReader]] = {
    "pascal": VOCReader,
    "cityscapes": CityscapesReader,
    "coco": COCOReader,
}
CLASS_NAMES: dict[str, list[str]] = {
    "pascal": VOC_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
    "coco": COCO_CLASSES,
}
NUM_CLASSES: dict[str, int] = {name: len(names) for name, names in CLASS_NAMES.items()}  # 21 / 19 / 81


def _check_name(name: str) -> None:
    if name not in REAL_DATASETS:
        raise ValueError(f"data set name={name!r}: allowed {', '.join(REAL_DATASETS)}")


def num_classes(name: str) -> int:
    _check_name(name)
    return NUM_CLASSES[name]


def class_names(name: str) -> list[str]:
    _check_name(name)
    return list(CLASS_NAMES[name])


def build_real_reader(name: str, root: str | Path, entries: Sequence[tuple[str, str | None]], *,
                      source: str | None = None, with_masks: bool = True) -> ListReader:
    """Reader for data set ``name`` over ``entries`` in the local folder ``root``.

    ``source`` names the list the entries came from (e.g. ``"unimatch/pascal/92/labeled.txt"``) and
    appears in file errors; ``with_masks=False`` never opens masks (``read`` returns ``(image, None)``).
    """
    _check_name(name)
    if "://" in str(root):
        raise ValueError(f"root={str(root)!r}: a local folder is required; sync remote data roots to a "
                         "local cache first (the orchestration layer does this)")
    return REAL_DATASETS[name](root, entries, source=source, with_masks=with_masks)
