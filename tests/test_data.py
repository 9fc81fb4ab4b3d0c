"""Tests of the data layer: seeded datasets, transforms, CutMix, step sampler and the embedded set."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from s4mc.data import (
    CLASS_NAMES,
    SPLITS,
    EvalDataset,
    GeometricAug,
    LabeledDataset,
    SegmentationReader,
    StepBatchSampler,
    StrongAug,
    TensorReader,
    UnlabeledDataset,
    apply_cutmix,
    cutmix_box,
    cutmix_boxes,
    derive_seed,
    eval_batches,
    make_embedded,
    save_preview,
)
from s4mc.data.embedded import DIGITS_PER_SCENE, _digits, _make_embedded, digit_partition, digits_file
from s4mc.data.transforms import adjust_hue, color_jitter, gaussian_blur

SMALL = {"image_size": 64, "num_train": 40, "num_val": 10, "seed": 3}


def _digest(data) -> str:
    h = hashlib.sha256()
    for reader in (data.train, data.val):
        h.update(reader.images.numpy().tobytes())
        h.update(reader.masks.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def timed_default():
    _digits()  # reading the scans is not generation
    t0 = time.process_time()
    data = _make_embedded.__wrapped__(64, 2000, 300, 0)  # past the per-process cache: time the rendering
    return data, time.process_time() - t0


@pytest.fixture(scope="module")
def embedded(timed_default):
    return timed_default[0]


def _block_reader(h=40, w=48, n=3, cell=8):
    """Images whose colour encodes the label: cell colour = PALETTE[label]."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (n, h // cell, w // cell), generator=g)
    masks = labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    images = PALETTE[masks].permute(0, 3, 1, 2).contiguous()
    return TensorReader(images, masks, name="blocks", class_names=[str(i) for i in range(5)])


PALETTE = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]],
                       dtype=torch.uint8)


def _unnormalize(x):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return x * std + mean


# ------------------------------------------------------------------ datasets and transforms
def test_reader_protocol_and_validation(embedded):
    assert isinstance(embedded.train, SegmentationReader)
    assert embedded.train.class_names == CLASS_NAMES and embedded.train.num_classes == 11
    img, mask = embedded.train.read(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and mask.dtype == torch.int64
    with pytest.raises(ValueError, match="uint8"):
        TensorReader(torch.zeros(2, 3, 4, 4), None, name="x", class_names=["a"])
    with pytest.raises(ValueError, match="indices"):
        EvalDataset(embedded.val, [10_000])


def test_seeded_items_are_deterministic(embedded):
    aug = GeometricAug(crop_size=48)
    lab = LabeledDataset(embedded.train, list(range(20)), aug)
    unl = UnlabeledDataset(embedded.train, list(range(20)), aug, num_strong=2)
    for ds in (lab, unl):
        a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype == torch.float32)
    with pytest.raises(ValueError, match="position, seed"):
        lab[3]


def test_mask_values_and_shapes(embedded):
    ds = LabeledDataset(embedded.train, None, GeometricAug(crop_size=56))
    for s in range(12):
        item = ds[(s, s)]
        assert item["image"].shape == (3, 56, 56) and item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.int64
        assert set(item["mask"].unique().tolist()) <= set(range(11)) | {255}
    ev = EvalDataset(embedded.val)
    item = ev[5]
    assert item["image"].shape == (3, 64, 64) and item["id"] == embedded.val.item_id(5)
    assert torch.equal(item["mask"], embedded.val.read(5)[1])
    batches = list(DataLoader(ev, batch_sampler=eval_batches(len(ev), 64, rank=1, world_size=2)))
    assert sum(len(b["id"]) for b in batches) == 150 and batches[0]["id"][0] == embedded.val.item_id(150)


