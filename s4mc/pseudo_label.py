"""Teacher probabilities -> pseudo-labels, keep mask and the ``pl/*`` statistics (docs/method.md §3, §4, §6).

The pseudo-label is always the argmax of the *unrefined* teacher probabilities; S4MC only decides
which pixels are kept. The threshold gamma is either DPA's quantile of the unrefined confidence
(docs/method.md §4) or a fixed value (the host framework's own, e.g. FixMatch's 0.95 on max). A pixel is
kept when its confidence -- of the refined scores if refinement is on, of the raw scores otherwise
-- exceeds gamma. Refinement and DPA are independent switches, and with both off the labeler is
exactly the host's fixed-threshold baseline (docs/method.md §9). Both variants (with and without
refinement) are evaluated from the same probabilities and the same gamma on every call, so one run
yields the paper's Figure 4 curves (docs/method.md §6). Everything stays on the device: the statistics
are 0-dim tensors and nothing here synchronises with the host. On CPU the paper-default call (3x3,
k = 1, max selection, independent joint; max or margin confidence) runs as one fused C kernel
(s4mc/fused_cpu.py) with the same bits, 4.5x faster than eager, 8.8x with its AVX-512 body, as measured
(docs/performance.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import fused_cpu
from .confidence import CONFIDENCE_KINDS, check_confidence_input, confidence, label_and_confidence
from .refine import check_refine_options, refine
from .threshold import DEFAULT_ALPHA0, alpha_schedule, dpa_threshold
from .threshold import fixed_threshold as fixed_threshold_tensor
from .vocab import CPU_KERNELS

# The refinement options the fused CPU kernel implements: the paper defaults (docs/method.md §3).
_FUSED_OPTIONS = dict(neighbourhood="3x3", k=1, beta="one", joint="independent", selection="max")

STAT_KEYS = ("pl/quantity", "pl/quality", "pl/quantity_no_refine", "pl/quality_no_refine",
             "pl/threshold", "pl/alpha")


@dataclass
class PseudoLabels:
    """``label``: B x H x W int64 argmax of the unrefined probs; ``keep``: B x H x W bool;
    ``stats``: ``pl/*`` name -> 0-dim float tensor on the probs' device."""

    label: Tensor
    keep: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class PseudoLabeler:
    """S4MC pseudo-labelling with explicit switches (no global config is read).

    refine_enabled / dpa_enabled: the two switches of paper Table 8.
    confidence_kind: kappa used with DPA, for the quantile and for the keep test (default margin).
    fixed_threshold / fixed_confidence_kind: gamma and kappa used whenever DPA is off.
    alpha0: DPA's initial quantile (docs/method.md §4). neighbourhood, k, beta, joint, selection,
    cooccurrence, clamp_joint: passed to ``refine`` (docs/method.md §3). ignore_index: ground-truth value
    excluded from the quality statistic. cpu_kernel: "auto" runs the paper-default call on CPU float32
    through the fused C kernel when it builds (a warning, once, when it does not), "fused" requires it
    (and options it implements), "eager" never uses it; the results are the same bits either way.
    """

    def __init__(
        self,
        *,
        refine_enabled: bool = True,
        dpa_enabled: bool = True,
        confidence_kind: str = "margin",
        fixed_threshold: float = 0.95,
        fixed_confidence_kind: str = "max",
        alpha0: float = DEFAULT_ALPHA0,
        neighbourhood: str = "3x3",
        k: int = 1,
        beta: str = "one",
        joint: str = "independent",
        selection: str = "max",
        cooccurrence: Tensor | None = None,
        clamp_joint: bool = True,
        ignore_index: int = 255,
        cpu_kernel: str = "auto",
    ) -> None:
        kinds = (("confidence_kind", confidence_kind), ("fixed_confidence_kind", fixed_confidence_kind))
        for name, kind in kinds:
            if kind not in CONFIDENCE_KINDS:
                raise ValueError(f"PseudoLabeler {name}={kind!r} is not one of {CONFIDENCE_KINDS}")
        alpha_schedule(alpha0, 0.0)  # validates alpha0 in [0, 1]
        fixed_threshold_tensor(fixed_threshold)  # validates the value
        # The refined variant is computed even when refinement is off (for pl/quantity), so its
        # options must be valid either way.
        check_refine_options(neighbourhood, k, beta, joint, selection, cooccurrence)
        self.refine_enabled = bool(refine_enabled)
        self.dpa_enabled = bool(dpa_enabled)
        self.confidence_kind = confidence_kind
        self.fixed_threshold = float(fixed_threshold)
        self.fixed_confidence_kind = fixed_confidence_kind
        self.alpha0 = float(alpha0)
        self.refine_options = dict(neighbourhood=neighbourhood, k=k, beta=beta, joint=joint,
                                   selection=selection, cooccurrence=cooccurrence, clamp_joint=clamp_joint)
        self.ignore_index = int(ignore_index)
        if cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"PseudoLabeler cpu_kernel={cpu_kernel!r} is not one of {CPU_KERNELS}")
        options = dict(neighbourhood=neighbourhood, k=k, beta=beta, joint=joint, selection=selection)
        fused_applies = options == _FUSED_OPTIONS and self.active_kind in fused_cpu.KINDS
        if cpu_kernel == "fused" and not fused_applies:
            raise ValueError(f"PseudoLabeler cpu_kernel='fused' implements {_FUSED_OPTIONS} with confidence "
                             f"{tuple(fused_cpu.KINDS)}; got {options}, confidence {self.active_kind!r}")
        self.cpu_kernel = cpu_kernel
        self._fused: fused_cpu.FusedPseudoLabel | None = None
        self._use_fused = fused_applies and cpu_kernel != "eager"
        if cpu_kernel == "fused":
            self._fused = fused_cpu.FusedPseudoLabel(fused_cpu.load())  # KernelUnavailable says why not

    def __getstate__(self) -> dict:
        # A loaded library cannot be pickled or deep-copied; a copy loads it again on first use.
        return {**self.__dict__, "_fused": None}

    def _fused_kernel(self) -> fused_cpu.FusedPseudoLabel | None:
        """The fused kernel, built on first use under "auto"; None (and a warning, once) if it cannot be."""
        if self._fused is None and self._use_fused:
            try:
                self._fused = fused_cpu.FusedPseudoLabel(fused_cpu.load())
            except fused_cpu.KernelUnavailable as e:
                if self.cpu_kernel == "fused":
                    raise
                self._use_fused = False
                warnings.warn(f"s4mc: the fused CPU pseudo-labelling kernel is unavailable ({e}); the same "
                              "results come from the eager path, 4-9x slower (set s4mc.cpu_kernel=eager to "
                              "choose it, docs/performance.md)", RuntimeWarning, stacklevel=3)
        return self._fused

    @property
    def active_kind(self) -> str:
        """The confidence function that decides ``keep`` (DPA's kind, or the fixed threshold's)."""
        return self.confidence_kind if self.dpa_enabled else self.fixed_confidence_kind

    def __call__(
        self,
        probs: Tensor,
        valid: Tensor,
        progress: float,
        gt: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PseudoLabels:
        """Pseudo-labels of teacher ``probs`` (B x C x H x W) on pixels ``valid`` (B x H x W bool).

        progress = t / T in [0, 1] drives alpha_t. ``gt`` (B x H x W, optional) is used only for the
        quality statistics, never for the labels. ``generator`` feeds random neighbour selection.
        """
        if not isinstance(probs, Tensor) or probs.dim() != 4:
            raise ValueError("PseudoLabeler probs must be a B x C x H x W tensor, got "
                             f"{getattr(probs, 'shape', type(probs))}")
        B, _, H, W = probs.shape
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, H, W):
            raise ValueError(f"PseudoLabeler valid must be a bool tensor of shape {(B, H, W)}, "
                             f"got {getattr(valid, 'dtype', None)} {tuple(getattr(valid, 'shape', ()))}")
        if gt is not None and tuple(gt.shape) != (B, H, W):
            raise ValueError(f"PseudoLabeler gt must have shape {(B, H, W)}, got {tuple(gt.shape)}")
        alpha_t = alpha_schedule(self.alpha0, progress)
        if self._use_fused and probs.device.type == "cpu" and probs.dtype == torch.float32:
            check_confidence_input(probs, self.active_kind)  # the eager path's errors (margin needs C >= 2)
            result = self._call_fused(probs, valid, alpha_t, gt)
            if result is not None:
                return result
        # Pseudo-labels are targets: no gradient may flow back into the teacher's output.
        with torch.no_grad():
            kind = self.active_kind
            # One scan over the classes gives both the label and the raw confidence (CPU: argmax
            # and topk across dim 1 are slow there, s4mc/confidence.py).
            label, kappa_raw = label_and_confidence(probs, kind)
            if self.dpa_enabled:
                gamma = dpa_threshold(kappa_raw, valid, alpha_t)  # unrefined scores (docs/method.md §4, §9)
                alpha_stat = torch.full((), alpha_t, dtype=torch.float32, device=probs.device)
            else:
                gamma = fixed_threshold_tensor(self.fixed_threshold, probs.device, kappa_raw.dtype)
                # NaN, not 0: alpha_t = 0 would claim "DPA keeps everything", while DPA is not used.
                alpha_stat = torch.full((), math.nan, dtype=torch.float32, device=probs.device)
            # Padded / ignored pixels are nobody's neighbour: their teacher output is meaningless.
            # Refined scores stay float32: rounding them back to bf16 (resolution ~0.004 near 1)
            # would decide "kappa > gamma" on coarser values than gamma itself was taken from.
            p = probs if probs.dtype == torch.float64 else probs.float()
            refined = refine(p, valid=valid, generator=generator, **self.refine_options)
            kappa_ref = confidence(refined, kind)
            del refined
            keep_ref = (kappa_ref > gamma).logical_and_(valid)
            keep_raw = (kappa_raw > gamma).logical_and_(valid)
            keep = keep_ref if self.refine_enabled else keep_raw
            # The with / without refinement statistics share every term that does not depend on keep.
            n_valid = valid.sum().float()
            quality = self._quality_terms(label, gt)
            stats = {
                "pl/quantity": keep_ref.sum().float() / n_valid,
                "pl/quality": quality(keep_ref),
                "pl/quantity_no_refine": keep_raw.sum().float() / n_valid,
                "pl/quality_no_refine": quality(keep_raw),
                "pl/threshold": gamma.float(),
                "pl/alpha": alpha_stat,
            }
        return PseudoLabels(label=label, keep=keep, stats=stats)

    def _call_fused(self, probs: Tensor, valid: Tensor, alpha_t: float, gt: Tensor | None) -> PseudoLabels | None:
        """The call through the fused kernel; None where it cannot compute it (no kernel, or probabilities
        outside [+0, 1], -0.0 and NaN included), and the eager path then gives the result."""
        kernel = self._fused_kernel()
        if kernel is None:
            return None
        out = kernel(probs.detach(), valid, gt, kind=self.active_kind, alpha=alpha_t if self.dpa_enabled else None,
                     gamma_fixed=self.fixed_threshold, refine_enabled=self.refine_enabled,
                     ignore_index=self.ignore_index)
        if out is None:
            return None
        label, keep, values = out
        alpha_stat = alpha_t if self.dpa_enabled else math.nan
        stats = dict(zip(STAT_KEYS[:5], values, strict=True))
        stats["pl/alpha"] = torch.full((), alpha_stat, dtype=torch.float32)
        return PseudoLabels(label=label, keep=keep, stats=stats)

    def _quality_terms(self, label: Tensor, gt: Tensor | None):
        """keep -> accuracy of the kept labels against gt on kept, non-ignored pixels (docs/method.md §6);
        NaN if none is measured or there is no gt. The gt masks are built once for both variants."""
        if gt is None:
            nan = torch.full((), math.nan, dtype=torch.float32, device=label.device)
            return lambda keep: nan
        measurable = gt != self.ignore_index
        correct = measurable & (label == gt)

        def quality(keep: Tensor) -> Tensor:
            # 0 / 0 = NaN in floating point: "nothing to measure" without a host-side branch.
            return (correct & keep).sum().float() / (measurable & keep).sum().float()
        return quality
