"""Evaluation protocols: full image, centre crop (U2PL), sliding window, multi-scale and flip.

``predict`` turns normalised images into softmax probabilities with one of the published protocols
(docs/method.md §7): VOC is evaluated on the full image, Cityscapes with a sliding window (window = the
training crop, stride = ceil(2/3 window), overlapping softmax probabilities averaged), and U2PL's
training-time validation on the centre ``crop x crop`` region only. Multi-scale / flip inference
averages softmax probabilities over every scale and flip. ``evaluate`` runs a protocol over an
iterable of eval batches, accumulates one ``s4mc.metrics.ConfusionMatrix`` over all of them and
counts the images it saw, so no image is dropped or counted twice (docs/method.md §9).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import BoundaryIoU, ConfusionMatrix
from .vocab import EVAL_MODES, IGNORE_INDEX, SLIDING_STRIDE_RATIO

MODES = EVAL_MODES
DEFAULT_STRIDE_RATIO = SLIDING_STRIDE_RATIO


def _pair(size: int | Sequence[int] | None, what: str) -> tuple[int, int]:
    if size is None:
        raise ValueError(f"crop_size=None: {what} needs a positive crop_size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"crop_size={size!r}: {what} needs positive sizes")
    return h, w


def center_crop_box(height: int, width: int, crop_size: int | Sequence[int]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the centre crop that the U2PL protocol scores.

    U2PL (``u2pl/dataset/augmentation.py``, ``Crop`` with ``crop_type="center"``) pads a smaller image
    symmetrically (label 255) and takes offsets ``(size - crop) // 2``; padded pixels never count, so
    the scored region is the centre ``min(H, crop) x min(W, crop)`` window returned here.
    """
    ch, cw = _pair(crop_size, "center_crop")
    h, w = min(height, ch), min(width, cw)
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop(x: Tensor, crop_size: int | Sequence[int]) -> Tensor:
    """The centre-crop region of an image / mask / probability tensor (crops the last two dims)."""
    top, left, h, w = center_crop_box(x.shape[-2], x.shape[-1], crop_size)
    return x[..., top:top + h, left:left + w]