@pytest.mark.parametrize("pad_fill", ["mean", "zero"])
def test_crop_padding_is_ignored(pad_fill):
    reader = _block_reader(h=16, w=24)
    aug = GeometricAug(crop_size=32, scale_range=(1.0, 1.0), pad_fill=pad_fill)
    lab = LabeledDataset(reader, None, aug)[(0, 5)]
    unl = UnlabeledDataset(reader, None, aug, num_strong=2)[(0, 5)]
    pad = ~unl["valid"]
    assert pad.sum() == 32 * 32 - 16 * 24
    assert (lab["mask"][pad] == 255).all() and (lab["mask"][~pad] != 255).all()
    assert (unl["gt"][pad] == 255).all()
    fill = torch.tensor([0.485, 0.456, 0.406] if pad_fill == "mean" else [0.0, 0.0, 0.0])
    for key in ("weak", "strong1", "strong2"):
        restored = _unnormalize(unl[key]).permute(1, 2, 0)[pad]
        assert torch.allclose(restored, fill.expand_as(restored), atol=1e-5)


def test_geometric_aug_keeps_image_and_mask_aligned():
    reader = _block_reader()
    palette = PALETTE.float() / 255
    ds = LabeledDataset(reader, None, GeometricAug(crop_size=36, scale_range=(0.5, 2.0)))
    flips_seen = set()
    for seed in range(30):
        item = ds[(seed % 3, seed)]
        img = _unnormalize(item["image"]).permute(1, 2, 0)  # h x w x 3
        mask = item["mask"]
        dist = (img[..., None, :] - palette).abs().amax(-1)  # h x w x 5
        pure = dist.amin(-1) < 1e-4  # inside a block: bilinear returns the block colour exactly
        assert pure[mask != 255].float().mean() > 0.4
        assert torch.equal(dist.argmin(-1)[pure], mask[pure])
        flips_seen.add(bool(mask[:, 0].eq(255).any()))  # right-padding moves left when flipped
    assert flips_seen == {True, False}


def test_strong_views_share_the_weak_geometry(embedded):
    aug = GeometricAug(crop_size=48)
    lab = LabeledDataset(embedded.train, None, aug)
    full = UnlabeledDataset(embedded.train, None, aug, num_strong=2)
    none = UnlabeledDataset(embedded.train, None, aug, num_strong=0)
    identity = UnlabeledDataset(embedded.train, None, aug, StrongAug(jitter_p=0, grayscale_p=0, blur_p=0), 1)
    for key in [(0, 1), (7, 99), (13, 2024)]:
        a, b, c, d = full[key], none[key], identity[key], lab[key]
        assert set(b) == {"weak", "valid", "gt"} and set(a) == {"weak", "strong1", "strong2", "valid", "gt"}
        for k in ("weak", "valid", "gt"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
        assert torch.equal(a["gt"], d["mask"]) and torch.equal(a["weak"], d["image"])
        assert torch.allclose(c["strong1"], c["weak"], atol=1e-6)
        assert not torch.allclose(a["strong1"], a["strong2"])


def test_photometric_ops_sanity():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 9, 11, generator=g)
    assert torch.allclose(adjust_hue(img, 0.0), img, atol=1e-5)
    assert torch.allclose(adjust_hue(adjust_hue(img, 0.3), -0.3), img, atol=1e-4)
    assert torch.allclose(color_jitter(img, g, 0, 0, 0, 0), img, atol=1e-5)
    const = torch.full((3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.7), const, atol=1e-6)


# ------------------------------------------------------------------ CutMix
def test_cutmix_box_sampling():
    g = torch.Generator().manual_seed(0)
    assert not cutmix_box(32, 40, g, p=0.0).any()
    for _ in range(50):
        box = cutmix_box(32, 40, g, p=1.0)
        ys, xs = box.nonzero(as_tuple=True)
        assert box.any() and box.sum() <= 0.4 * 32 * 40
        assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a filled rectangle
    a = cutmix_boxes(6, 16, 16, torch.Generator().manual_seed(1))
    b = cutmix_boxes(6, 16, 16, torch.Generator().manual_seed(1))
    assert a.shape == (6, 16, 16) and a.dtype == torch.bool and torch.equal(a, b)


