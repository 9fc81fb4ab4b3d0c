"""COCO 2017 as 81-class semantic segmentation (0 = background, 255 = crowd / ignore).

On-disk layout under the data root (the UniMatch COCO layout): ``train2017/<id>.jpg``,
``val2017/<id>.jpg``, ``annotations/instances_{train,val}2017.json`` and ``masks/<id>.png``, one
single-channel class-id mask per image for both splits. COCO ships instance polygons / RLEs, not
class masks: ``prepare_coco_masks`` builds the masks once with pycocotools (an optional dependency,
imported only there), caches them, and records the annotation file's sha256 in a marker so that a
rerun is free and masks from another annotation file are rebuilt rather than mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import IGNORE_INDEX, DataError, ListReader
from .splits import file_sha256

# The 80 "things" categories of COCO 2017 (instances_*2017.json "categories": id, name). The ids have
# gaps (12, 26, 29, ...); the class id of the semantic masks is the rank in sorted category-id order + 1.
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]
COCO_CLASSES = ["background"] + [name for _, name in sorted(COCO_CATEGORIES)]
COCO_NUM_CLASSES = len(COCO_CLASSES)  # 81: UniMatch / PseudoSeg COCO setting (docs/method.md §7)
CATEGORY_TO_CLASS = {cat_id: rank + 1 for rank, (cat_id, _) in enumerate(sorted(COCO_CATEGORIES))}
MASK_DIR = "masks"


class COCOReader(ListReader):
    """``SegmentationReader`` for COCO entries (``train2017/<id>.jpg``, ``masks/<id>.png``)."""

    name = "coco"
    class_names = COCO_CLASSES


def _marker_path(root: Path, split: str) -> Path:
    return root / MASK_DIR / f".prepared_{split}2017.json"


def prepare_coco_masks(root: str | Path, split: str, annotation_file: str | Path | None = None, *,
                       progress: bool = True) -> dict:
    """Write ``root/masks/<id>.png`` for every image of ``instances_<split>2017.json``.

    Mask rule (ours; the UniMatch release ships masks without the script that made them):
    pixels start as background 0; crowd regions (``iscrowd=1``, RLE) are painted 255 first; then the
    non-crowd instances are painted with their class id from the largest ``area`` to the smallest,
    so where objects overlap the smaller one, usually in front (a cup on a dining table), wins, and a
    labelled instance inside a crowd region keeps its class; equal areas keep file order (later wins).

    Caching: a marker ``masks/.prepared_<split>2017.json`` records the annotation file's sha256. A
    matching marker returns at once; without a marker (an interrupted build) existing masks are
    skipped; a marker for another annotation file rebuilds every mask. Files are written atomically
    (temporary name, then rename), so a killed run never leaves a half-written mask behind.
    Returns ``{"images", "written", "skipped", "cached", "annotation_sha256"}``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: allowed 'train', 'val'")
    root = Path(root)
    ann_path = Path(annotation_file) if annotation_file is not None else \
        root / "annotations" / f"instances_{split}2017.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(ann_path)!r} does not exist")
    digest = file_sha256(ann_path)
    marker = _marker_path(root, split)
    previous = json.loads(marker.read_text()) if marker.is_file() else None
    if previous is not None and previous.get("annotation_sha256") == digest:
        return {"images": previous["images"], "written": 0, "skipped": previous["images"], "cached": True,
                "annotation_sha256": digest}
    overwrite = previous is not None  # masks made from another annotation file are stale

    from pycocotools import mask as mask_utils  # optional dependency (pyproject extra "data")
    from tqdm import tqdm

    try:
        data = json.loads(ann_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read COCO annotation file {str(ann_path)!r}: {err}") from None
    unknown = sorted({c["id"] for c in data.get("categories", [])} - set(CATEGORY_TO_CLASS))
    if unknown:
        raise DataError(f"{str(ann_path)!r}: category ids {unknown[:10]} are not COCO 2017 thing categories")
    by_image: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)

    out_dir = root / MASK_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    images = data.get("images", [])
    for info in tqdm(images, desc=f"COCO {split}2017 masks", unit="img", disable=not progress):
        out = out_dir / f"{Path(info['file_name']).stem}.png"
        if out.is_file() and not overwrite:
            skipped += 1
            continue
        mask = _render(info, by_image.get(info["id"], []), mask_utils, ann_path)
        tmp = out.with_name(f".{out.name}.tmp")
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, out)
        written += 1
    marker.write_text(json.dumps({"annotation_sha256": digest, "annotation_file": str(ann_path),
                                  "images": len(images)}, indent=1))
    return {"images": len(images), "written": written, "skipped": skipped, "cached": False,
            "annotation_sha256": digest}


def _render(info: dict, anns: list[dict], mask_utils, ann_path: Path) -> np.ndarray:
    h, w = int(info["height"]), int(info["width"])
    mask = np.zeros((h, w), dtype=np.uint8)
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    things = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0)))
    for ann in crowd:
        mask[_decode(ann, h, w, mask_utils, ann_path)] = IGNORE_INDEX
    for ann in things:  # sorted() is stable: equal areas keep file order
        if ann["category_id"] not in CATEGORY_TO_CLASS:
            raise DataError(f"{str(ann_path)!r}: annotation {ann.get('id')} has unknown category id "
                            f"{ann['category_id']}")
        mask[_decode(ann, h, w, mask_utils, ann_path)] = CATEGORY_TO_CLASS[ann["category_id"]]
    return mask


def _decode(ann: dict, h: int, w: int, mask_utils, ann_path: Path) -> np.ndarray:
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):  # polygons (x0, y0, x1, y1, ...); degenerate ones carry no pixels
            polygons = [p for p in seg if len(p) >= 6]
            if not polygons:
                return np.zeros((h, w), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE (crowds)
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):  # compressed RLE
            rle = seg
        else:
            raise TypeError(f"segmentation of type {type(seg).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError) as err:
        raise DataError(f"{str(ann_path)!r}: annotation {ann.get('id')} of image {ann.get('image_id')}: "
                        f"cannot decode segmentation ({err})") from None
