"""Confidence refinement with marginal contextual information, the core of S4MC (docs/method.md §3).

For every pixel u and every class c **separately**, the score p_c(u) is raised towards the
probability that u *or* one of its neighbours v has class c: with the neighbours of u ranked per
class by the chosen rule, the update p~ <- p~ + beta_v * (p_c(v) - J(p~, p_c(v))) is applied for the
top k of them, starting from p~ = p. With the defaults (3x3 window, k = 1, beta = 1, independent
joint, max selection) this is the paper's p~_c(u) = max_v [p_c(u) + p_c(v) - p_c(u) p_c(v)].
The general implementation streams over the neighbour offsets and keeps only a running top-k per
class (k slots of key, and of weight or score where the key cannot give them back), so memory is
O(k * B*C*H*W) and never the O(N * B*C*H*W) of stacking all N shifted copies (N = 48 for 7x7); it
selects with maxima, minima and 0 / 1 ``lerp`` weights, as CPU ``torch.where`` is ~30x slower. The
paper default takes a fast path with the same bits: one separable neighbour maximum
(docs/performance.md). Neighbours outside the image or where ``valid`` is False do not exist: they
are never selected and never count as probability 0.
``estimate_cooccurrence`` measures E_c, the probability that a neighbour of a class-c pixel is also
class c, from labelled masks; it feeds the "expected" joint of any data set (docs/method.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

# docs/method.md §3: the options and their paper defaults (the first entry of each tuple) live in s4mc/vocab.py.
from .vocab import BETAS, JOINTS, NEIGHBOURHOODS, SELECTIONS, VOID_RULES  # noqa: F401 (public names)

_RADIUS = {"3x3": 1, "5x5": 2, "7x7": 3}


def neighbour_offsets(neighbourhood: str) -> list[tuple[int, int]]:
    """(dy, dx) offsets of the neighbourhood, centre excluded, in a fixed row-major order."""
    if neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(f"neighbourhood={neighbourhood!r} is not one of {NEIGHBOURHOODS}")
    if neighbourhood == "4":
        return [(-1, 0), (0, -1), (0, 1), (1, 0)]
    r = _RADIUS[neighbourhood]
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def neighbour_weight(dy: int, dx: int, beta: str) -> float:
    """beta_v of docs/method.md §3: 1, or exp(-d^2 / 2) with d the Euclidean pixel distance."""
    if beta == "one":
        return 1.0
    if beta == "decay":
        return math.exp(-(dy * dy + dx * dx) / 2.0)
    raise ValueError(f"beta={beta!r} is not one of {BETAS}")


def check_refine_options(
    neighbourhood: str = "3x3",
    k: int = 1,
    beta: str = "one",
    joint: str = "independent",
    selection: str = "max",
    cooccurrence: Tensor | None = None,
) -> None:
    """Raise ValueError naming the first bad refinement option (shared with PseudoLabeler)."""
    offsets = neighbour_offsets(neighbourhood)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(offsets):
        raise ValueError(f"k={k!r} must be an int in 1..{len(offsets)} for neighbourhood {neighbourhood!r}")
    if beta not in BETAS:
        raise ValueError(f"beta={beta!r} is not one of {BETAS}")
    if joint not in JOINTS:
        raise ValueError(f"joint={joint!r} is not one of {JOINTS}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not one of {SELECTIONS}")
    if joint == "expected" and cooccurrence is None:
        raise ValueError("joint='expected' needs cooccurrence (a length-C tensor E_c, "
                         "see estimate_cooccurrence)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision cannot resolve 1 - p near 1; float64 input (tests, references) stays exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


def refine(
    probs: Tensor,
    *,
    neighbourhood: str = "3x3",
    k: int = 1,
    beta: str = "one",
    joint: str = "independent",
    selection: str = "max",
    cooccurrence: Tensor | None = None,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
    clamp_joint: bool = True,
    _force_general: bool = False,
) -> Tensor:
    """Refined class scores p~ (same shape and dtype as ``probs``, ``B x C x H x W``); docs/method.md §3.

    selection "max" / "min" rank the neighbours of each pixel per class by descending / ascending
    neighbour score; "random" ranks them in a uniformly random order drawn from ``generator``
    (one order per pixel, shared by its classes: the ablation picks random *neighbours*).
    joint "expected" uses J = max(p q, p E_c) with ``cooccurrence`` = E_c; with ``clamp_joint`` (our
    default) J is also capped at q, the Frechet bound of a joint probability, without which
    p E_c > q would *lower* p~ (contradicting "refinement never lowers a class score", §3).
    ``valid`` (``B x H x W`` bool): pixels where it is False are no one's neighbour (padding).
    """
    if not isinstance(probs, Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        desc = f"{tuple(probs.shape)} {probs.dtype}" if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"refine probs must be a floating B x C x H x W tensor, got {desc}")
    check_refine_options(neighbourhood, k, beta, joint, selection, cooccurrence)
    B, C, H, W = probs.shape
    device, dtype = probs.device, _compute_dtype(probs.dtype)
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (B, H, W)):
        raise ValueError(f"refine valid must be a bool tensor of shape {(B, H, W)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    E = None
    if joint == "expected":
        E = torch.as_tensor(cooccurrence).to(device=device, dtype=dtype)
        if E.shape != (C,):
            raise ValueError(f"refine cooccurrence must have shape ({C},), got {tuple(E.shape)}")
        E = E.view(1, C, 1, 1)

    p = probs.to(dtype)
    # The fast path writes into buffers (out=, in place), which autograd cannot follow: a caller that
    # differentiates through refine gets the general path, with the same values.
    needs_grad = torch.is_grad_enabled() and probs.requires_grad
    if k == 1 and selection == "max" and joint == "independent" and beta == "one" and not (
            _force_general or needs_grad):
        return _refine_max_neighbour(p, valid, neighbourhood).to(probs.dtype)
    slot_q, slot_b = _top_k_neighbours(p, valid, neighbour_offsets(neighbourhood), k, beta, selection, generator,
                                       grad=needs_grad)
    out = p
    for q, b in zip(slot_q, slot_b, strict=True):
        joint_prob = out * q
        if E is not None:
            joint_prob = torch.maximum(joint_prob, out * E)
            if clamp_joint:
                joint_prob = torch.minimum(joint_prob, q)
        out = out + b * (q - joint_prob)
    return out.to(probs.dtype)


def _top_k_neighbours(p: Tensor, valid: Tensor | None, offsets: list[tuple[int, int]], k: int, beta: str,
                      selection: str, generator: torch.Generator | None,
                      grad: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """The k selected neighbours' scores q and weights beta per pixel and class, in selection order.

    A running top-k over the offsets (``_RunningTopK``) of a key: the neighbour's score ("max"), its
    negation ("min") or a random draw ("random", one per pixel, shared by its classes), and -inf
    where the neighbour does not exist.
    """
    B, C, H, W = p.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    shared_key = selection == "random"
    # 0 inside the image at valid pixels, -inf elsewhere: added to a finite key it makes the
    # neighbours that do not exist lose every comparison (exactly: x + 0 == x).
    bias = p.new_full((B, 1, H + 2 * r, W + 2 * r), -math.inf)
    inner = bias[:, :, r:r + H, r:r + W]
    inner.zero_() if valid is None else inner.masked_fill_(valid[:, None], 0.0)
    if shared_key:
        q_pad = torch.nn.functional.pad(p, (r, r, r, r))  # pad value never selected: its key is -inf
        key_pad = bias
    else:
        key_pad = torch.nn.functional.pad(p if selection == "max" else -p, (r, r, r, r)).add_(bias)
    key_shape = (B, 1, H, W) if shared_key else (B, C, H, W)
    # "one" with max / min needs no weight beside the key: b = 1 exactly where a key exists.
    top = _RunningTopK(p, key_shape, k, carry_b=beta == "decay" or shared_key, carry_q=shared_key, grad=grad)
    gen_device = generator.device if generator is not None else p.device
    for dy, dx in offsets:
        window = (slice(None), slice(None), slice(r + dy, r + dy + H), slice(r + dx, r + dx + W))
        key, q = key_pad[window], None
        if shared_key:
            # Drawn for every offset whether or not it exists, so the random stream (and with it the
            # result) depends only on the shape and the generator state.
            raw = torch.rand(key_shape, generator=generator, device=gen_device, dtype=torch.float32)
            key, q = raw.to(device=p.device, dtype=p.dtype).add_(key), q_pad[window]
        top.insert(key, neighbour_weight(dy, dx, beta), q)
    return top.scores_and_weights(selection)


class _RunningTopK:
    """Slots 0..k-1 of the largest keys so far per pixel (and class), with what the keys cannot give
    back carried beside them: the weight beta (``carry_b``) and the neighbour score (``carry_q``).

    Insertion is a sorting network of maxima and minima; the entry a new key displaces moves down to
    compete for the next slot. The carried values follow by ``lerp`` with a 0 / 1 weight, which
    selects finite values exactly, because CPU ``torch.where`` costs ~30 elementwise passes
    (docs/performance.md). Tied keys rank the earlier offset first, as in a stable sort: tied
    neighbours at different distances have different weights. Every value is written into buffers
    allocated once (out=): a fresh 1.4 MB tensor per operation cost page faults that took longer than
    the operation itself; under autograd, which cannot follow out=, each result is a new tensor.
    """

    def __init__(self, p: Tensor, key_shape: tuple[int, ...], k: int, carry_b: bool, carry_q: bool, grad: bool):
        self.p, self.k, self.carry_b, self.carry_q = p, k, carry_b, carry_q
        self.own = (lambda t: None) if grad else (lambda t: t)
        self.key = [p.new_full(key_shape, -math.inf) for _ in range(k)]
        self.spare_key, self.down_key = p.new_empty(key_shape), p.new_empty(key_shape)
        if carry_b:
            self.b = [p.new_zeros(key_shape) for _ in range(k)]
            self.spare_b, self.down_b, self.swap = (p.new_empty(key_shape) for _ in range(3))
            self.wins, self.ties, self.displaced = (torch.empty(key_shape, dtype=torch.bool, device=p.device)
                                                    for _ in range(3))
        if carry_q:
            self.q = [torch.zeros_like(p) for _ in range(k)]
            self.spare_q, self.down_q = torch.empty_like(p), torch.empty_like(p)

    def insert(self, key: Tensor, weight: float, q: Tensor | None) -> None:
        b = self.p.new_full((), weight).expand(key.shape) if self.carry_b else None
        for i in range(self.k):
            last = i + 1 == self.k
            if self.carry_b:
                self._mark_swaps(key, i, last)
                b, self.spare_b = _exchange(self.b, i, b, self.swap, self.own(self.spare_b), self.own(self.down_b),
                                            last)
                if self.carry_q:
                    q, self.spare_q = _exchange(self.q, i, q, self.swap, self.own(self.spare_q),
                                                self.own(self.down_q), last)
            new_key = torch.maximum(self.key[i], key, out=self.own(self.spare_key))
            if not last:
                key = torch.minimum(self.key[i], key, out=self.own(self.down_key))
            self.key[i], self.spare_key = new_key, self.key[i]

    def _mark_swaps(self, key: Tensor, i: int, last: bool) -> None:
        """swap = 1 where the carried entry takes slot i: the new offset needs ">"; an entry displaced
        from a slot above is older than any tie below it and needs ">="."""
        torch.gt(key, self.key[i], out=self.wins)
        if i > 0:
            self.wins.logical_or_(torch.eq(key, self.key[i], out=self.ties).logical_and_(self.displaced))
        if not last:
            self.displaced.copy_(self.wins) if i == 0 else self.displaced.logical_or_(self.wins)
        self.swap.copy_(self.wins)

    def scores_and_weights(self, selection: str) -> tuple[list[Tensor], list[Tensor]]:
        """(q, b) per slot. A slot that never got a neighbour keeps -inf and weight 0: q = 0 there, so
        its update is a no-op."""
        b = self.b if self.carry_b else [torch.gt(s, -math.inf).to(self.p.dtype) for s in self.key]
        if self.carry_q:
            return self.q, b
        if selection == "max":
            return [s.nan_to_num(nan=math.nan, posinf=math.inf, neginf=0.0) for s in self.key], b
        return [torch.neg(s).nan_to_num_(nan=math.nan, posinf=0.0, neginf=-math.inf) for s in self.key], b


def _exchange(slots: list[Tensor], i: int, carried: Tensor, swap: Tensor, spare: Tensor | None,
              down: Tensor | None, last: bool) -> tuple[Tensor | None, Tensor]:
    """Slot i takes ``carried`` where ``swap`` is 1; returns the entry that moves down (into ``down``)
    and the spare buffer (the slot's old one)."""
    new = torch.lerp(slots[i], carried, swap, out=spare)
    moving = None if last else torch.lerp(carried, slots[i], swap, out=down)
    slots[i], old = new, slots[i]
    return moving, old


def _refine_max_neighbour(p: Tensor, valid: Tensor | None, neighbourhood: str) -> Tensor:
    """The paper default (k = 1, max selection, beta = 1, independent joint) from one pooled maximum.

    U_c(u, v) = p + q - p q grows with q, so the best neighbour per class is the one with the largest
    q: p~ = p + (m - p m) with m the per-class maximum over existing neighbours, 0 where none exists
    (then p~ = p). The arithmetic is the general path's own, p + 1 * (q - p q) with the same q, so
    both paths give the same bits for finite inputs (tests/test_refine.py); this one skips the
    running top-k and costs about ten elementwise passes over p whatever the window (docs/performance.md).
    """
    m, scratch = _neighbour_max(p, valid, neighbourhood)
    # -inf marks "no existing neighbour"; nan and +inf are kept as they are (only -inf becomes 0).
    m.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)
    pm = torch.mul(p, m, out=scratch)  # reuses a dead buffer: each fresh one costs page faults
    return m.sub_(pm).add_(p)  # (m - p m) + p: the same rounding as p + (m - p m)