def test_cutmix_mixes_images_and_labels_with_the_same_box():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (4, 16, 16), generator=g)
    images = torch.randn(4, 3, 16, 16, generator=g)
    images[:, 0] = labels.float()  # channel 0 encodes the label
    box = cutmix_boxes(4, 16, 16, g, p=1.0)
    perm = torch.tensor([2, 0, 3, 1])
    mi, ml = apply_cutmix(images, box, perm), apply_cutmix(labels, box, perm)
    assert torch.equal(mi[:, 0].long(), ml)
    assert torch.equal(ml[box], labels[perm][box]) and torch.equal(ml[~box], labels[~box])
    assert torch.equal(mi[:, 1:][box[:, None].expand(-1, 2, -1, -1)],
                       images[perm][:, 1:][box[:, None].expand(-1, 2, -1, -1)])
    roll = torch.tensor([3, 0, 1, 2])
    assert torch.equal(apply_cutmix(labels, box, 1), apply_cutmix(labels, box, roll))
    keep = torch.rand(4, 16, 16, generator=g) > 0.5
    assert torch.equal(apply_cutmix(keep, box[0], perm)[:, box[0]], keep[perm][:, box[0]])


# ------------------------------------------------------------------ sampler
def test_sampler_resume_replays_the_same_stream():
    full = list(StepBatchSampler(37, 8, seed=5, total_steps=30))
    for s in (0, 1, 4, 17, 29):
        resumed = list(StepBatchSampler(37, 8, seed=5, start_step=s, total_steps=30))
        assert resumed == full[s:]
        assert len(StepBatchSampler(37, 8, seed=5, start_step=s, total_steps=30)) == 30 - s
    assert full != list(StepBatchSampler(37, 8, seed=6, total_steps=30))
    assert len({s for batch in full for _, s in batch}) == 30 * 8  # a fresh seed per (step, slot)
    assert derive_seed(np.int64(5), "x") == derive_seed(5, "x") != derive_seed(5, "y")


def test_sampler_covers_epochs_and_rank_slices():
    n, b, w, steps = 10, 2, 3, 20  # global batch 6 does not divide 10: batches straddle epochs
    single = list(StepBatchSampler(n, b * w, seed=1, total_steps=steps))
    ranks = [list(StepBatchSampler(n, b, seed=1, total_steps=steps, rank=r, world_size=w)) for r in range(w)]
    for t in range(steps):
        parts = [ranks[r][t] for r in range(w)]
        assert sum(parts, []) == single[t]  # ranks take disjoint slots that tile the global batch
        assert len({s for p in parts for _, s in p}) == b * w
    stream = [i for batch in single for i, _ in batch]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))  # every epoch is a permutation


