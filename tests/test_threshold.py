"""Tests of s4mc.threshold: DPA quantile and alpha schedule (docs/method.md §4, §9)."""

import math

import numpy as np
import pytest
import torch

from s4mc.threshold import DEFAULT_ALPHA0, alpha_schedule, dpa_threshold, fixed_threshold


def test_alpha_schedule_endpoints():
    assert alpha_schedule(0.4, 0.0) == pytest.approx(0.4)
    assert alpha_schedule(0.4, 1.0) == 0.0
    assert alpha_schedule(0.4, 0.25) == pytest.approx(0.3)
    assert DEFAULT_ALPHA0 == 0.4
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="progress"):
            alpha_schedule(0.4, bad)
        with pytest.raises(ValueError, match="alpha0"):
            alpha_schedule(bad, 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy_lower_quantile_over_valid(seed):
    rng = np.random.default_rng(seed)
    shape = [(2, 7, 9), (1, 1, 1), (3, 1, 5), (4, 13, 11), (2, 3, 3), (1, 50, 40)][seed]
    kappa = rng.random(shape).astype(np.float32)
    kappa[rng.random(shape) < 0.3] = 0.5  # ties
    valid = rng.random(shape) < 0.6
    valid.flat[0] = True
    # Padded / ignored pixels hold extreme values: they must not move the quantile (docs/method.md §9).
    kappa_bad = kappa.copy()
    kappa_bad[~valid] = np.where(rng.random((~valid).sum()) < 0.5, -1e9, 1e9)
    for alpha in (0.0, 0.1, 0.29, 0.4, 0.5, 0.7, 0.999, 1.0):
        got = dpa_threshold(torch.from_numpy(kappa_bad), torch.from_numpy(valid), alpha)
        expected = np.quantile(kappa[valid], alpha, method="lower")
        assert got.shape == () and got.item() == expected, (alpha, shape)


def test_no_valid_pixel_gives_inf():
    kappa = torch.rand(2, 3, 3)
    gamma = dpa_threshold(kappa, torch.zeros(2, 3, 3, dtype=torch.bool), 0.4)
    assert gamma.item() == math.inf and not (kappa > gamma).any()
    assert dpa_threshold(torch.zeros(0, 3, 3), torch.zeros(0, 3, 3, dtype=torch.bool), 0.4).item() == math.inf


def test_alpha0_keeps_about_60_percent_at_start():
    kappa = torch.randperm(1001).float().view(7, 11, 13) / 1000  # distinct values
    valid = torch.ones_like(kappa, dtype=torch.bool)
    gamma = dpa_threshold(kappa, valid, alpha_schedule(0.4, 0.0))
    assert (kappa > gamma).float().mean().item() == pytest.approx(600 / 1001)
    gamma_end = dpa_threshold(kappa, valid, alpha_schedule(0.4, 1.0))
    # alpha = 0 gives the minimum: all but the minimum itself pass the strict ">" test
    assert gamma_end.item() == kappa.min().item()


def test_dtype_and_device():
    for dtype, out_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float64, torch.float64)]:
        gamma = dpa_threshold(torch.rand(2, 3, 4).to(dtype), torch.ones(2, 3, 4, dtype=torch.bool), 0.4)
        assert gamma.dtype == out_dtype and gamma.device == torch.device("cpu")


def test_no_host_sync_meta_device():
    # Meta tensors carry no data: .item(), int(tensor), boolean-mask indexing all raise on them, so
    # running on "meta" proves the computation never needs a value on the host (docs/method.md §4).
    kappa = torch.empty(2, 5, 6, device="meta")
    valid = torch.empty(2, 5, 6, dtype=torch.bool, device="meta")
    gamma = dpa_threshold(kappa, valid, 0.4)
    assert gamma.device.type == "meta" and gamma.shape == ()
    with pytest.raises((RuntimeError, NotImplementedError)):
        kappa[valid]  # sanity: the meta device does reject a data-dependent op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_cuda():
    kappa = torch.rand(2, 64, 64, device="cuda")
    valid = torch.rand(2, 64, 64, device="cuda") > 0.2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gamma = dpa_threshold(kappa, valid, 0.4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = np.quantile(kappa.cpu().numpy()[valid.cpu().numpy()], 0.4, method="lower")
    assert gamma.item() == expected


def test_bad_input():
    k, v = torch.rand(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool)
    for bad in (-0.01, 1.01, "0.4"):
        with pytest.raises(ValueError, match="alpha"):
            dpa_threshold(k, v, bad)
    with pytest.raises(ValueError, match="same shape"):
        dpa_threshold(k, v[0], 0.4)
    with pytest.raises(ValueError, match="bool"):
        dpa_threshold(k, v.long(), 0.4)


def test_fixed_threshold():
    t = fixed_threshold(0.95, "cpu")
    assert t.shape == () and t.dtype == torch.float32 and t.item() == pytest.approx(0.95)
    assert fixed_threshold(0.95, dtype=torch.float64).item() == 0.95
    with pytest.raises(ValueError, match="value"):
        fixed_threshold(math.nan)


@pytest.mark.parametrize("seed", range(4))
def test_cpu_selection_and_sort_paths_give_the_same_bits(seed):
    # dpa_threshold selects on CPU (numpy's partition) and sorts elsewhere (no host read); both must
    # return numpy's "lower" quantile exactly, with ties, padding-like extremes and empty cases.
    from s4mc.threshold import _quantile_select, _quantile_sort

    rng = np.random.default_rng(100 + seed)
    shape = [(8, 64, 64), (1, 1, 1), (3, 7, 5), (2, 33, 31)][seed]
    for dtype in (torch.float32, torch.float64):
        kappa = torch.from_numpy(rng.random(shape)).to(dtype)
        kappa[torch.from_numpy(rng.random(shape) < 0.2)] = 0.25  # ties
        valid = torch.from_numpy(rng.random(shape) < 0.7)
        kappa[~valid] = -1e30
        for alpha in (0.0, 0.13, 0.4, 0.999, 1.0):
            a, b = _quantile_select(kappa, valid, alpha), _quantile_sort(kappa, valid, alpha)
            assert a.dtype == b.dtype == dtype and a.shape == b.shape == ()
            assert torch.equal(a, b), (alpha, dtype)
            if valid.any():
                assert a.item() == np.quantile(kappa[valid].numpy(), alpha, method="lower")
        none = torch.zeros(shape, dtype=torch.bool)
        assert _quantile_select(kappa, none, 0.4).item() == _quantile_sort(kappa, none, 0.4).item() == math.inf
