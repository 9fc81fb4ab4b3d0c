"""Per-pixel confidence functions kappa (docs/method.md §2): larger always means more confident.

``confidence(probs, kind)`` maps class scores ``B x C x H x W`` to a confidence map ``B x H x W``.
The scores need not sum to 1: the same functions are applied to the refined scores p~ of
docs/method.md §3, which are per-class upper bounds and not a distribution. The result is always
computed and returned in float32 (float64 input stays float64) because it feeds a quantile
(docs/method.md §4): bf16 / fp16 confidences would create many exact ties and move the threshold.
``label_and_confidence`` also returns the argmax, sharing one pass over the classes with kappa.
On CPU the class reductions that PyTorch does slowly across dim 1 (argmax, topk: ~100x an ``amax``
at 8x11x64x64, docs/performance.md) run as a loop over contiguous class planes; the values are
selected, never computed, so they are bit-identical to argmax / topk for NaN-free input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .vocab import CONFIDENCE_KINDS  # docs/method.md §2; the kinds and the default live in s4mc/vocab.py


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are promoted so that log / subtraction do not lose the small
    # differences a quantile threshold has to resolve; float64 is kept as it is.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_confidence_input(probs: Tensor, kind: str) -> None:
    """ValueError naming the problem unless ``probs`` (B x C x H x W, floating) can give ``kind``; the
    fused CPU kernel's callers check with it too, so both paths refuse the same input."""
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence kind={kind!r} is not one of {CONFIDENCE_KINDS}")
    if not isinstance(probs, Tensor) or probs.dim() != 4:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"confidence probs must be a B x C x H x W tensor, got shape {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"confidence probs must be floating point, got dtype {probs.dtype}")
    if probs.shape[1] < 1:
        raise ValueError("confidence probs has C = 0 classes; at least 1 is needed")
    if kind == "margin" and probs.shape[1] < 2:
        raise ValueError(f"confidence kind='margin' needs at least 2 classes, got C = {probs.shape[1]}")


def _plane_scan(p: Tensor, want_label: bool, want_second: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(argmax, top1, top2) over dim 1 by a loop over the class planes (CPU). The label moves to c only
    where x > top1, so the first maximal class wins as in argmax; top2 = max(top2, min(top1, x)) equals
    top1 on ties, as in topk."""
    top1 = p[:, 0].clone()
    # label = (label - c) * stay + c: three vectorised integer ops, ~3x cheaper than masked_fill_ or
    # where on CPU; uint8 wraps modulo 256, which is exact while every label fits in it.
    small = torch.uint8 if p.shape[1] <= 256 else torch.int32
    label = torch.zeros_like(top1, dtype=small) if want_label else None
    top2 = torch.full_like(top1, -math.inf) if want_second else None
    for c in range(1, p.shape[1]):
        x = p[:, c]
        if label is not None:
            label.sub_(c).mul_((x <= top1).to(small)).add_(c)
        if top2 is not None:
            torch.maximum(top2, torch.minimum(top1, x), out=top2)
        torch.maximum(top1, x, out=top1)
    return None if label is None else label.long(), top1, top2


def _kappa(p: Tensor, kind: str, want_label: bool) -> tuple[Tensor | None, Tensor]:
    # The scan writes into buffers (out=), which autograd cannot follow: a caller that
    # differentiates through kappa gets the fused kernels, with the same values.
    if p.device.type == "cpu" and not (torch.is_grad_enabled() and p.requires_grad):
        label, top1, top2 = _plane_scan(p, want_label, kind == "margin")
        if kind == "max":
            return label, top1
        if kind == "margin":
            return label, top1.sub_(top2)
    else:  # one fused kernel each on an accelerator (and the meta device): no per-class launches
        label = p.argmax(dim=1) if want_label else None
        if kind == "max":
            return label, p.amax(dim=1)
        if kind == "margin":
            top2 = p.topk(2, dim=1).values
            return label, top2[:, 0] - top2[:, 1]
    # xlogy defines 0 * log 0 = 0, so saturated (one-hot) predictions give -H = 0, not NaN.
    return label, torch.special.xlogy(p, p).sum(dim=1)


def confidence(probs: Tensor, kind: str) -> Tensor:
    """Confidence map ``B x H x W`` of class scores ``probs`` (``B x C x H x W``).

    kind:
      * ``"max"``     -- max_c p_c
      * ``"entropy"`` -- sum_c p_c log p_c (= -H, so larger = more confident); 0 log 0 = 0
      * ``"margin"``  -- top1_c p_c - top2_c p_c (needs C >= 2)
    """
    check_confidence_input(probs, kind)
    return _kappa(probs.to(_compute_dtype(probs.dtype)), kind, want_label=False)[1]


def label_and_confidence(probs: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(``probs.argmax(1)``, ``confidence(probs, kind)``) with the class scan shared on CPU.

    Promoting bf16 / fp16 to float32 is exact, so the argmax of the promoted scores is that of
    ``probs`` (ties included).
    """
    check_confidence_input(probs, kind)
    label, kappa = _kappa(probs.to(_compute_dtype(probs.dtype)), kind, want_label=True)
    return label, kappa
