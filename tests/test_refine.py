"""Tests of s4mc.refine: marginal-contextual refinement and E_c estimation (docs/method.md §3, §9)."""

import itertools
import math

import numpy as np
import pytest
import torch

from s4mc.refine import BETAS, JOINTS, NEIGHBOURHOODS, SELECTIONS, estimate_cooccurrence, refine

# An independent, deliberately slow reference: plain Python loops over images, pixels, classes and
# neighbours, straight from the text of docs/method.md §3.


def ref_offsets(neighbourhood):
    if neighbourhood == "4":
        return [(0, 1), (1, 0), (0, -1), (-1, 0)]
    r = {"3x3": 1, "5x5": 2, "7x7": 3}[neighbourhood]
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy != 0 or dx != 0]


def ref_existing(valid, b, y, x, neighbourhood):
    H, W = valid.shape[1:]
    res = []
    for dy, dx in ref_offsets(neighbourhood):
        yy, xx = y + dy, x + dx
        if 0 <= yy < H and 0 <= xx < W and valid[b, yy, xx]:
            res.append((yy, xx, math.exp(-(dy * dy + dx * dx) / 2)))
    return res


def ref_update(v, chosen, beta, joint, e_c):
    """Apply the update for the chosen neighbours [(q, weight_decay)] in order."""
    for q, w in chosen:
        wt = 1.0 if beta == "one" else w
        j = v * q
        if joint == "expected":
            j = min(max(v * q, v * e_c), q)
        v = v + wt * (q - j)
    return v


def ref_refine(p, valid, neighbourhood, k, beta, joint, selection, E=None):
    p = np.asarray(p, dtype=np.float64)
    B, C, H, W = p.shape
    valid = np.ones((B, H, W), bool) if valid is None else np.asarray(valid)
    out = p.copy()
    for b in range(B):
        for y in range(H):
            for x in range(W):
                nbrs = ref_existing(valid, b, y, x, neighbourhood)
                for c in range(C):
                    cands = [(p[b, c, yy, xx], w) for yy, xx, w in nbrs]
                    cands.sort(key=lambda t: t[0], reverse=(selection == "max"))
                    e_c = None if E is None else float(E[c])
                    out[b, c, y, x] = ref_update(p[b, c, y, x], cands[:k], beta, joint, e_c)
    return out


def rand_probs(B, C, H, W, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64), 1).to(dtype)


def rand_valid(B, H, W, seed=0, frac=0.75):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(B, H, W, generator=g) < frac


E3 = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)

# Reference comparison over every deterministic option combination.


@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
@pytest.mark.parametrize("selection", ["max", "min"])
def test_matches_reference_all_options(neighbourhood, selection):
    p = rand_probs(2, 3, 4, 5, seed=1)
    valid = rand_valid(2, 4, 5, seed=1)
    for k, beta, joint in itertools.product([1, 2, 3], BETAS, JOINTS):
        for v in (None, valid):
            got = refine(p, neighbourhood=neighbourhood, k=k, beta=beta, joint=joint, selection=selection,
                         cooccurrence=E3, valid=v)
            ref = ref_refine(p, v, neighbourhood, k, beta, joint, selection, E3)
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-12,
                                       err_msg=f"{k} {beta} {joint} valid={v is not None}")


@pytest.mark.parametrize("neighbourhood", ["3x3", "5x5"])
def test_ties_keep_the_earlier_offset(neighbourhood):
    # Scores on a grid of eighths tie often (exact 0 and 1 included); with decay the tied neighbours
    # have different weights, so the slot that keeps the earlier offset (the reference's stable sort)
    # decides the value. The general path carries the weights beside max / min keys.
    p = (rand_probs(2, 3, 6, 7, seed=11) * 8).round() / 8
    valid = rand_valid(2, 6, 7, seed=11)
    for k, selection, v in itertools.product([1, 2, 3], ["max", "min"], [None, valid]):
        got = refine(p, neighbourhood=neighbourhood, k=k, beta="decay", joint="expected", selection=selection,
                     cooccurrence=E3, valid=v)
        ref = ref_refine(p, v, neighbourhood, k, "decay", "expected", selection, E3)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-12, err_msg=f"{k} {selection} {v is not None}")


