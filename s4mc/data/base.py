"""Reader protocol and the three seeded datasets (labeled, unlabeled, eval) the trainer draws from.

A *reader* knows one data set on disk (or in memory) and returns raw samples: a uint8 ``3 x H x W``
image and an int64 ``H x W`` mask (ignore 255) or None. A *dataset* wraps a reader, a list of reader
indices (a split) and augmentation settings. Training datasets are indexed with ``(position, seed)``
pairs, as yielded by ``s4mc.data.sampler.StepBatchSampler``; all randomness of a sample comes from a
``torch.Generator`` seeded with that seed, so the same step of a resumed run sees identical pixels.
To add a data set (VOC, Cityscapes, COCO), write a class satisfying ``SegmentationReader``; nothing
else in this package needs to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeometricAug,
    StrongAug,
    geometric_augment,
    normalize,
    pad_fill_value,
    strong_augment,
    to_float,
)


@runtime_checkable
class SegmentationReader(Protocol):
    """Random access to the raw samples of one split of a segmentation data set.

    ``read(i)`` returns ``(image, mask)``: image uint8 ``3 x H x W`` (RGB), mask int64 ``H x W`` with
    values in ``0..num_classes-1`` or ``ignore_index``, or None when the split has no labels.
    ``item_id(i)`` is a stable, human-readable name (file stem) used in eval outputs.
    """

    name: str
    num_classes: int
    class_names: list[str]
    ignore_index: int  # always 255 (docs/architecture.md)

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[Tensor, Tensor | None]: ...

    def item_id(self, index: int) -> str: ...


class TensorReader:
    """A ``SegmentationReader`` over in-memory tensors (the embedded data set, tests, small sets).

    ``images``: uint8 ``N x 3 x H x W`` or a sequence of uint8 ``3 x H_i x W_i``; ``masks``: integer
    ``N x H x W`` / sequence of ``H_i x W_i`` (stored as given, returned as int64), or None.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, images: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor] | None,
                 *, name: str, class_names: Sequence[str], item_ids: Sequence[str] | None = None):
        self.name = name
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self._images = images
        self._masks = masks
        n = len(images)
        for i in range(n):
            img = images[i]
            if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"images[{i}]: dtype {img.dtype} shape {tuple(img.shape)}; "
                                 "expected uint8 3 x H x W")
            if masks is not None and tuple(masks[i].shape) != tuple(img.shape[1:]):
                raise ValueError(f"masks[{i}]: shape {tuple(masks[i].shape)} differs from image "
                                 f"{tuple(img.shape[1:])}")
        if masks is not None and len(masks) != n:
            raise ValueError(f"masks: {len(masks)} items for {n} images")
        if item_ids is not None and len(item_ids) != n:
            raise ValueError(f"item_ids: {len(item_ids)} ids for {n} images")
        width = len(str(max(n - 1, 0)))
        self._ids = list(item_ids) if item_ids is not None else [f"{name}_{i:0{width}d}" for i in range(n)]

    @property
    def images(self) -> Tensor | Sequence[Tensor]:
        """The stored images, as given (read-only by convention)."""
        return self._images

    @property
    def masks(self) -> Tensor | Sequence[Tensor] | None:
        """The stored masks, as given (e.g. to estimate class statistics without ``read`` calls)."""
        return self._masks

    def __len__(self) -> int:
        return len(self._images)

    def read(self, index: int) -> tuple[Tensor, Tensor | None]:
        mask = None if self._masks is None else self._masks[index].to(torch.int64)
        return self._images[index], mask

    def item_id(self, index: int) -> str:
        return self._ids[index]


def _resolve_indices(reader: SegmentationReader, indices: Sequence[int] | None) -> list[int]:
    n = len(reader)
    out = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices: {bad[:5]} out of range for reader {reader.name!r} of size {n}")
    return out


def _unpack_key(key, who: str) -> tuple[int, int]:
    # Training items must carry their seed; a bare int would silently fall back to a fixed seed.
    if not (isinstance(key, tuple | list) and len(key) == 2):
        raise ValueError(f"{who}[{key!r}]: expected a (position, seed) pair as yielded by StepBatchSampler")
    return int(key[0]), int(key[1])


