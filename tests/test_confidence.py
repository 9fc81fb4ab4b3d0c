"""Tests of s4mc.confidence (docs/method.md §2)."""

import math

import numpy as np
import pytest
import torch

from s4mc.confidence import CONFIDENCE_KINDS, confidence


def _probs(B=2, C=5, H=3, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, C, H, W, generator=g), dim=1)


def test_kinds_exported():
    assert set(CONFIDENCE_KINDS) == {"max", "entropy", "margin"}


def test_hand_values():
    p = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1)
    assert confidence(p, "max").item() == pytest.approx(0.6)
    assert confidence(p, "margin").item() == pytest.approx(0.3)
    expected = 0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)
    assert confidence(p, "entropy").item() == pytest.approx(expected, rel=1e-6)


def test_against_numpy_random():
    p = _probs()
    a = p.numpy().astype(np.float64)
    s = np.sort(a, axis=1)
    np.testing.assert_allclose(confidence(p, "max"), a.max(1), rtol=1e-6)
    np.testing.assert_allclose(confidence(p, "margin"), s[:, -1] - s[:, -2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(confidence(p, "entropy"), (a * np.log(a)).sum(1), rtol=1e-5)


def test_shape_and_ordering():
    p = _probs(B=3, C=4, H=5, W=2)
    for kind in CONFIDENCE_KINDS:
        assert confidence(p, kind).shape == (3, 5, 2)
    # A one-hot pixel is maximally confident for every kind; a uniform pixel least.
    onehot = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    uniform = torch.full((1, 4, 1, 1), 0.25)
    for kind in CONFIDENCE_KINDS:
        assert confidence(onehot, kind).item() > confidence(uniform, kind).item()


def test_entropy_safe_at_zero():
    p = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    out = confidence(p, "entropy")
    assert torch.isfinite(out).all() and out.item() == 0.0


def test_unnormalised_refined_scores():
    # Refined scores do not sum to 1 (docs/method.md §3); all kinds still work and stay finite.
    p = torch.tensor([0.9, 0.8, 0.05]).view(1, 3, 1, 1)
    assert confidence(p, "max").item() == pytest.approx(0.9)
    assert confidence(p, "margin").item() == pytest.approx(0.1)
    assert math.isfinite(confidence(p, "entropy").item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype):
    p = _probs().to(dtype)
    out = confidence(p, "margin")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, confidence(p.float(), "margin").to(out.dtype))


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        confidence(_probs(), "variance")
    with pytest.raises(ValueError, match="B x C x H x W"):
        confidence(torch.rand(3, 4, 5), "max")
    with pytest.raises(ValueError, match="2 classes"):
        confidence(torch.ones(1, 1, 2, 2), "margin")
    with pytest.raises(ValueError, match="floating"):
        confidence(torch.ones(1, 2, 2, 2, dtype=torch.int64), "max")