def _neighbour_max(p: Tensor, valid: Tensor | None, neighbourhood: str) -> tuple[Tensor, Tensor]:
    """Per-class maximum of p over the existing neighbours of each pixel (centre excluded), -inf where
    none exists, as a new tensor, with a dead p-shaped scratch view for the caller. Separable: a row
    maximum over the window's columns without the centre (hx) and with it (hc), then m = max(hc of the
    rows above and below, hx of the own row): 4r maxima for a (2r+1)^2 window instead of a masked
    select and a maximum per offset (2 ((2r+1)^2 - 1))."""
    B, C, H, W = p.shape
    r = 1 if neighbourhood == "4" else _RADIUS[neighbourhood]
    neg_inf = -math.inf
    # One padded copy with -inf outside the image and at invalid pixels: they can never be the
    # maximum, so they "do not exist". Adding 0 / -inf is exact and far cheaper than a masked where.
    q = p.new_empty((B, C, H + 2 * r, W + 2 * r))
    for border in (q[:, :, :r], q[:, :, H + r:], q[:, :, r:H + r, :r], q[:, :, r:H + r, W + r:]):
        border.fill_(neg_inf)
    inner = q[:, :, r:H + r, r:W + r]
    if valid is None:
        inner.copy_(p)
    else:
        bias = torch.zeros((B, 1, H, W), dtype=p.dtype, device=p.device).masked_fill_(~valid[:, None], neg_inf)
        torch.add(p, bias, out=inner)
    if neighbourhood == "4":
        m = torch.maximum(q[:, :, 0:H, r:W + r], q[:, :, 2:H + 2, r:W + r])
        m = torch.maximum(m, q[:, :, r:H + r, 0:W], out=m)
        return torch.maximum(m, q[:, :, r:H + r, 2:W + 2], out=m), inner
    hx = torch.maximum(q[:, :, :, 0:W], q[:, :, :, 2 * r:2 * r + W])
    for dx in range(1, r):
        hx = torch.maximum(hx, q[:, :, :, r - dx:r - dx + W], out=hx)
        hx = torch.maximum(hx, q[:, :, :, r + dx:r + dx + W], out=hx)
    # The full row maximum overwrites q's centre columns: q is not read again after this.
    hc = torch.maximum(hx, q[:, :, :, r:r + W], out=q[:, :, :, r:r + W])
    m = torch.maximum(hx[:, :, r:r + H], hc[:, :, 0:H])
    for dy in range(1, 2 * r + 1):
        if dy != r:
            m = torch.maximum(m, hc[:, :, dy:dy + H], out=m)
    return m, hx[:, :, :H]