@pytest.mark.parametrize("shape", [(1, 6), (6, 1), (1, 1), (2, 2)])
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
def test_degenerate_shapes_match_reference(shape, neighbourhood):
    H, W = shape
    p = rand_probs(2, 3, H, W, seed=2)
    for k, selection in itertools.product([1, 3], ["max", "min"]):
        got = refine(p, neighbourhood=neighbourhood, k=k, beta="decay", joint="expected", selection=selection,
                     cooccurrence=E3)
        np.testing.assert_allclose(got.numpy(), ref_refine(p, None, neighbourhood, k, "decay", "expected",
                                                           selection, E3), atol=1e-12)
    if H == W == 1:  # no neighbour exists at all: nothing changes
        torch.testing.assert_close(refine(p), p)


def test_exported_option_names():
    assert NEIGHBOURHOODS[0] == "3x3" and set(NEIGHBOURHOODS) == {"4", "3x3", "5x5", "7x7"}
    assert BETAS[0] == "one" and JOINTS[0] == "independent" and SELECTIONS[0] == "max"
    assert set(SELECTIONS) == {"max", "min", "random"}


# Hand-computed cases on a 3x3 image (class 0 below; class 1 = 1 - class 0).

P0 = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]], dtype=torch.float64)


def two_class(p0):
    return torch.stack([p0, 1 - p0]).unsqueeze(0)


def test_hand_k1_max_independent():
    # best in-image neighbour per pixel of class 0, then p + q (1 - p)
    expected0 = torch.tensor([[0.1 + 0.5 * 0.9, 0.2 + 0.6 * 0.8, 0.3 + 0.6 * 0.7],
                              [0.4 + 0.8 * 0.6, 0.5 + 0.9 * 0.5, 0.6 + 0.9 * 0.4],
                              [0.7 + 0.8 * 0.3, 0.8 + 0.9 * 0.2, 0.9 + 0.8 * 0.1]], dtype=torch.float64)
    out = refine(two_class(P0))
    torch.testing.assert_close(out[0, 0], expected0)
    # class 1 at the centre: best neighbour is the corner (0, 0) with 0.9 -> 0.5 + 0.9 * 0.5;
    # at corner (0, 0): best neighbour (0, 1) with 0.8 -> 0.9 + 0.8 * 0.1
    assert out[0, 1, 1, 1].item() == pytest.approx(0.95)
    assert out[0, 1, 0, 0].item() == pytest.approx(0.98)


def test_hand_decay_beta():
    # k = 1 selects by neighbour score; the weight is exp(-d^2/2): e^-1/2 axis, e^-1 diagonal.
    out = refine(two_class(P0), beta="decay")[0, 0]
    e1, e2 = math.exp(-0.5), math.exp(-1.0)
    assert out[1, 1].item() == pytest.approx(0.5 + e2 * (0.9 - 0.5 * 0.9))  # winner (2, 2), diagonal
    assert out[0, 0].item() == pytest.approx(0.1 + e2 * (0.5 - 0.1 * 0.5))  # winner (1, 1), diagonal
    assert out[1, 0].item() == pytest.approx(0.4 + e2 * (0.8 - 0.4 * 0.8))  # winner (2, 1), diagonal
    assert out[0, 2].item() == pytest.approx(0.3 + e1 * (0.6 - 0.3 * 0.6))  # winner (1, 2), axis
    assert out[2, 1].item() == pytest.approx(0.8 + e1 * (0.9 - 0.8 * 0.9))  # winner (2, 2), axis
    assert out[0, 1].item() == pytest.approx(0.2 + e2 * (0.6 - 0.2 * 0.6))  # winner (1, 2), diagonal