class _SeededDataset(Dataset):
    def __init__(self, reader: SegmentationReader, indices: Sequence[int] | None,
                 geometric: GeometricAug, mean: Sequence[float], std: Sequence[float]):
        self.reader = reader
        self.indices = _resolve_indices(reader, indices)
        self.geometric = geometric
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.indices)

    def _geometry(self, key) -> tuple[torch.Generator, Tensor, Tensor | None, Tensor]:
        pos, seed = _unpack_key(key, type(self).__name__)
        image, mask = self.reader.read(self.indices[pos])
        g = torch.Generator().manual_seed(seed)
        image, mask, valid = geometric_augment(to_float(image), mask, self.geometric, g, self.mean)
        return g, image, mask, valid


class LabeledDataset(_SeededDataset):
    """Labeled training samples: ``{"image": float32 3 x h x w normalised, "mask": int64 h x w}``.

    The mask is 255 on crop padding and wherever the reader's mask is 255.
    """

    def __init__(self, reader: SegmentationReader, indices: Sequence[int] | None, geometric: GeometricAug,
                 *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(reader, indices, geometric, mean, std)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        _, image, mask, _ = self._geometry(key)
        if mask is None:
            raise ValueError(f"LabeledDataset: reader {self.reader.name!r} has no mask for item "
                             f"{self.reader.item_id(self.indices[key[0]])!r}")
        return {"image": normalize(image, self.mean, self.std), "mask": mask}


class UnlabeledDataset(_SeededDataset):
    """Unlabeled training samples: one weak view and ``num_strong`` (0, 1, 2) strong views.

    Keys: ``"weak"`` (geometric aug only), ``"strong1"`` / ``"strong2"`` (photometric aug of the same
    crop, so every view shares the weak view's pixel grid), ``"valid"`` bool ``h x w`` (False on crop
    padding), ``"gt"`` int64 ``h x w``: the ground truth under the same geometry, 255 where absent.
    ``gt`` exists ONLY for the pseudo-label quality metric (docs/method.md §6); frameworks must never put
    it into a loss. Images are float32 ``3 x h x w``, normalised.
    """

    def __init__(self, reader: SegmentationReader, indices: Sequence[int] | None, geometric: GeometricAug,
                 strong: StrongAug | None = None, num_strong: int = 2, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(reader, indices, geometric, mean, std)
        if num_strong not in (0, 1, 2):
            raise ValueError(f"num_strong={num_strong!r}: allowed 0, 1, 2")
        self.strong = strong if strong is not None else StrongAug()
        self.num_strong = num_strong

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        g, image, gt, valid = self._geometry(key)
        if gt is None:
            gt = torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.int64)
        out = {"weak": normalize(image, self.mean, self.std), "valid": valid, "gt": gt}
        fill = pad_fill_value(self.geometric, self.mean).view(3, 1, 1)
        for k in range(1, self.num_strong + 1):
            strong = strong_augment(image, self.strong, g)
            # Jitter / blur would bleed into the padding; restore it so padding is the same in every view.
            strong = torch.where(valid, strong, fill)
            out[f"strong{k}"] = normalize(strong, self.mean, self.std)
        return out


class EvalDataset(Dataset):
    """Full-resolution, un-augmented samples: ``{"image", "mask", "id"}``.

    Indexed by plain positions (``eval_batches`` yields them); a ``(position, seed)`` pair is accepted
    too and the seed ignored. Images of different sizes need ``batch_size=1`` or a padding collate.
    """

    def __init__(self, reader: SegmentationReader, indices: Sequence[int] | None = None, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.reader = reader
        self.indices = _resolve_indices(reader, indices)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        pos = int(key[0]) if isinstance(key, tuple | list) else int(key)
        idx = self.indices[pos]
        image, mask = self.reader.read(idx)
        if mask is None:
            raise ValueError(f"EvalDataset: reader {self.reader.name!r} has no mask for item "
                             f"{self.reader.item_id(idx)!r}")
        return {"image": normalize(to_float(image), self.mean, self.std), "mask": mask,
                "id": self.reader.item_id(idx)}
