"""Tests of s4mc.pseudo_label.PseudoLabeler (docs/method.md §3, §4, §6, §9)."""

import math

import numpy as np
import pytest
import torch

from s4mc.confidence import confidence
from s4mc.pseudo_label import STAT_KEYS, PseudoLabeler, PseudoLabels
from s4mc.refine import refine
from s4mc.threshold import dpa_threshold


def smooth_probs(B=2, C=4, H=12, W=14, seed=0):
    """Spatially coherent random predictions, like a real teacher's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H // 3 + 1, W // 3 + 1, generator=g) * 3
    logits = torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return torch.softmax(logits + 0.5 * torch.randn(B, C, H, W, generator=g), dim=1)


def data(seed=0, B=2, C=4, H=12, W=14):
    probs = smooth_probs(B, C, H, W, seed)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.ones(B, H, W, dtype=torch.bool)
    valid[:, :, -3:] = False  # right-hand padding
    gt = torch.where(torch.rand(B, H, W, generator=g) < 0.8, probs.argmax(1),
                     torch.randint(0, C, (B, H, W), generator=g))
    gt[torch.rand(B, H, W, generator=g) < 0.1] = 255
    return probs, valid, gt


def np_margin(p):
    s = np.sort(p, axis=1)
    return s[:, -1] - s[:, -2]


def test_stats_match_direct_numpy_computation():
    probs, valid, gt = data()
    out = PseudoLabeler(confidence_kind="margin", alpha0=0.4)(probs, valid, progress=0.5, gt=gt)
    assert isinstance(out, PseudoLabels) and set(out.stats) == set(STAT_KEYS)
    p, v, g = probs.numpy().astype(np.float64), valid.numpy(), gt.numpy()
    refined = refine(probs.double(), valid=valid).numpy()
    label = p.argmax(1)
    alpha = 0.4 * (1 - 0.5)
    k_raw = np_margin(p)
    gamma = np.quantile(k_raw[v], alpha, method="lower")
    keep_raw = (k_raw > gamma) & v
    keep_ref = (np_margin(refined) > gamma) & v
    measured = g != 255

    def quality(keep):
        return ((label == g) & keep & measured).sum() / (keep & measured).sum()

    s = {k: t.item() for k, t in out.stats.items()}
    assert s["pl/alpha"] == pytest.approx(alpha)
    assert s["pl/threshold"] == pytest.approx(gamma, abs=1e-6)
    assert s["pl/quantity"] == pytest.approx(keep_ref.sum() / v.sum())
    assert s["pl/quantity_no_refine"] == pytest.approx(keep_raw.sum() / v.sum())
    assert s["pl/quality"] == pytest.approx(quality(keep_ref))
    assert s["pl/quality_no_refine"] == pytest.approx(quality(keep_raw))
    np.testing.assert_array_equal(out.label.numpy(), label)
    np.testing.assert_array_equal(out.keep.numpy(), keep_ref)
    for t in out.stats.values():
        assert t.shape == () and t.is_floating_point() and t.device == probs.device
    assert out.label.dtype == torch.int64 and out.keep.dtype == torch.bool


def test_label_is_argmax_of_unrefined_probs():
    # Centre pixel: class 0 at .6 but surrounded by confident class 1 -> refined class 1 wins
    # (.4 + .99 * .6 > .6 + .01 * .4), yet the pseudo-label must stay class 0 (docs/method.md §3).
    probs = torch.tensor([0.01, 0.99]).view(1, 2, 1, 1).repeat(1, 1, 3, 3)
    probs[0, :, 1, 1] = torch.tensor([0.6, 0.4])
    refined = refine(probs)
    assert refined[0, 1, 1, 1] > refined[0, 0, 1, 1]
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    labeler = PseudoLabeler(dpa_enabled=False, fixed_threshold=0.0, fixed_confidence_kind="max")
    out = labeler(probs, valid, 0.0)
    assert out.label[0, 1, 1].item() == 0


def test_s4mc_disabled_is_exact_fixed_threshold_baseline():
    probs, valid, gt = data(seed=3)
    probs[0, :, 0, 0] = torch.tensor([0.95, 0.05, 0.0, 0.0])  # exactly at the threshold: not kept
    off = PseudoLabeler(refine_enabled=False, dpa_enabled=False, fixed_threshold=0.95,
                        fixed_confidence_kind="max")
    out = off(probs, valid, progress=0.3, gt=gt)
    torch.testing.assert_close(out.keep, (probs.max(1).values > 0.95) & valid, rtol=0, atol=0)
    assert not out.keep[0, 0, 0]
    assert math.isnan(out.stats["pl/alpha"].item())
    assert out.stats["pl/threshold"].item() == pytest.approx(0.95)
    assert out.stats["pl/quantity_no_refine"].item() == pytest.approx(
        ((probs.max(1).values > 0.95) & valid).sum().item() / valid.sum().item())


def test_refine_without_dpa_uses_fixed_kind_on_refined_scores():
    probs, valid, _ = data(seed=4)
    out = PseudoLabeler(refine_enabled=True, dpa_enabled=False, confidence_kind="margin",
                        fixed_threshold=0.9, fixed_confidence_kind="max", k=2)(probs, valid, 0.0)
    expected = (confidence(refine(probs, valid=valid, k=2), "max") > 0.9) & valid
    torch.testing.assert_close(out.keep, expected, rtol=0, atol=0)


def test_refinement_changes_quantity_with_the_same_gamma():
    # DPA's gamma comes from unrefined scores (docs/method.md §4, §9); refined max confidence is never
    # lower, so refinement must let more pixels pass than the 1 - alpha of the raw scores.
    probs, valid, _ = data(seed=5)
    on = PseudoLabeler(refine_enabled=True, confidence_kind="max")(probs, valid, 0.0)
    off = PseudoLabeler(refine_enabled=False, confidence_kind="max")(probs, valid, 0.0)
    gamma = dpa_threshold(confidence(probs, "max"), valid, 0.4)
    for out in (on, off):
        assert out.stats["pl/threshold"].item() == gamma.item()
        assert out.stats["pl/quantity"].item() > out.stats["pl/quantity_no_refine"].item()
        assert out.stats["pl/quantity_no_refine"].item() == pytest.approx(0.6, abs=0.01)
    # keep follows the switch; the statistics of both variants are reported either way
    assert on.keep.float().sum() / valid.sum() == pytest.approx(on.stats["pl/quantity"].item())
    assert off.keep.float().sum() / valid.sum() == pytest.approx(off.stats["pl/quantity_no_refine"].item())
    torch.testing.assert_close(on.stats, off.stats, rtol=0, atol=0, equal_nan=True)


def test_padding_does_not_move_gamma_and_is_never_kept():
    probs, valid, _ = data(seed=6)
    spiked = probs.clone()
    spiked[:, :, :, -3:] = 0.0
    spiked[:, 0, :, -3:] = 1.0  # padded pixels: extremely confident garbage
    labeler = PseudoLabeler()
    a, b = labeler(probs, valid, 0.1), labeler(spiked, valid, 0.1)
    assert a.stats["pl/threshold"].item() == b.stats["pl/threshold"].item()
    assert not b.keep[~valid].any()
    # padded pixels are no one's neighbour either, so the kept set inside is identical
    torch.testing.assert_close(a.keep, b.keep, rtol=0, atol=0)


def test_quality_nan_without_gt_or_without_measurable_pixels():
    probs, valid, gt = data(seed=7)
    out = PseudoLabeler()(probs, valid, 0.2)
    assert math.isnan(out.stats["pl/quality"].item()) and math.isnan(out.stats["pl/quality_no_refine"].item())
    assert math.isfinite(out.stats["pl/quantity"].item())
    out = PseudoLabeler()(probs, valid, 0.2, gt=torch.full_like(gt, 255))
    assert math.isnan(out.stats["pl/quality"].item())
    out = PseudoLabeler()(probs, torch.zeros_like(valid), 0.2, gt=gt)  # nothing valid
    assert not out.keep.any() and math.isnan(out.stats["pl/quantity"].item())


def test_no_gradient_and_no_host_sync():
    probs, valid, gt = data(seed=8)
    probs.requires_grad_(True)
    out = PseudoLabeler()(probs, valid, 0.5, gt=gt)
    assert not any(t.requires_grad for t in out.stats.values())
    # On the meta device any host read (.item(), bool(), boolean indexing) raises: none happens.
    meta = PseudoLabeler(selection="random")(torch.empty(2, 3, 5, 6, device="meta"),
                                             torch.empty(2, 5, 6, dtype=torch.bool, device="meta"), 0.5,
                                             gt=torch.empty(2, 5, 6, dtype=torch.int64, device="meta"))
    assert meta.keep.device.type == "meta" and all(t.device.type == "meta" for t in meta.stats.values())


@pytest.mark.parametrize("C", [2, 19, 81, 150])
def test_any_class_count(C):
    probs = smooth_probs(1, C, 6, 7, seed=C)
    out = PseudoLabeler(joint="expected", cooccurrence=torch.full((C,), 0.5))(
        probs, torch.ones(1, 6, 7, dtype=torch.bool), 0.0)
    assert out.keep.shape == (1, 6, 7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="confidence_kind"):
        PseudoLabeler(confidence_kind="gini")
    with pytest.raises(ValueError, match="fixed_confidence_kind"):
        PseudoLabeler(fixed_confidence_kind="gini")
    with pytest.raises(ValueError, match="alpha0"):
        PseudoLabeler(alpha0=1.5)
    with pytest.raises(ValueError, match="cooccurrence"):
        PseudoLabeler(joint="expected")
    with pytest.raises(ValueError, match="k="):
        PseudoLabeler(neighbourhood="4", k=6)
    probs, valid, gt = data()
    with pytest.raises(ValueError, match="progress"):
        PseudoLabeler()(probs, valid, 1.5)
    with pytest.raises(ValueError, match="valid"):
        PseudoLabeler()(probs, valid.long(), 0.0)
    with pytest.raises(ValueError, match="gt"):
        PseudoLabeler()(probs, valid, 0.0, gt=gt[0])


def test_half_precision_probs_refined_in_float32():
    probs, valid, _ = data(seed=9)
    half = probs.bfloat16()
    out = PseudoLabeler(confidence_kind="max")(half, valid, 0.0)
    kappa_raw = confidence(half, "max")
    gamma = dpa_threshold(kappa_raw, valid, 0.4)
    expected = (confidence(refine(half.float(), valid=valid), "max") > gamma) & valid
    torch.testing.assert_close(out.keep, expected, rtol=0, atol=0)
    assert out.stats["pl/threshold"].dtype == torch.float32


@pytest.mark.parametrize("clamp", [True, False])
def test_config_clamp_joint_reaches_refine(clamp):
    """s4mc.clamp_joint -> build_pseudo_labeler -> PseudoLabeler -> refine (docs/hosts.md)."""
    from s4mc.config import load_config
    from s4mc.train.build import build_pseudo_labeler

    cfg = load_config(overrides=["s4mc.joint=expected", f"s4mc.clamp_joint={str(clamp).lower()}",
                                 "s4mc.dpa=false", "host.threshold=0.6"])
    probs, valid, _ = data(seed=6)
    E = torch.full((4,), 0.97)  # p E_c > q for many pixels: where the cap matters
    labeler = build_pseudo_labeler(cfg, E)
    assert labeler.refine_options["clamp_joint"] is clamp
    out = labeler(probs, valid, 0.0)
    refined = refine(probs, valid=valid, joint="expected", cooccurrence=E, clamp_joint=clamp)
    torch.testing.assert_close(out.keep, (confidence(refined, "max") > 0.6) & valid, rtol=0, atol=0)
    other = refine(probs, valid=valid, joint="expected", cooccurrence=E, clamp_joint=not clamp)
    assert not torch.equal(refined, other)  # the switch changes the scores on this input


# The fast paths (s4mc/confidence.py class scan, s4mc/threshold.py selection, s4mc/refine.py pooled
# maximum, shared statistics terms) must reproduce the straightforward implementation bit for bit:
# argmax / topk / a sorted quantile / the general refinement path, statistics computed one by one.


def reference_pseudo_labels(labeler, probs, valid, progress, gt):
    from s4mc.threshold import _quantile_sort, alpha_schedule

    kind = labeler.active_kind
    p = probs.double() if probs.dtype == torch.float64 else probs.float()
    label = probs.argmax(1)

    def kappa_of(x):
        if kind == "max":
            return x.amax(1)
        if kind == "margin":
            top2 = x.topk(2, dim=1).values
            return top2[:, 0] - top2[:, 1]
        return torch.special.xlogy(x, x).sum(1)

    kappa_raw = kappa_of(p)
    if labeler.dpa_enabled:
        gamma = _quantile_sort(kappa_raw, valid, alpha_schedule(labeler.alpha0, progress))
    else:
        gamma = torch.full((), labeler.fixed_threshold, dtype=kappa_raw.dtype)
    refined = refine(p, valid=valid, _force_general=True, **labeler.refine_options)
    keep_ref = (kappa_of(refined) > gamma) & valid
    keep_raw = (kappa_raw > gamma) & valid

    def quality(keep):
        measured = keep & (gt != 255)
        return (measured & (label == gt)).sum().float() / measured.sum().float()

    stats = {"pl/quantity": keep_ref.sum().float() / valid.sum().float(), "pl/quality": quality(keep_ref),
             "pl/quantity_no_refine": keep_raw.sum().float() / valid.sum().float(),
             "pl/quality_no_refine": quality(keep_raw), "pl/threshold": gamma.float()}
    return label, keep_ref if labeler.refine_enabled else keep_raw, stats


@pytest.mark.parametrize("kind", ["margin", "max", "entropy"])
@pytest.mark.parametrize("neighbourhood", ["3x3", "4", "7x7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_paths_match_the_reference_bit_for_bit(kind, neighbourhood, dtype):
    probs, valid, gt = data(seed=11, B=3, C=6, H=13, W=17)
    probs = probs.to(dtype)
    probs[0, :, :4] = (probs[0, :, :4] * 4).round() / 4  # exact ties between classes
    valid[1, 5, 6] = True
    for dpa, ref_on in ((True, True), (False, True), (True, False)):
        labeler = PseudoLabeler(confidence_kind=kind, fixed_confidence_kind=kind, dpa_enabled=dpa,
                                refine_enabled=ref_on, neighbourhood=neighbourhood,
                                fixed_threshold=-0.5 if kind == "entropy" else 0.6)
        out = labeler(probs, valid, 0.3, gt=gt)
        label, keep, stats = reference_pseudo_labels(labeler, probs, valid, 0.3, gt)
        assert torch.equal(out.label, label) and torch.equal(out.keep, keep)
        for key, value in stats.items():
            assert torch.equal(out.stats[key], value) or (value.isnan() and out.stats[key].isnan()), key


@pytest.mark.parametrize("C", [2, 3, 255, 256, 257, 300])
def test_label_and_confidence_equals_argmax_and_topk(C):
    from s4mc.confidence import label_and_confidence

    g = torch.Generator().manual_seed(C)
    p = torch.rand(2, C, 5, 7, generator=g)
    p[0] = (p[0] * 3).round() / 3  # many ties, also of the maximum
    for kind in ("margin", "max", "entropy"):
        label, kappa = label_and_confidence(p, kind)
        assert torch.equal(label, p.argmax(1)) and label.dtype == torch.int64
        assert torch.equal(kappa, confidence(p, kind))
    top2 = p.topk(2, dim=1).values
    assert torch.equal(confidence(p, "margin"), top2[:, 0] - top2[:, 1])
    assert torch.equal(confidence(p, "max"), p.amax(1))


def test_confidence_and_quantile_stay_differentiable():
    # The CPU fast paths write into buffers; with autograd on, the fused ops run, with the same values.
    probs, valid, _ = data(seed=12)
    p = probs.clone().requires_grad_(True)
    for kind in ("margin", "max", "entropy"):
        k = confidence(p, kind)
        torch.testing.assert_close(k.detach(), confidence(probs, kind), rtol=0, atol=0)
        gamma = dpa_threshold(k, valid, 0.3)
        assert gamma.item() == dpa_threshold(k.detach(), valid, 0.3).item()
        (k.sum() + gamma).backward()
        assert p.grad is not None and torch.isfinite(p.grad).all()
        p.grad = None
