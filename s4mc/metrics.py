"""Segmentation metrics: confusion matrix, mIoU / per-class IoU / pixel accuracy, Boundary IoU (docs/method.md §6).

The confusion matrix is accumulated over the whole validation set (never averaged per batch), with
the ignore index excluded, and can be merged or saved so that distributed or resumed evaluation
counts every image exactly once (docs/method.md §9, "validation that drops images"). mIoU averages the
per-class IoU over the classes *present*, defined as the classes whose union (ground truth or
prediction) is non-empty; a class absent from both gives no 0/0 and is left out. Boundary IoU
follows Cheng et al. 2021: a mask's boundary is the mask minus its erosion by d pixels (image
borders count as background, as in the reference implementation), d = max(1, round(ratio * image
diagonal)), and the per-class IoU of the boundary regions is accumulated like the mIoU (paper
Table 9). All results are percentages in [0, 100] in ``as_metrics``, per the metric vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Cheng et al. 2021 (Boundary IoU) default: d = 2% of the image diagonal.
DEFAULT_DILATION_RATIO = 0.02


def _label_maps(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Validate and return integer label maps (pred may be B x C x H x W scores: argmax is taken)."""
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"metrics pred shape {tuple(pred.shape)} does not match target "
                         f"{tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(f"metrics pred / target must be integer label maps, got {pred.dtype} / "
                         f"{target.dtype}")
    pred, target = pred.long(), target.long()
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes))
    # One sync per evaluation batch is acceptable here (evaluation, not the training step).
    if bool(bad.any()):
        raise ValueError(f"metrics labels must lie in 0..{num_classes - 1} "
                         f"(or be ignore_index={ignore_index} in the target)")
    return pred, target


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    return num_classes


def _iou(intersection: Tensor, union: Tensor) -> Tensor:
    """Per-class IoU in [0, 1] as float64 on the CPU; NaN where the union is empty."""
    inter, uni = intersection.double().cpu(), union.double().cpu()
    return torch.where(uni > 0, inter / uni.clamp(min=1), torch.tensor(math.nan, dtype=torch.float64))


def _nanmean(x: Tensor) -> float:
    present = ~torch.isnan(x)
    return float(x[present].mean()) if bool(present.any()) else math.nan


def _all_reduce_(t: Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)


