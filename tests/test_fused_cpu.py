"""The fused CPU kernel (s4mc/fused_cpu.py, s4mc/kernels/fused_pl.c) computes what the eager path
computes: label, keep mask and every pl/* statistic equal PseudoLabeler(cpu_kernel="eager")'s bit for
bit, on random, saturated, tied and masked inputs, with DPA and with a fixed threshold, with and without
refinement and ground truth; where it cannot compute, the eager path answers, and "fused" says why."""

import math
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


def _inputs(seed, B=3, C=6, H=9, W=37, saturate=False, quantise=False, invalid=0.2):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, C, H, W, generator=g) * (12 if saturate else 3)).softmax(1)
    if quantise:  # many exact ties between classes, neighbours and confidences
        probs = (probs * 4).round() / 4
    valid = torch.rand(B, H, W, generator=g) >= invalid
    gt = torch.randint(0, C, (B, H, W), generator=g)
    gt[torch.rand(B, H, W, generator=g) < 0.1] = 255
    return probs.contiguous(), valid, gt


def _same(a, b):
    assert torch.equal(a.label, b.label), "label differs"
    assert torch.equal(a.keep, b.keep), "keep differs"
    for key in STAT_KEYS:
        x, y = float(a.stats[key]), float(b.stats[key])
        assert x == y or (math.isnan(x) and math.isnan(y)), f"{key}: {x!r} != {y!r}"


CASES = [dict(), dict(saturate=True), dict(quantise=True), dict(invalid=0.9), dict(B=1, C=2, H=1, W=1),
         dict(H=64, W=64, C=11), dict(H=2, W=130, C=3)]


@pytest.mark.parametrize("kind", ["margin", "max"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("switches", [dict(), dict(refine_enabled=False), dict(dpa_enabled=False),
                                      dict(refine_enabled=False, dpa_enabled=False)])
def test_fused_equals_eager(kind, case, switches):
    kinds = dict(confidence_kind=kind, fixed_confidence_kind=kind, fixed_threshold=0.55)
    fused = PseudoLabeler(cpu_kernel="fused", **kinds, **switches)
    eager = PseudoLabeler(cpu_kernel="eager", **kinds, **switches)
    for seed in range(3):
        probs, valid, gt = _inputs(seed, **case)
        for progress in (0.0, 0.3, 1.0):
            for g in (gt, None):
                _same(eager(probs, valid, progress, gt=g), fused(probs, valid, progress, gt=g))


def test_the_fused_path_is_taken_and_the_comparison_can_fail():
    probs, valid, gt = _inputs(4)
    fused = PseudoLabeler(cpu_kernel="fused")
    fused._fused.phase_s.zero_()
    out = fused(probs, valid, 0.3, gt=gt)
    assert float(fused._fused.phase_s.sum()) > 0  # the kernel ran and timed its phases
    with pytest.raises(AssertionError, match="differs|!="):
        _same(PseudoLabeler(cpu_kernel="eager", neighbourhood="5x5")(probs, valid, 0.3, gt=gt), out)


def test_no_valid_pixel_keeps_nothing_with_an_infinite_threshold():
    probs, valid, gt = _inputs(0)
    valid[:] = False
    got = PseudoLabeler(cpu_kernel="fused")(probs, valid, 0.0, gt=gt)
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.0, gt=gt), got)
    assert float(got.stats["pl/threshold"]) == math.inf and not got.keep.any()


def test_probabilities_outside_the_unit_interval_go_the_eager_way():
    probs, valid, gt = _inputs(2)
    probs[0, 0, 0, 0] = math.nan
    probs[1, 1, 1, 1] = 1.5
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt),
          PseudoLabeler(cpu_kernel="fused")(probs, valid, 0.3, gt=gt))


def test_non_contiguous_probabilities_and_uint8_ground_truth():
    probs, valid, gt = _inputs(3, W=40)
    probs = probs[..., 1:39]
    valid, gt = valid[..., 1:39], gt[..., 1:39].to(torch.uint8)
    _same(PseudoLabeler(cpu_kernel="eager")(probs, valid, 0.3, gt=gt),
          PseudoLabeler(cpu_kernel="fused")(probs, valid, 0.3, gt=gt))


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
