"""Pseudo-label thresholds: Dynamic Partition Adjustment (DPA, docs/method.md §4) and a fixed threshold.

DPA sets gamma_t to the alpha_t-quantile of the *unrefined* confidence over the valid pixels of the
current batch, with alpha_t = alpha_0 (1 - t/T) decaying linearly per iteration, so that a fraction
1 - alpha_t of the valid pixels passes before refinement. The quantile is computed entirely on the
device with tensor ops (no ``.item()``, no Python int taken from a tensor, no boolean-mask indexing),
so a training step never waits for the host (docs/method.md §4); on CPU, where there is no device to wait
for, the same value is found by selection instead of a sort. The fixed threshold (e.g. FixMatch's
0.95 on max probability) is what a host framework uses when DPA is switched off.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

# docs/method.md §4 / paper Table 6: alpha_0 = 0.4 (60% of pixels pass at the start, 100% at the end).
DEFAULT_ALPHA0 = 0.4


def _check_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def alpha_schedule(alpha0: float, progress: float) -> float:
    """alpha_t = alpha0 * (1 - progress), progress = t / T in [0, 1], t counted in iterations (§4)."""
    alpha0 = _check_unit("alpha0", alpha0)
    progress = _check_unit("progress", progress)
    return alpha0 * (1.0 - progress)


def dpa_threshold(kappa: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """The alpha-quantile of ``kappa`` over pixels where ``valid`` is True, as a 0-dim tensor.

    Quantile definition: numpy's ``method="lower"``, i.e. sorted[floor(alpha * (n - 1))] over the n
    valid values. Invalid (padded / ignored) pixels are set to +inf, which sorts them after every
    valid value, so indices 0..n-1 of the sorted vector are exactly the valid values in order and
    extreme values at invalid pixels cannot move the quantile (docs/method.md §9).
    With no valid pixel the result is +inf: ``kappa > gamma`` then keeps nothing, which is the only
    safe answer when there is nothing to take a quantile of (and it needs no host-side branch).
    The result is float32 (float64 if kappa is float64) on kappa's device.
    """
    alpha = _check_unit("alpha", alpha)
    if not isinstance(kappa, Tensor) or not isinstance(valid, Tensor) or kappa.shape != valid.shape:
        raise ValueError("dpa_threshold kappa and valid must be tensors of the same shape, got "
                         f"{getattr(kappa, 'shape', type(kappa))} and {getattr(valid, 'shape', type(valid))}")
    if valid.dtype != torch.bool:
        raise ValueError(f"dpa_threshold valid must be a bool tensor, got dtype {valid.dtype}")
    dtype = torch.float64 if kappa.dtype == torch.float64 else torch.float32
    if kappa.device.type == "cpu" and not (torch.is_grad_enabled() and kappa.requires_grad):
        return _quantile_select(kappa.to(dtype), valid, alpha)
    return _quantile_sort(kappa.to(dtype), valid, alpha)


def _quantile_sort(x: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """The quantile by a full sort, with no host read: the path on accelerators (and meta)."""
    dtype, device = x.dtype, x.device
    ordered = torch.where(valid, x, torch.full((), math.inf, dtype=dtype, device=device)).flatten().sort().values
    n = valid.sum()
    # floor((n - 1) * alpha) in float64 as numpy does (float32 would differ from numpy's index
    # for large n); clamp(min=0) covers n = 0, where ordered[0] is +inf (or the tensor is empty).
    idx_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    idx = torch.floor((n - 1).to(idx_dtype) * alpha).long().clamp(min=0)
    if ordered.numel() == 0:
        return torch.full((), math.inf, dtype=dtype, device=device)
    return ordered.gather(0, idx.view(1)).squeeze(0)


def _quantile_select(x: Tensor, valid: Tensor, alpha: float) -> Tensor:
    """The same value as the sort path, by selection (O(n), ~100x faster than a full sort at 32k
    pixels, docs/performance.md). CPU only: the count n is read on the host, which on CPU waits for
    nothing; on an accelerator it would stall the stream, hence the sort there."""
    n = int(valid.sum())
    if n == 0:
        return torch.full((), math.inf, dtype=x.dtype)
    # Python floats are IEEE float64, so this is the sort path's float64 index to the bit.
    k = max(0, math.floor((n - 1) * alpha))
    masked = x.masked_fill(~valid, math.inf)  # +inf sorts after every valid value, as above
    # numpy's introselect: ~15x faster than torch.kthvalue here (docs/performance.md); a view, no copy.
    return torch.as_tensor(np.partition(masked.flatten().numpy(), k)[k])


def fixed_threshold(
    value: float, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A constant threshold as a 0-dim tensor on ``device``; float32 by default like dpa_threshold's
    (pass the confidence's dtype so that e.g. 0.95 is not rounded differently from float64 kappa)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"fixed threshold value={value!r} must be a number")
    return torch.full((), float(value), dtype=dtype, device=device)