def test_hand_expected_joint():
    E = torch.tensor([0.8, 0.3], dtype=torch.float64)
    out = refine(two_class(P0), joint="expected", cooccurrence=E)
    # corner (0,0), class 0: p = .1, q = .5: J = max(.05, .08) = .08 -> .1 + .5 - .08
    assert out[0, 0, 0, 0].item() == pytest.approx(0.52)
    # centre, class 0: p = .5, q = .9: J = max(.45, .40) = .45 -> .95 (independent product wins)
    assert out[0, 0, 1, 1].item() == pytest.approx(0.95)
    # 1 x 2 image, E = .9: pixel 0 (p = .9, q = .1): p E = .81 > q, J is capped at q = .1 -> p stays .9
    # (uncapped it would drop to .19); pixel 1 (p = .1, q = .9): J = max(.09, .09) -> .91
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).view(1, 2, 1, 2)
    E2 = torch.tensor([0.9, 0.9], dtype=torch.float64)
    out = refine(p, neighbourhood="4", joint="expected", cooccurrence=E2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.9, 0.91], dtype=torch.float64))
    raw = refine(p, neighbourhood="4", joint="expected", cooccurrence=E2, clamp_joint=False)
    assert raw[0, 0, 0, 0].item() == pytest.approx(0.19)


def test_hand_k2_max():
    # centre class 0, two best neighbours .9 then .8: .5 -> .95 -> .95 + .8 * .05 = .99
    out = refine(two_class(P0), k=2)
    assert out[0, 0, 1, 1].item() == pytest.approx(0.99)


# Invariants (docs/method.md §3, §9)


def all_options():
    for nb, k, beta, joint, sel in itertools.product(NEIGHBOURHOODS, [1, 2, 3], BETAS, JOINTS, SELECTIONS):
        yield dict(neighbourhood=nb, k=k, beta=beta, joint=joint, selection=sel)


def test_never_lowers_and_stays_in_unit_interval():
    p = rand_probs(2, 4, 6, 7, seed=3)
    E = torch.tensor([0.95, 0.6, 0.2, 0.0], dtype=torch.float64)
    valid = rand_valid(2, 6, 7, seed=3)
    for opts in all_options():
        out = refine(p, cooccurrence=E, valid=valid, generator=torch.Generator().manual_seed(0), **opts)
        assert out.shape == p.shape and out.dtype == p.dtype
        assert (out >= p - 1e-12).all(), opts
        assert (out <= 1 + 1e-12).all() and (out >= 0).all(), opts


