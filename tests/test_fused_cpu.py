"""The fused CPU kernel (s4mc/fused_cpu.py, s4mc/kernels/fused_pl.c) computes what the eager path
computes: label, keep mask and every pl/* statistic equal PseudoLabeler(cpu_kernel="eager")'s bit for
bit, on random, saturated, tied and masked inputs, with DPA and with a fixed threshold, with and without
refinement and ground truth; where it cannot compute, the eager path answers, and "fused" says why."""

import math
import struct
import subprocess
import sys
import warnings

import pytest
import torch

from s4mc import fused_cpu
from s4mc.pseudo_label import STAT_KEYS, PseudoLabeler


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("S4MC_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    fused_cpu.load.cache_clear()
    yield
    mp.undo()
    fused_cpu.load.cache_clear()


def _inputs(seed, B=3, C=6, H=9, W=37, saturate=False, quantise=False, invalid=0.2, uniform=False,
            negative_zero=False, zero_pixels=0.0):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, C, H, W, generator=g) * (12 if saturate else 3)).softmax(1)
    if quantise:  # many exact ties between classes, neighbours and confidences
        probs = (probs * 4).round() / 4
    if uniform:  # every confidence equal: the DPA selection has one distinct key
        probs = torch.full_like(probs, 1.0 / C)
    if zero_pixels:  # pixels whose every class is 0, so their confidence (and the DPA quantile) is 0
        probs = probs * (torch.rand(B, 1, H, W, generator=g) >= zero_pixels)
    if negative_zero:  # -0.0 is in [0, 1]; maxima of +0 and -0 depend on the order they are taken in
        sign = torch.rand(B, C, H, W, generator=g) < 0.5
        probs = torch.where((probs == 0) & sign, torch.tensor(-0.0), probs.abs())
    valid = torch.rand(B, H, W, generator=g) >= invalid
    gt = torch.randint(0, C, (B, H, W), generator=g)
    gt[torch.rand(B, H, W, generator=g) < 0.1] = 255
    return probs.contiguous(), valid, gt


def _same(a, b):
    assert torch.equal(a.label, b.label), "label differs"
    assert torch.equal(a.keep, b.keep), "keep differs"
    for key in STAT_KEYS:  # the bits, so that -0.0 and +0.0 differ; any NaN equals any NaN
        x, y = float(a.stats[key]), float(b.stats[key])
        same_bits = struct.pack("<f", x) == struct.pack("<f", y)
        assert same_bits or (math.isnan(x) and math.isnan(y)), f"{key}: {x!r} != {y!r}"


# Widths around the AVX-512 body's 16-pixel strips (15, 16, 17, 37, 64, 130) and 1 x 1 images.
CASES = [dict(), dict(saturate=True), dict(quantise=True), dict(invalid=0.9), dict(B=1, C=2, H=1, W=1),
         dict(H=64, W=64, C=11), dict(H=2, W=130, C=3), dict(H=3, W=16, C=4), dict(H=5, W=17, C=5),
         dict(H=4, W=15, C=3, saturate=True), dict(uniform=True), dict(quantise=True, negative_zero=True),
         dict(negative_zero=True, zero_pixels=0.6)]
BODIES = ["native", "portable"]


def _labeler(body, **options):
    """A fused PseudoLabeler whose kernel is the native build (AVX-512 where the CPU has it) or the
    plain-C body, which CPUs without AVX-512 run."""
    labeler = PseudoLabeler(cpu_kernel="fused", **options)
    if body == "portable":
        labeler._fused = fused_cpu.FusedPseudoLabel(fused_cpu.load(portable=True))
    return labeler


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("kind", ["margin", "max"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("switches", [dict(), dict(refine_enabled=False), dict(dpa_enabled=False),
                                      dict(refine_enabled=False, dpa_enabled=False)])
def test_fused_equals_eager(body, kind, case, switches):
    kinds = dict(confidence_kind=kind, fixed_confidence_kind=kind, fixed_threshold=0.55)
    fused = _labeler(body, **kinds, **switches)
    eager = PseudoLabeler(cpu_kernel="eager", **kinds, **switches)
    for seed in range(3):
        probs, valid, gt = _inputs(seed, **case)
        for progress in (0.0, 0.3, 1.0):
            for g in (gt, None):
                _same(eager(probs, valid, progress, gt=g), fused(probs, valid, progress, gt=g))


def test_the_native_build_takes_the_avx512_body_where_the_cpu_has_it():
    flags = set(fused_cpu._cpu_flags().split())
    native = fused_cpu.FusedPseudoLabel(fused_cpu.load()).variant
    assert native == ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "portable")
    assert fused_cpu.FusedPseudoLabel(fused_cpu.load(portable=True)).variant == "portable"


def test_the_fused_path_is_taken_and_the_comparison_can_fail():
    probs, valid, gt = _inputs(4)
    fused = PseudoLabeler(cpu_kernel="fused")
    fused._fused.phase_s.zero_()
    out = fused(probs, valid, 0.3, gt=gt)
    assert float(fused._fused.phase_s.sum()) > 0  # the kernel ran and timed its phases
    with pytest.raises(AssertionError, match="differs|!="):
        _same(PseudoLabeler(cpu_kernel="eager", neighbourhood="5x5")(probs, valid, 0.3, gt=gt), out)


@pytest.mark.parametrize("body", BODIES)
def test_no_valid_pixel_keeps_nothing_with_an_infinite_threshold(body):
    probs, valid, gt = _inputs(0)
    valid[:] = False
    got = _labeler(body)(probs, valid, 0.0, gt=gt)
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.0, gt=gt), got)
    assert float(got.stats["pl/threshold"]) == math.inf and not got.keep.any()


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("where, value", [((0, 0, 0, 0), math.nan), ((1, 1, 1, 1), 1.5), ((2, 5, 8, 36), -0.5),
                                          ((1, 2, 3, 4), -0.0), ((0, 0, 0, 0), math.inf),
                                          ((1, 3, 2, 7), 1.0 + 2.0 ** -23)])  # the float32 after 1
