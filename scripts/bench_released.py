"""Our own re-implementations of the two released S4MC pseudo-labelling formulations, for timing only.

Written from their descriptions in docs/performance.md ("The released formulations"), not copied:
both take the same teacher probabilities, valid mask, alpha and ground truth as our `PseudoLabeler`
and compute the same outputs (label, keep, quantity and quality with and without refinement), so
`scripts/bench_refine.py` times like against like. They reproduce the released code's *cost*
structure (stacked shifted copies, a quantile on the host), including the known defects of the
released code that matter for speed; nobody should train with them.

- `class_agnostic`: the UniMatch-based release. One class-agnostic map kappa = max_c p_c is refined
  over the 3x3 window (zero padding) by stacking the 8 shifted copies, kappa~ = max_v kappa + q -
  kappa q; the threshold is the alpha-quantile of the raw kappa taken with `torch.quantile` on the
  host (a device-to-host copy on an accelerator).
- `u2pl_expected`: the U2PL-based release. Per class, each of the 4 neighbours gives p + beta (q -
  max(p q, p E_c)) with beta = exp(-1/2) and no cap; the refined score is the maximum over the 4; kappa
  is the margin (topk); the threshold is `np.percentile` of the raw margin after a host copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255
_WINDOW_3X3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_FOUR = [(-1, 0), (0, -1), (0, 1), (1, 0)]


def _shifted(padded: Tensor, dy: int, dx: int, h: int, w: int) -> Tensor:
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _stats(label: Tensor, keep_ref: Tensor, keep_raw: Tensor, valid: Tensor, gt: Tensor) -> dict[str, Tensor]:
    n = valid.sum().float()
    out = {}
    for suffix, keep in (("", keep_ref), ("_no_refine", keep_raw)):
        measured = keep & (gt != IGNORE)
        out["pl/quantity" + suffix] = keep.sum().float() / n
        out["pl/quality" + suffix] = (measured & (label == gt)).sum().float() / measured.sum().float()
    return out


def _margin(p: Tensor) -> Tensor:
    top2 = p.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def class_agnostic(probs: Tensor, valid: Tensor, alpha: float, gt: Tensor):
    label = probs.argmax(1)
    kappa = probs.amax(1)
    h, w = kappa.shape[-2:]
    padded = F.pad(kappa, (1, 1, 1, 1))
    q = torch.stack([_shifted(padded, dy, dx, h, w) for dy, dx in _WINDOW_3X3])
    refined = (kappa + q - kappa * q).amax(0)
    gamma = torch.quantile(kappa[valid].cpu(), alpha).to(kappa.device)
    keep = (refined > gamma) & valid
    return label, keep, _stats(label, keep, (kappa > gamma) & valid, valid, gt)


def u2pl_expected(probs: Tensor, valid: Tensor, alpha: float, gt: Tensor, cooccurrence: Tensor):
    label = probs.argmax(1)
    kappa = _margin(probs)
    h, w = probs.shape[-2:]
    padded = F.pad(probs, (1, 1, 1, 1))
    e = cooccurrence.view(1, -1, 1, 1)
    beta = math.exp(-0.5)
    candidates = []
    for dy, dx in _FOUR:
        q = _shifted(padded, dy, dx, h, w)
        candidates.append(probs + beta * (q - torch.maximum(probs * q, probs * e)))
    refined = torch.stack(candidates).amax(0)
    gamma = float(np.percentile(kappa.cpu().numpy()[valid.cpu().numpy()], alpha * 100))
    keep = (_margin(refined) > gamma) & valid
    return label, keep, _stats(label, keep, (kappa > gamma) & valid, valid, gt)