def _as_label_tensor(mask) -> Tensor:
    t = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, Tensor) else mask
    if t.dim() not in (2, 3):
        raise ValueError("estimate_cooccurrence masks must be H x W or B x H x W, "
                         f"got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"estimate_cooccurrence masks must hold integer labels, got dtype {t.dtype}")
    return t.long()


def estimate_cooccurrence(
    masks: Tensor | np.ndarray | Iterable,
    num_classes: int,
    neighbourhood: str = "3x3",
    ignore_index: int = 255,
    void: str = "different",
) -> Tensor:
    """E_c = P(a neighbour of a class-c pixel is class c), float32 tensor of length ``num_classes``.

    ``masks``: one H x W or B x H x W label tensor / array, or an iterable of them (sizes may
    differ). Counts of (pixel, neighbour) pairs are accumulated over all masks before dividing, so
    large images weigh more, as in a pixel-level probability. Only pairs with both pixels inside the
    image and a centre pixel not equal to ``ignore_index`` count; a class never seen gets E_c = 0
    (not NaN). ``void`` decides a pair whose neighbour is ``ignore_index``: "different" counts it as
    a neighbour of another class (in the total, never in "same"), as the released estimator does;
    "exclude" drops the pair. VOC outlines every object with void, so "exclude" removes nearly every
    pair that crosses a class boundary and drives E_c of object classes to ~1 (docs/hosts.md).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"estimate_cooccurrence num_classes={num_classes!r} must be a positive int")
    if void not in VOID_RULES:
        raise ValueError(f"estimate_cooccurrence void={void!r} is not one of {VOID_RULES}")
    offsets = neighbour_offsets(neighbourhood)
    if isinstance(masks, Tensor | np.ndarray):
        masks = [masks]
    total = torch.zeros(num_classes, dtype=torch.int64)
    same = torch.zeros(num_classes, dtype=torch.int64)
    for mask in masks:
        m = _as_label_tensor(mask)
        bad = (m != ignore_index) & ((m < 0) | (m >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"estimate_cooccurrence: label {int(m[bad][0])} outside 0..{num_classes - 1} "
                             f"and not ignore_index={ignore_index}")
        H, W = m.shape[-2:]
        for dy, dx in offsets:
            # Centre pixels whose neighbour (y + dy, x + dx) lies inside the image.
            y0, y1 = max(0, -dy), H - max(0, dy)
            x0, x1 = max(0, -dx), W - max(0, dx)
            if y1 <= y0 or x1 <= x0:
                continue
            a = m[..., y0:y1, x0:x1]
            b = m[..., y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            ok = a != ignore_index
            if void == "exclude":
                ok &= b != ignore_index
            total += torch.bincount(a[ok], minlength=num_classes).cpu()
            same += torch.bincount(a[ok & (a == b)], minlength=num_classes).cpu()
    return torch.where(total > 0, same.double() / total.clamp(min=1).double(), 0.0).float()