def test_sampler_with_dataloader_workers(embedded):
    ds = UnlabeledDataset(embedded.train, list(range(30)), GeometricAug(crop_size=32), num_strong=1)
    sampler = StepBatchSampler(len(ds), 4, seed=0, start_step=3, total_steps=6)
    serial = list(DataLoader(ds, batch_sampler=sampler, num_workers=0))
    parallel = list(DataLoader(ds, batch_sampler=sampler, num_workers=2))
    assert len(serial) == 3 and serial[0]["weak"].shape == (4, 3, 32, 32)
    for x, y in zip(serial, parallel, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("n", [0, 1, 7, 13, 101])
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_batches_cover_every_item_once(n, batch, world):
    items = []
    for r in range(world):
        batches = eval_batches(n, batch, r, world)
        assert all(1 <= len(x) <= batch for x in batches)
        items += [i for x in batches for i in x]
    assert sorted(items) == list(range(n))


# ------------------------------------------------------------------ embedded data set
def test_embedded_generation_time_and_hash(timed_default):
    data, seconds = timed_default
    assert seconds < 8.0, f"generation took {seconds:.1f} s CPU (budget ~5 s)"
    assert len(data.train) == 2000 and len(data.val) == 300
    small = make_embedded(**SMALL)
    assert _digest(small) == _digest(_make_embedded.__wrapped__(**SMALL))  # rendered again, not cached
    code = ("import hashlib; from s4mc.data import make_embedded; "
            f"d = make_embedded(**{SMALL!r}); h = hashlib.sha256(); "
            "[h.update(t.numpy().tobytes()) for r in (d.train, d.val) for t in (r.images, r.masks)]; "
            "print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(small)  # identical in a fresh process
    assert _digest(small) != _digest(make_embedded(**{**SMALL, "seed": 4}))
    # Scenes do not depend on the set sizes: a smaller set is a prefix of a larger one.
    prefix = make_embedded(num_train=5, num_val=5)
    assert torch.equal(prefix.train.images, data.train.images[:5])
    assert torch.equal(prefix.val.masks, data.val.masks[:5])


def test_digit_scans_equal_load_digits():
    from sklearn.datasets import load_digits

    images, target = _digits()
    d = load_digits()
    np.testing.assert_array_equal(images[:, 1:-1, 1:-1], (d.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(target, d.target)
    assert not images[:, 0].any() and not images[:, :, -1].any()  # the zero border


def test_missing_digit_scans_name_the_file(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="digits.csv.gz.*make setup"):
        digits_file()


def test_embedded_cache_returns_the_data_unchanged_by_the_pipeline():
    # Trials in one Ray actor share the cached set: nothing downstream may write into it.
    data = make_embedded(**SMALL)
    assert make_embedded(**SMALL) is data and make_embedded(**{**SMALL, "seed": 4}) is not data
    before = _digest(data)
    aug = GeometricAug(crop_size=48, scale_range=(0.5, 2.0), hflip=True)
    lab = LabeledDataset(data.train, None, aug)
    unl = UnlabeledDataset(data.train, None, aug, num_strong=2)
    for i in range(len(data.train)):
        lab[(i, 7)], unl[(i, 7)]
    val = EvalDataset(data.val, None)
    for i in range(len(val)):
        val[i]
    assert _digest(data) == before == _digest(_make_embedded.__wrapped__(**SMALL))


def test_embedded_content(embedded):
    masks = embedded.train.masks
    counts = torch.bincount(masks.flatten().long(), minlength=11)
    assert counts.numel() == 11 and (counts > 0).all()
    assert 0.02 < 1 - counts[0] / masks.numel() < 0.3  # digits present, background dominant
    assert (masks.flatten(1) > 0).any(1).all()  # every scene holds a visible digit
    assert DIGITS_PER_SCENE == 1  # one digit per scene: each mask holds background and one digit class
    assert all(len(torch.unique(m[m > 0])) == 1 for m in masks)


def test_val_digits_are_held_out(embedded):
    tr, va = set(embedded.train_digits.tolist()), set(embedded.val_digits.tolist())
    pre = set(digit_partition(embedded.seed)["pretrain"].tolist())  # never in a scene (test_pretrain.py)
    assert not tr & va and not (tr | va) & pre and len(tr) + len(va) + len(pre) == 1797
    assert set(embedded.used_digits["train"].tolist()) <= tr
    assert set(embedded.used_digits["val"].tolist()) <= va


def test_labeled_splits_are_nested(embedded):
    prev: set[int] = set()
    for name in SPLITS[:-1]:
        lab, unl = embedded.split_indices(name, seed=0)
        assert len(lab) == int(name) and prev <= set(lab)
        assert not set(lab) & set(unl) and sorted(lab + unl) == list(range(2000))
        prev = set(lab)
    lab, unl = embedded.split_indices("all")
    assert lab == list(range(2000)) and unl == []
    assert embedded.split_indices("30", seed=1)[0] != embedded.split_indices("30", seed=0)[0]
    for bad in ("25", "full", 0, 2001):
        with pytest.raises(ValueError, match="allowed 10, 20, 30, 50, 100, 200, all"):
            embedded.split_indices(bad)


@pytest.mark.parametrize("seed", [0, 1])
def test_labeled_splits_are_class_stratified(embedded, seed):
    """A split of 10 k scenes holds k scenes of every digit (one digit per scene)."""
    scene_class = [int(torch.bincount(m.flatten().long(), minlength=11)[1:].argmax()) for m in embedded.train.masks]
    for name in SPLITS[:-1]:
        lab, _ = embedded.split_indices(name, seed=seed)
        counts = np.bincount([scene_class[i] for i in lab], minlength=10)
        assert counts.tolist() == [int(name) // 10] * 10, (name, counts)
    # A count that is not a multiple of 10 still spreads over the classes as evenly as possible.
    counts = np.bincount([scene_class[i] for i in embedded.split_indices(15, seed=seed)[0]], minlength=10)
    assert sorted(counts.tolist()) == [1] * 5 + [2] * 5


def test_save_preview(tmp_path):
    from PIL import Image

    path = tmp_path / "preview.png"
    save_preview(path, n=4, data=make_embedded(num_train=4, num_val=4))
    assert Image.open(path).size[0] > 4 * 64
