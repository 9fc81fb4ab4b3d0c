"""Data layer: readers, seeded datasets, transforms, step-indexed sampling and the embedded data set.

A trainer builds datasets from a ``SegmentationReader`` and a split, and draws training batches with
``StepBatchSampler`` (``(position, seed)`` keys) so that every random draw of step t derives from
``(seed, t)``; evaluation uses ``EvalDataset`` with ``eval_batches``. Batch-level CutMix lives in
``transforms`` (``cutmix_boxes`` + ``apply_cutmix``), seeded with ``make_generator(seed, tag, step)``.
"""

from .base import EvalDataset, LabeledDataset, SegmentationReader, TensorReader, UnlabeledDataset
from .embedded import CLASS_NAMES, EMBEDDED_VERSION, SPLITS, EmbeddedData, make_embedded, save_preview
from .sampler import StepBatchSampler, derive_seed, eval_batches, make_generator
from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeometricAug,
    StrongAug,
    apply_cutmix,
    cutmix_box,
    cutmix_boxes,
    geometric_augment,
    normalize,
    strong_augment,
)

__all__ = [
    "CLASS_NAMES",
    "EMBEDDED_VERSION",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "EmbeddedData",
    "EvalDataset",
    "GeometricAug",
    "LabeledDataset",
    "SegmentationReader",
    "StepBatchSampler",
    "StrongAug",
    "TensorReader",
    "UnlabeledDataset",
    "apply_cutmix",
    "cutmix_box",
    "cutmix_boxes",
    "derive_seed",
    "eval_batches",
    "geometric_augment",
    "make_embedded",
    "make_generator",
    "normalize",
    "save_preview",
    "strong_augment",
]