def test_probabilities_outside_the_unit_interval_go_the_eager_way(body, where, value):
    probs, valid, gt = _inputs(2)
    probs[where] = value  # the last pixel of the last class of the last image too
    labeler = _labeler(body)
    assert labeler._fused(probs, valid, gt, kind="margin", alpha=0.3, gamma_fixed=0.0, refine_enabled=True,
                          ignore_index=255) is None  # the kernel reports it
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt), labeler(probs, valid, 0.3, gt=gt))


@pytest.mark.parametrize("body", BODIES)
def test_the_ends_of_the_unit_interval_stay_in_the_kernel(body):
    probs, valid, gt = _inputs(2)
    probs[0, :, 0, 0], probs[0, 3, 0, 0] = 0.0, 1.0  # +0 and 1 exactly, in the first strip
    probs[1, :, 5, 9], probs[1, 0, 5, 9] = 0.0, 1.0
    labeler = _labeler(body)
    assert labeler._fused(probs, valid, gt, kind="margin", alpha=0.3, gamma_fixed=0.0, refine_enabled=True,
                          ignore_index=255) is not None
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt), labeler(probs, valid, 0.3, gt=gt))


@pytest.mark.parametrize("C, kind, match", [(1, "margin", "needs at least 2 classes"), (0, "max", "C = 0")])
def test_too_few_classes_are_refused_as_the_eager_path_refuses_them(C, kind, match):
    probs, valid, gt = torch.full((2, C, 4, 5), 1.0), torch.ones(2, 4, 5, dtype=torch.bool), None
    for cpu_kernel in ("eager", "fused"):
        with pytest.raises(ValueError, match=match):
            PseudoLabeler(cpu_kernel=cpu_kernel, confidence_kind=kind)(probs, valid, 0.3, gt=gt)


@pytest.mark.parametrize("body", BODIES)
def test_non_contiguous_probabilities_and_uint8_ground_truth(body):
    probs, valid, gt = _inputs(3, W=40)
    probs = probs[..., 1:39]
    valid, gt = valid[..., 1:39], gt[..., 1:39].to(torch.uint8)
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt), _labeler(body)(probs, valid, 0.3, gt=gt))


@pytest.mark.parametrize("options, match", [
    (dict(neighbourhood="5x5"), "cpu_kernel='fused' implements"),
    (dict(confidence_kind="entropy"), "confidence 'entropy'"),
    (dict(cpu_kernel="gpu"), "cpu_kernel='gpu' is not one of"),
])
def test_bad_choices_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        PseudoLabeler(**{"cpu_kernel": "fused", **options})


def test_a_missing_compiler_is_named_for_fused_and_warned_once_for_auto(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    fused_cpu.load.cache_clear()
    with pytest.raises(fused_cpu.KernelUnavailable, match="no-such-cc"):
        PseudoLabeler(cpu_kernel="fused")
    probs, valid, gt = _inputs(5)
    auto = PseudoLabeler()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = auto(probs, valid, 0.3, gt=gt), auto(probs, valid, 0.3, gt=gt)
    assert [str(w.message) for w in seen if "fused CPU" in str(w.message)] and len(seen) == 1
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt), first)
    _same(first, second)
    fused_cpu.load.cache_clear()


def test_a_copy_loads_the_kernel_again():
    import copy
    import pickle
    probs, valid, gt = _inputs(6)
    labeler = PseudoLabeler(cpu_kernel="fused")
    for twin in (copy.deepcopy(labeler), pickle.loads(pickle.dumps(labeler))):
        assert twin._fused is None
        _same(labeler(probs, valid, 0.3, gt=gt), twin(probs, valid, 0.3, gt=gt))
        assert twin._fused is not None


def test_concurrent_first_builds_share_one_cache_file(tmp_path):
    code = ("import torch; from s4mc.pseudo_label import PseudoLabeler; "
            "p = torch.rand(1, 3, 4, 8).softmax(1); v = torch.ones(1, 4, 8, dtype=torch.bool); "
            "PseudoLabeler(cpu_kernel='fused')(p, v, 0.1)")
    env = {"S4MC_KERNEL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    built = list(tmp_path.iterdir())  # one library, no private build file left behind
    assert len(built) == 1 and built[0].name.startswith("fused_pl-"), built
