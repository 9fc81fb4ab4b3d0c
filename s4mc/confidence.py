"""Per-pixel confidence functions kappa (method.md §2): larger always means more confident.

``confidence(probs, kind)`` maps class scores ``B x C x H x W`` to a confidence map ``B x H x W``.
The scores need not sum to 1: the same functions are applied to the refined scores p~ of
method.md §3, which are per-class upper bounds and not a distribution. The result is always
computed and returned in float32 (float64 input stays float64) because it feeds a quantile
(method.md §4): bf16 / fp16 confidences would create many exact ties and move the threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

# method.md §2; "margin" is the paper's default (paper Table F.1).
CONFIDENCE_KINDS = ("max", "entropy", "margin")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are promoted so that log / subtraction do not lose the small
    # differences a quantile threshold has to resolve; float64 is kept as it is.
    return torch.float64 if dtype == torch.float64 else torch.float32


def confidence(probs: Tensor, kind: str) -> Tensor:
    """Confidence map ``B x H x W`` of class scores ``probs`` (``B x C x H x W``).

    kind:
      * ``"max"``     -- max_c p_c
      * ``"entropy"`` -- sum_c p_c log p_c (= -H, so larger = more confident); 0 log 0 = 0
      * ``"margin"``  -- top1_c p_c - top2_c p_c (needs C >= 2)
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence kind={kind!r} is not one of {CONFIDENCE_KINDS}")
    if not isinstance(probs, Tensor) or probs.dim() != 4:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"confidence probs must be a B x C x H x W tensor, got shape {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"confidence probs must be floating point, got dtype {probs.dtype}")
    if probs.shape[1] < 1:
        raise ValueError("confidence probs has C = 0 classes; at least 1 is needed")
    p = probs.to(_compute_dtype(probs.dtype))
    if kind == "max":
        return p.amax(dim=1)
    if kind == "entropy":
        # xlogy defines 0 * log 0 = 0, so saturated (one-hot) predictions give -H = 0, not NaN.
        return torch.special.xlogy(p, p).sum(dim=1)
    if p.shape[1] < 2:
        raise ValueError(f"confidence kind='margin' needs at least 2 classes, got C = {p.shape[1]}")
    top2 = p.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]
