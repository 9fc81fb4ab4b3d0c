"""Cityscapes fine annotations: 19 train ids, 255 ignore.

On-disk layout under the data root (cityscapesScripts README, "Dataset Structure"):
``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png``. The labelTrainIds files are what the
split lists name; cityscapesScripts' ``createTrainIdLabelImgs`` makes them. Where only the official
``*_gtFine_labelIds.png`` files exist, they are converted on read with the label table below, so the
package ``cityscapesscripts`` is not needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import IGNORE_INDEX, DataError, ListReader, read_index_png, source_note

# cityscapesScripts, cityscapesscripts/helpers/labels.py, the ``labels`` table: (id, name, trainId),
# trainId 255 = not evaluated. "license plate" (id -1) is never written into labelIds images.
CITYSCAPES_LABELS = [
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18),
]
CITYSCAPES_CLASSES = [name for _, name, train_id in sorted(CITYSCAPES_LABELS, key=lambda x: x[2])
                      if train_id != IGNORE_INDEX]
CITYSCAPES_NUM_CLASSES = len(CITYSCAPES_CLASSES)  # 19
_MAX_LABEL_ID = max(i for i, _, _ in CITYSCAPES_LABELS)  # 33

# labelId -> trainId lookup over every uint8 value; ids outside the table stay marked (-1) so that a
# file that is not a labelIds image is reported instead of quietly becoming "ignore".
LABEL_ID_TO_TRAIN_ID = np.full(256, -1, dtype=np.int64)
for _id, _, _train in CITYSCAPES_LABELS:
    LABEL_ID_TO_TRAIN_ID[_id] = _train

_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train_ids(label_ids: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Official labelIds (0..33) -> train ids (0..18, 255). Other values raise ``DataError``."""
    label_ids = np.asarray(label_ids)
    bad = np.unique(label_ids[(label_ids < 0) | (label_ids > _MAX_LABEL_ID)])
    if bad.size:
        raise DataError(f"labelIds mask {str(path)!r}: values {', '.join(map(str, bad[:10]))} are not "
                        f"Cityscapes label ids (0..{_MAX_LABEL_ID})")
    return LABEL_ID_TO_TRAIN_ID[label_ids]


class CityscapesReader(ListReader):
    """``SegmentationReader`` for Cityscapes fine entries; see the module docstring for layout."""

    name = "cityscapes"
    class_names = CITYSCAPES_CLASSES

    def item_id(self, index: int) -> str:
        stem = Path(self.entries[index][0]).stem
        return stem.removesuffix("_leftImg8bit")

    def load_mask(self, path: Path, index: int) -> tuple[np.ndarray, Path]:
        if path.name.endswith(_LABEL_IDS_SUFFIX):
            return label_ids_to_train_ids(read_index_png(path, self.source, index), path), path
        if not path.is_file() and path.name.endswith(_TRAIN_IDS_SUFFIX):
            label_ids = path.with_name(path.name[: -len(_TRAIN_IDS_SUFFIX)] + _LABEL_IDS_SUFFIX)
            if label_ids.is_file():
                return label_ids_to_train_ids(read_index_png(label_ids, self.source, index),
                                              label_ids), label_ids
            raise FileNotFoundError(f"mask {str(path)!r} does not exist, nor its labelIds form "
                                    f"{label_ids.name!r}{source_note(self.source, index)}")
        return read_index_png(path, self.source, index), path