def test_batch_equals_images_alone():
    p = rand_probs(3, 4, 5, 6, seed=4)
    valid = rand_valid(3, 5, 6, seed=4)
    E = torch.tensor([0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    for opts in all_options():
        if opts["selection"] == "random":
            continue
        batch = refine(p, cooccurrence=E, valid=valid, **opts)
        alone = [refine(p[i:i + 1], cooccurrence=E, valid=valid[i:i + 1], **opts) for i in range(3)]
        alone = torch.cat(alone)
        torch.testing.assert_close(batch, alone, rtol=0, atol=0)


def test_per_class_winner_differs():
    # Class 0's best neighbour is on the left, class 1's on the right: both classes rise at the centre.
    # A class-agnostic max-confidence map (docs/method.md §9) would raise at most one of them.
    p = torch.tensor([[[0.9, 0.2, 0.1]], [[0.1, 0.2, 0.9]], [[0.0, 0.6, 0.0]]], dtype=torch.float64)
    out = refine(p.unsqueeze(0))[0, :, 0, 1]
    expected = torch.tensor([0.2 + 0.9 * 0.8, 0.2 + 0.9 * 0.8, 0.6], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def neighbour_max(p, neighbourhood="3x3"):
    """max over in-image neighbours of p (centre excluded), -inf where none exists."""
    B, C, H, W = p.shape
    best = torch.full_like(p, -math.inf)
    for dy, dx in ref_offsets(neighbourhood):
        shifted = torch.full_like(p, -math.inf)
        ys, yd = (slice(dy, H), slice(0, H - dy)) if dy >= 0 else (slice(0, H + dy), slice(-dy, H))
        xs, xd = (slice(dx, W), slice(0, W - dx)) if dx >= 0 else (slice(0, W + dx), slice(-dx, W))
        shifted[:, :, yd, xd] = p[:, :, ys, xs]
        best = torch.maximum(best, shifted)
    return best


@pytest.mark.parametrize("C", [2, 3, 19, 21, 81, 150])
def test_closed_form_any_class_count(C):
    p = rand_probs(2, C, 4, 5, seed=C)
    out = refine(p)
    torch.testing.assert_close(out, p + (1 - p) * neighbour_max(p))
    E = estimate_cooccurrence(p.argmax(1), C)
    assert E.shape == (C,) and torch.isfinite(E).all()
    assert refine(p, joint="expected", cooccurrence=E, k=2).shape == p.shape


def test_border_uses_only_in_image_neighbours():
    # Corner (0, 0): in-image neighbours of class 0 are .5/.6/.7. The min rule must pick .5 there;
    # a zero padding counted as a neighbour would win the min and leave the corner unchanged.
    p0 = torch.full((4, 4), 0.3, dtype=torch.float64)
    p0[0, 1], p0[1, 0], p0[1, 1] = 0.5, 0.6, 0.7
    out = refine(two_class(p0), selection="min")
    assert out[0, 0, 0, 0].item() == pytest.approx(0.3 + 0.5 * 0.7)
    # And with all in-image neighbours at 0 for class 0, the corner stays exactly unchanged, even
    # for a padding convention that would suggest a large value (e.g. replicate: p itself).
    p0 = torch.full((4, 4), 0.9, dtype=torch.float64)
    p0[0, 0], p0[0, 1], p0[1, 0], p0[1, 1] = 0.4, 0.0, 0.0, 0.0
    for sel in SELECTIONS:
        assert refine(two_class(p0), selection=sel, k=3)[0, 0, 0, 0].item() == 0.4


def test_invalid_neighbours_do_not_exist():
    p0 = torch.full((3, 3), 0.2, dtype=torch.float64)
    p0[0, 0] = 0.99
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    out = refine(two_class(p0), valid=valid)[0, 0]
    assert out[1, 1].item() == pytest.approx(0.2 + 0.2 * 0.8)  # not 0.2 + 0.99 * 0.8
    # min rule: an invalid neighbour must not count as probability 0 either
    p0 = torch.full((3, 3), 0.5, dtype=torch.float64)
    p0[0, 0] = 0.0
    out = refine(two_class(p0), valid=valid, selection="min")[0, 0]
    assert out[1, 1].item() == pytest.approx(0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    p = rand_probs(2, 5, 6, 6, seed=5)
    out = refine(p.to(dtype), k=2, beta="decay")
    assert out.dtype == dtype
    ref = refine(p.to(dtype).double(), k=2, beta="decay")
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)


BAD_OPTIONS = [
    ("neighbourhood", dict(neighbourhood="9x9")), ("k=", dict(neighbourhood="4", k=5)), ("k=", dict(k=0)),
    ("beta", dict(beta="linear")), ("joint", dict(joint="copula")), ("selection", dict(selection="median")),
    ("cooccurrence", dict(joint="expected")), ("cooccurrence", dict(joint="expected", cooccurrence=torch.ones(4))),
    ("valid", dict(valid=torch.ones(1, 4, 4))),
]


@pytest.mark.parametrize("match,options", BAD_OPTIONS)
def test_bad_options(match, options):
    with pytest.raises(ValueError, match=match):
        refine(rand_probs(1, 3, 4, 4), **options)
    with pytest.raises(ValueError, match="B x C x H x W"):
        refine(rand_probs(1, 3, 4, 4)[0])


# Random selection: properties and seeding


def test_random_seeding():
    p = rand_probs(2, 3, 5, 5, seed=6)

    def run(seed, **kw):
        return refine(p, selection="random", generator=torch.Generator().manual_seed(seed), **kw)

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))
    torch.testing.assert_close(run(3, k=2, beta="decay"), run(3, k=2, beta="decay"), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_random_is_some_valid_choice(k):
    # Each pixel's result equals the update with SOME ordered k-tuple of distinct existing neighbours,
    # the same tuple for every class (one random order per pixel).
    p = rand_probs(1, 3, 3, 4, seed=7)
    valid = rand_valid(1, 3, 4, seed=7, frac=0.7)
    out = refine(p, selection="random", k=k, valid=valid, beta="decay",
                 generator=torch.Generator().manual_seed(0)).numpy()
    pn, vn = p.numpy(), valid.numpy()
    for y, x in itertools.product(range(3), range(4)):
        nbrs = ref_existing(vn, 0, y, x, "3x3")
        tuples = list(itertools.permutations(nbrs, min(k, len(nbrs))))
        ok = any(
            all(abs(out[0, c, y, x] - ref_update(pn[0, c, y, x], [(pn[0, c, yy, xx], w) for yy, xx, w in t],
                                                 "decay", "independent", None)) < 1e-12 for c in range(3))
            for t in tuples)
        assert ok, (y, x)


@pytest.mark.parametrize("beta", BETAS)
def test_random_with_all_neighbours_is_order_free(beta):
    # With every neighbour applied, p + w q (1 - p) composes to 1 - (1 - p) prod(1 - w q): any order.
    p = rand_probs(2, 3, 4, 4, seed=8)
    valid = rand_valid(2, 4, 4, seed=8)
    gen = torch.Generator().manual_seed(5)
    out = refine(p, selection="random", k=8, beta=beta, valid=valid, generator=gen)
    pn, vn = p.numpy(), valid.numpy()
    for b, y, x, c in itertools.product(range(2), range(4), range(4), range(3)):
        prod = 1.0
        for yy, xx, w in ref_existing(vn, b, y, x, "3x3"):
            prod *= 1 - (1.0 if beta == "one" else w) * pn[b, c, yy, xx]
        assert out[b, c, y, x].item() == pytest.approx(1 - (1 - pn[b, c, y, x]) * prod, abs=1e-12)


def test_random_reaches_every_neighbour():
    # 400 independent copies of a 3x3 image: the centre's chosen neighbour (identified by its unique
    # score) covers all 8 neighbours, roughly uniformly.
    q = torch.arange(1, 10, dtype=torch.float64).view(3, 3) / 20
    q[1, 1] = 0.0
    p = two_class(q).expand(400, 2, 3, 3).contiguous()
    out = refine(p, selection="random", generator=torch.Generator().manual_seed(0))[:, 0, 1, 1]
    chosen = torch.round(out * 20).long()  # centre p = 0, so the result is the neighbour's score
    counts = torch.bincount(chosen, minlength=10)[[1, 2, 3, 4, 6, 7, 8, 9]]
    assert counts.sum() == 400 and (counts > 20).all(), counts


# estimate_cooccurrence


def ref_cooccurrence(masks, C, neighbourhood, ignore=255, void="different"):
    same, total = np.zeros(C), np.zeros(C)
    for m in masks:
        m = np.asarray(m)
        H, W = m.shape
        for y, x in itertools.product(range(H), range(W)):
            if m[y, x] == ignore:
                continue
            for dy, dx in ref_offsets(neighbourhood):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W and (void == "different" or m[yy, xx] != ignore):
                    total[m[y, x]] += 1
                    same[m[y, x]] += m[yy, xx] == m[y, x]
    return np.where(total > 0, same / np.maximum(total, 1), 0.0)


def test_cooccurrence_hand():
    m = torch.tensor([[0, 0], [1, 255]])
    # Each 0 has neighbours {0, 1, void} in 3x3: a void neighbour counts as "different" by default.
    np.testing.assert_allclose(estimate_cooccurrence(m, 3), [1 / 3, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(estimate_cooccurrence(m, 3, neighbourhood="4"), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(estimate_cooccurrence(m, 3, void="exclude"), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(estimate_cooccurrence(m, 3, neighbourhood="4", void="exclude"),
                               [2 / 3, 0.0, 0.0], rtol=1e-6)
    # A void centre pixel is skipped under both rules: all-void masks count nothing.
    for void in ("different", "exclude"):
        assert torch.equal(estimate_cooccurrence(torch.full((3, 3), 255), 2, void=void), torch.zeros(2))


@pytest.mark.parametrize("void", ["different", "exclude"])
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
def test_cooccurrence_matches_reference(neighbourhood, void):
    rng = np.random.default_rng(0)
    masks = []
    for H, W in [(5, 7), (1, 4), (6, 1), (8, 8)]:
        m = rng.integers(0, 4, size=(H, W))
        m[rng.random((H, W)) < 0.2] = 255
        masks.append(m)
    masks[-1][:4] = 2  # a large same-class region so E differs between classes
    got = estimate_cooccurrence(masks, 5, neighbourhood=neighbourhood, void=void)
    ref = ref_cooccurrence(masks, 5, neighbourhood, void=void)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    assert got[4] == 0 and torch.isfinite(got).all()  # class 4 never appears: 0, not NaN
    # A B x H x W tensor is the same as its images listed one by one.
    batch = torch.as_tensor(np.stack([masks[-1], masks[-1]]))
    torch.testing.assert_close(estimate_cooccurrence(batch, 5, neighbourhood),
                               estimate_cooccurrence([masks[-1]] * 2, 5, neighbourhood))


def test_cooccurrence_bad_input():
    with pytest.raises(ValueError, match="label 7"):
        estimate_cooccurrence(torch.tensor([[0, 7]]), 3)
    with pytest.raises(ValueError, match="integer"):
        estimate_cooccurrence(torch.zeros(2, 2), 3)
    assert torch.equal(estimate_cooccurrence([], 4), torch.zeros(4))
    with pytest.raises(ValueError, match="void='ignore'"):
        estimate_cooccurrence(torch.zeros(2, 2, dtype=torch.long), 3, void="ignore")


@pytest.mark.parametrize("neighbourhood", ["4", "3x3", "5x5", "7x7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_paper_default_fast_path_gives_the_general_paths_bits(neighbourhood, dtype):
    # k = 1 / max / beta 1 / independent takes a max-over-neighbours path; it must not change one bit,
    # with padding-like invalid pixels and an isolated valid pixel (no neighbour at all) included.
    g = torch.Generator().manual_seed(7)
    p = torch.rand(3, 5, 9, 11, generator=g).softmax(1).to(dtype)
    valid = torch.rand(3, 9, 11, generator=g) > 0.3
    valid[0] = False  # image 0: one valid pixel, the rest invalid (padding)
    valid[0, 3, 5] = True
    for v in (None, valid):
        fast = refine(p, neighbourhood=neighbourhood, valid=v)
        general = refine(p, neighbourhood=neighbourhood, valid=v, _force_general=True)
        assert torch.equal(fast, general)
    assert torch.equal(refine(p, neighbourhood=neighbourhood, valid=valid)[0, :, 3, 5], p[0, :, 3, 5])


def test_differentiable_when_asked():
    # The fast path uses out= / in-place buffers; with autograd on, refine takes the general path.
    p = rand_probs(2, 3, 5, 6, seed=9).requires_grad_(True)
    out = refine(p)
    out.sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    torch.testing.assert_close(out.detach(), refine(p.detach()), rtol=0, atol=0)