class ConfusionMatrix:
    """Accumulated C x C confusion matrix (rows: ground truth, columns: prediction), int64."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: pred / target label maps of equal shape (or pred B x C x H x W scores)."""
        C = self.num_classes
        pred, target = _label_maps(pred.to(self.matrix.device), target.to(self.matrix.device), C,
                                   self.ignore_index)
        # Ignored pixels go to an extra bin C*C that is dropped, avoiding a boolean-indexed copy.
        idx = torch.where(target != self.ignore_index, target * C + pred, C * C)
        self.matrix += torch.bincount(idx.flatten(), minlength=C * C + 1)[: C * C].view(C, C)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (another process or another part of the val set)."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, ignore_index="
                             f"{other.ignore_index}) into num_classes={self.num_classes}, "
                             f"ignore_index={self.ignore_index}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> None:
        """Sum the counts over a torch.distributed group in place (no-op without one)."""
        _all_reduce_(self.matrix)

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self.matrix.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes or tuple(state["matrix"].shape) != self.matrix.shape:
            raise ValueError(f"ConfusionMatrix state has num_classes={state['num_classes']}, "
                             f"expected {self.num_classes}")
        self.ignore_index = int(state["ignore_index"])
        self.matrix.copy_(state["matrix"])

    def iou(self) -> Tensor:
        """Per-class IoU in [0, 1] (float64, CPU); NaN for a class absent from target and prediction."""
        inter = self.matrix.diagonal()
        return _iou(inter, self.matrix.sum(0) + self.matrix.sum(1) - inter)

    def miou(self) -> float:
        """Mean IoU in [0, 1] over the classes with a non-empty union; NaN if there are none."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct / counted (non-ignored) pixels in [0, 1]; NaN before any pixel was counted."""
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan

    def as_metrics(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """``eval/mIoU``, ``eval/IoU/<name>`` and ``eval/pixel_acc`` as percentages (0-100)."""
        names = _class_names(class_names, self.num_classes)
        out = {"eval/mIoU": 100.0 * self.miou()}
        out.update({f"eval/IoU/{n}": 100.0 * float(v) for n, v in zip(names, self.iou(), strict=True)})
        out["eval/pixel_acc"] = 100.0 * self.pixel_accuracy()
        return out


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names, expected num_classes={num_classes}")
    return names


# ----------------------------------------------------------------------------------------------
# Boundary IoU


def boundary_dilation(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """d = max(1, round(ratio * image diagonal)) pixels (Cheng et al. 2021)."""
    if not dilation_ratio > 0:
        raise ValueError(f"dilation_ratio={dilation_ratio!r} must be > 0")
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def mask_boundary(masks: Tensor, dilation: int) -> Tensor:
    """Inner boundary of binary masks (N x H x W bool): the mask minus its erosion by ``dilation``.

    Erosion by a (2d+1)^2 square = max-pool of the inverted mask; the square max-pool is separable,
    so it runs as a vertical then a horizontal 1-D pool (O(d) per pixel, not O(d^2)). The inverted
    mask is padded with one row / column of 1 so that the image border counts as background, as in
    the reference implementation (cv2.copyMakeBorder with 0 before eroding).
    """
    inv = (~masks).to(torch.float32).unsqueeze(1)
    inv = F.pad(inv, (1, 1, 1, 1), value=1.0)
    k = 2 * dilation + 1
    inv = F.max_pool2d(inv, kernel_size=(k, 1), stride=1, padding=(dilation, 0))
    inv = F.max_pool2d(inv, kernel_size=(1, k), stride=1, padding=(0, dilation))
    eroded = inv[:, 0, 1:-1, 1:-1] == 0
    return masks & ~eroded


@torch.no_grad()
def boundary_counts(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    dilation_ratio: float = DEFAULT_DILATION_RATIO,
    ignore_index: int = 255,
    class_chunk: int = 16,
) -> tuple[Tensor, Tensor]:
    """Per-class (intersection, union) pixel counts of the boundary regions of one batch (int64, C).

    pred / target: B x H x W label maps (pred may be B x C x H x W scores). Ignored target pixels
    are background for the ground-truth masks and are excluded from both counts. Classes are
    processed ``class_chunk`` at a time to bound memory for 81 / 150 classes.
    """
    _check_num_classes(num_classes)
    pred, target = _label_maps(pred, target.to(pred.device), num_classes, ignore_index)
    if pred.dim() == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    B, H, W = target.shape
    d = boundary_dilation(H, W, dilation_ratio)
    counted = (target != ignore_index).unsqueeze(1)
    inter = torch.zeros(num_classes, dtype=torch.int64, device=pred.device)
    union = torch.zeros(num_classes, dtype=torch.int64, device=pred.device)
    for c0 in range(0, num_classes, class_chunk):
        classes = torch.arange(c0, min(c0 + class_chunk, num_classes), device=pred.device).view(1, -1, 1, 1)
        n = classes.shape[1]
        gt_b = mask_boundary((target.unsqueeze(1) == classes).flatten(0, 1), d).view(B, n, H, W) & counted
        pr_b = mask_boundary((pred.unsqueeze(1) == classes).flatten(0, 1), d).view(B, n, H, W) & counted
        inter[c0:c0 + n] = (gt_b & pr_b).sum(dim=(0, 2, 3))
        union[c0:c0 + n] = (gt_b | pr_b).sum(dim=(0, 2, 3))
    return inter, union


class BoundaryIoU:
    """Accumulates Boundary IoU counts over images; same merge / state contract as ConfusionMatrix."""

    def __init__(self, num_classes: int, dilation_ratio: float = DEFAULT_DILATION_RATIO,
                 ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = _check_num_classes(num_classes)
        boundary_dilation(1, 1, dilation_ratio)  # validates the ratio
        self.dilation_ratio = float(dilation_ratio)
        self.ignore_index = int(ignore_index)
        self.intersection = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.union = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.intersection.zero_()
        self.union.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of equally sized images (d is derived from this batch's H x W)."""
        dev = self.intersection.device
        inter, union = boundary_counts(pred.to(dev), target.to(dev), self.num_classes,
                                       self.dilation_ratio, self.ignore_index)
        self.intersection += inter
        self.union += union

    def merge(self, other: BoundaryIoU) -> BoundaryIoU:
        if (other.num_classes, other.dilation_ratio, other.ignore_index) != (
                self.num_classes, self.dilation_ratio, self.ignore_index):
            raise ValueError("cannot merge BoundaryIoU accumulators with different num_classes / "
                             "dilation_ratio / ignore_index")
        self.intersection += other.intersection.to(self.intersection.device)
        self.union += other.union.to(self.union.device)
        return self

    def all_reduce(self) -> None:
        _all_reduce_(self.intersection)
        _all_reduce_(self.union)

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "dilation_ratio": self.dilation_ratio,
                "ignore_index": self.ignore_index, "intersection": self.intersection.cpu().clone(),
                "union": self.union.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"BoundaryIoU state has num_classes={state['num_classes']}, "
                             f"expected {self.num_classes}")
        self.dilation_ratio = float(state["dilation_ratio"])
        self.ignore_index = int(state["ignore_index"])
        self.intersection.copy_(state["intersection"])
        self.union.copy_(state["union"])

    def iou(self) -> Tensor:
        """Per-class Boundary IoU in [0, 1] (float64, CPU); NaN where no boundary pixel was seen."""
        return _iou(self.intersection, self.union)

    def miou(self) -> float:
        """Mean Boundary IoU over classes with a non-empty boundary union; NaN if none."""
        return _nanmean(self.iou())

    def as_metrics(self, class_names: Sequence[str] | None = None, prefix: str = "eval/boundary_") -> dict:
        """``eval/boundary_mIoU`` and ``eval/boundary_IoU/<name>`` as percentages (0-100)."""
        names = _class_names(class_names, self.num_classes)
        out = {f"{prefix}mIoU": 100.0 * self.miou()}
        out.update({f"{prefix}IoU/{n}": 100.0 * float(v) for n, v in zip(names, self.iou(), strict=True)})
        return out


def boundary_iou(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    dilation_ratio: float = DEFAULT_DILATION_RATIO,
    ignore_index: int = 255,
) -> Tensor:
    """Per-class Boundary IoU in [0, 1] of one batch (float64, NaN for classes without boundary).

    For a data set, accumulate with ``BoundaryIoU`` instead: IoU of summed counts, not a mean of
    per-batch IoUs.
    """
    inter, union = boundary_counts(pred, target, num_classes, dilation_ratio, ignore_index)
    return _iou(inter, union)