def _probs(model: nn.Module, x: Tensor, num_classes: int | None) -> Tensor:
    out = model(x)
    if isinstance(out, tuple | list):  # (logits, aux...) models: the first output is the prediction
        out = out[0]
    if out.dim() != 4 or out.shape[0] != x.shape[0]:
        raise ValueError(f"model output shape {tuple(out.shape)}; expected B x C x H x W for B={x.shape[0]}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"model output has {out.shape[1]} channels, expected num_classes={num_classes}")
    out = out.float()  # softmax and averaging in float32 even under autocast
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out.softmax(dim=1)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    # The last window is aligned to the far edge so every window is full-sized (mmsegmentation
    # slide_inference does the same); a length <= window was padded up to the window beforehand.
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def _sliding(model: nn.Module, x: Tensor, window: tuple[int, int], stride_ratio: float,
             num_classes: int | None) -> Tensor:
    _, _, H, W = x.shape
    wh, ww = window
    sh, sw = math.ceil(wh * stride_ratio), math.ceil(ww * stride_ratio)  # docs/method.md §7: ceil(2/3 crop)
    # Pad a side shorter than the window with 0, which is the mean colour after normalisation.
    ph, pw = max(wh - H, 0), max(ww - W, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    Hp, Wp = x.shape[-2:]
    total: Tensor | None = None
    count = torch.zeros(1, 1, Hp, Wp, device=x.device)
    for top in _window_starts(Hp, wh, sh):
        for left in _window_starts(Wp, ww, sw):
            p = _probs(model, x[..., top:top + wh, left:left + ww], num_classes)
            if total is None:
                total = torch.zeros(x.shape[0], p.shape[1], Hp, Wp, device=x.device)
            total[..., top:top + wh, left:left + ww] += p
            count[..., top:top + wh, left:left + ww] += 1
    assert total is not None
    return (total / count)[..., :H, :W]


def predict(model: nn.Module, image: Tensor, *, mode: str = "full",
            crop_size: int | Sequence[int] | None = None, stride_ratio: float = DEFAULT_STRIDE_RATIO,
            scales: Sequence[float] = (1.0,), flip: bool = False,
            num_classes: int | None = None) -> Tensor:
    """Softmax probabilities (float32) of normalised images ``B x 3 x H x W`` under one protocol.

    - ``"full"``: the whole image in one forward pass; output ``B x C x H x W``.
    - ``"sliding"``: ``crop_size`` windows with stride ``ceil(crop * stride_ratio)``, an image side
      shorter than the window padded (bottom / right) to it; overlapping probabilities are averaged.
      Output ``B x C x H x W``.
    - ``"center_crop"``: only the centre region ``center_crop_box(H, W, crop_size)`` is predicted
      (U2PL's validation): output ``B x C x h x w`` with ``h = min(H, crop)``, ``w = min(W, crop)``;
      score it against ``center_crop(mask, crop_size)``. A side shorter than the crop is padded
      symmetrically with 0 (mean colour) as U2PL does, and the padding is cut off again.

    ``scales`` / ``flip``: the image is resized (bilinear) by each scale, predicted with the mode's
    windowing, and the probabilities are resized back; with ``flip`` each scale is also predicted
    mirrored; all probability maps are averaged. ``num_classes``, when given, checks the model output.
    The caller sets eval mode / no_grad (``evaluate`` does).
    """
    _check_predict_args(mode, image, scales, stride_ratio)
    crop = _pair(crop_size, mode) if mode != "full" else None
    x, box = (_center_crop_padded(image, crop) if mode == "center_crop" else (image, None))
    H, W = x.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        xs = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            xi = xs.flip(-1) if mirrored else xs
            p = _sliding(model, xi, crop, stride_ratio, num_classes) if mode == "sliding" \
                else _probs(model, xi, num_classes)
            p = p.flip(-1) if mirrored else p
            if p.shape[-2:] != (H, W):
                p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
    assert total is not None
    probs = total / (len(scales) * (2 if flip else 1))
    if box is not None:  # cut the padding off again
        top, left, h, w = box
        probs = probs[..., top:top + h, left:left + w]
    return probs


def _check_predict_args(mode: str, image: Tensor, scales: Sequence[float], stride_ratio: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {', '.join(MODES)}")
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image: shape {tuple(image.shape)}, dtype {image.dtype}; expected normalised "
                         "float B x 3 x H x W")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales={tuple(scales)!r}: need at least one positive scale")
    if not 0 < stride_ratio <= 1:
        raise ValueError(f"stride_ratio={stride_ratio!r}: allowed (0, 1]")


def _center_crop_padded(image: Tensor, crop: tuple[int, int]) -> tuple[Tensor, tuple[int, int, int, int]]:
    """The centre crop, padded symmetrically with 0 to the crop size (U2PL's Crop border), and the box
    (top, left, h, w) of the real pixels inside the padded crop."""
    top, left, h, w = center_crop_box(image.shape[-2], image.shape[-1], crop)
    x = image[..., top:top + h, left:left + w]
    pad_h, pad_w = crop[0] - h, crop[1] - w
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return F.pad(x, pads), (pads[2], pads[0], h, w)


def _unpack(batch) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        image, mask = batch["image"], batch["mask"]
    elif isinstance(batch, tuple | list) and len(batch) >= 2:
        image, mask = batch[0], batch[1]
    else:
        raise ValueError(f"eval batch of type {type(batch).__name__}: expected a dict with 'image' and "
                         "'mask' (EvalDataset) or an (image, mask) pair")
    if image.dim() == 3:  # a single un-collated item (iterating an EvalDataset directly)
        image, mask = image.unsqueeze(0), mask.unsqueeze(0)
    if image.dtype == torch.uint8:
        raise ValueError("eval batch image is uint8: evaluate needs normalised float images "
                         "(wrap a reader in s4mc.data.EvalDataset)")
    if mask is None or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        got = None if mask is None else tuple(mask.shape)
        raise ValueError(f"eval batch mask shape {got} does not match image {tuple(image.shape)}")
    return image, mask


def evaluate(model: nn.Module, batches: Iterable, *, num_classes: int,
             class_names: Sequence[str] | None = None, mode: str = "full",
             crop_size: int | Sequence[int] | None = None, stride_ratio: float = DEFAULT_STRIDE_RATIO,
             scales: Sequence[float] = (1.0,), flip: bool = False, device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None, ignore_index: int = IGNORE_INDEX,
             expected_images: int | None = None, boundary_iou: bool = False) -> dict[str, float]:
    """mIoU / per-class IoU / pixel accuracy of ``model`` over every image in ``batches``.

    ``batches`` yields dicts ``{"image": B x 3 x H x W normalised, "mask": B x H x W, ...}`` (a
    DataLoader over ``s4mc.data.EvalDataset``) or ``(image, mask)`` pairs; un-batched items
    (``3 x H x W``) are accepted too. Images of different sizes (VOC) need batch size 1 (or a
    padding collate with mask 255), since each batch is one tensor. The model runs in eval mode under
    ``torch.inference_mode`` (its previous mode is restored) and, with ``autocast_dtype``, under
    autocast on ``device``. Returns ``eval/mIoU``, ``eval/IoU/<class>``, ``eval/pixel_acc``
    (percentages) and ``eval/num_images``; with ``expected_images`` a different count raises.
    """
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    # Boundary IoU (paper Table 9) on request: it costs an erosion per class and image.
    bcm = BoundaryIoU(num_classes, ignore_index=ignore_index, device=device) if boundary_iou else None
    seen = 0
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    try:
        with torch.inference_mode(), amp:
            for batch in batches:
                image, mask = _unpack(batch)
                image = image.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                probs = predict(model, image, mode=mode, crop_size=crop_size, stride_ratio=stride_ratio,
                                scales=scales, flip=flip, num_classes=num_classes)
                if mode == "center_crop":
                    mask = center_crop(mask, crop_size)
                pred = probs.argmax(dim=1)
                cm.update(pred, mask)
                if bcm is not None:
                    bcm.update(pred, mask)
                seen += image.shape[0]
    finally:
        model.train(was_training)
    if expected_images is not None and seen != expected_images:
        raise RuntimeError(f"evaluate saw {seen} images, expected {expected_images} (dropped or repeated)")
    metrics = cm.as_metrics(class_names)
    if bcm is not None:
        metrics.update(bcm.as_metrics(class_names))
    metrics["eval/num_images"] = float(seen)
    return metrics
