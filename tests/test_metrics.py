"""Tests of s4mc.metrics: confusion matrix, mIoU, merge / resume, Boundary IoU (docs/method.md §6, §9)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from s4mc.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    boundary_counts,
    boundary_dilation,
    boundary_iou,
    mask_boundary,
)


def test_hand_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # rows = target, cols = pred; the 255 pixel is not counted
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.matrix, expected)
    iou = cm.iou()
    # class 0: inter 1, union 2 + 2 - 1 = 3; class 1: 2 / (3 + 3 - 2); class 2: 1 / (2 + 2 - 1)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 4, 1 / 3], dtype=torch.float64))
    assert math.isnan(iou[3])  # class 3 absent from target and prediction: not present
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)
    m = cm.as_metrics(["bg", "cat", "dog", "cow"])
    assert m["eval/mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["eval/IoU/cat"] == pytest.approx(50.0)
    assert m["eval/pixel_acc"] == pytest.approx(400 / 7)
    assert math.isnan(m["eval/IoU/cow"])
    assert set(m) == {"eval/mIoU", "eval/pixel_acc", "eval/IoU/bg", "eval/IoU/cat", "eval/IoU/dog",
                      "eval/IoU/cow"}


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    # class 2 was predicted, never in gt: union > 0, IoU 0, included in the mean
    torch.testing.assert_close(cm.iou()[[0, 2]], torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert cm.miou() == pytest.approx(0.25)


def random_batch(rng, B=3, H=9, W=11, C=6):
    target = rng.integers(0, C, size=(B, H, W))
    target[rng.random((B, H, W)) < 0.15] = 255
    pred = np.where(rng.random((B, H, W)) < 0.6, np.where(target == 255, 0, target),
                    rng.integers(0, C, size=(B, H, W)))
    return torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8)


def test_against_sklearn_random():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(6)
    preds, targets = [], []
    for _ in range(4):
        pred, target = random_batch(rng)
        cm.update(pred, target)
        preds.append(pred.numpy().ravel())
        targets.append(target.numpy().ravel().astype(np.int64))
    p, t = np.concatenate(preds), np.concatenate(targets)
    keep = t != 255
    ref = sk_confusion_matrix(t[keep], p[keep], labels=list(range(6)))
    np.testing.assert_array_equal(cm.matrix.numpy(), ref)
    inter = np.diag(ref)
    union = ref.sum(0) + ref.sum(1) - inter
    np.testing.assert_allclose(cm.iou().numpy(), inter / union)
    assert cm.miou() == pytest.approx(np.mean(inter / union))
    assert cm.pixel_accuracy() == pytest.approx(inter.sum() / ref.sum())


def test_scores_input_is_argmaxed():
    rng = np.random.default_rng(1)
    pred, target = random_batch(rng, C=5)
    scores = torch.nn.functional.one_hot(pred, 5).permute(0, 3, 1, 2).float()
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, target)
    b.update(scores, target)
    assert torch.equal(a.matrix, b.matrix)


def test_two_halves_merged_equal_one_pass_and_state_roundtrip():
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, B=1, H=5 + i, W=7) for i in range(7)]  # odd count, varying sizes
    full, first, second = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    for i, (p, t) in enumerate(batches):
        full.update(p, t)
        (first if i < 4 else second).update(p, t)
    assert torch.equal(first.merge(second).matrix, full.matrix)
    assert int(full.matrix.sum()) == sum(int((t != 255).sum()) for _, t in batches)  # no image dropped
    restored = ConfusionMatrix(6)
    restored.load_state_dict(full.state_dict())
    assert torch.equal(restored.matrix, full.matrix)
    full.all_reduce()  # no process group: a no-op
    assert torch.equal(restored.matrix, full.matrix)
    with pytest.raises(ValueError, match="merge"):
        full.merge(ConfusionMatrix(5))


def test_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="labels"):
        cm.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="labels"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="class_names"):
        cm.as_metrics(["a", "b"])
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())


# ---------------------------------------------------------------------------------------------
# Boundary IoU


def square_target():
    t = torch.zeros(6, 6, dtype=torch.int64)
    t[1:5, 1:5] = 1
    return t


def test_dilation():
    assert boundary_dilation(6, 6, 0.02) == 1  # round(0.17) = 0 -> at least 1
    assert boundary_dilation(300, 400, 0.02) == 10
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_dilation(5, 5, 0.0)


def test_mask_boundary_hand():
    t = square_target()
    b = mask_boundary((t == 1).unsqueeze(0), 1)[0]
    expected = (t == 1).clone()
    expected[2:4, 2:4] = False  # the 2 x 2 interior survives the erosion
    assert torch.equal(b, expected)
    # the image border counts as background: a full mask's boundary is its outer ring
    full = mask_boundary(torch.ones(1, 5, 5, dtype=torch.bool), 1)[0]
    assert full.sum() == 16 and not full[1:4, 1:4].any()
    # d = 2 on the 4 x 4 square: nothing survives, the whole square is boundary
    assert torch.equal(mask_boundary((t == 1).unsqueeze(0), 2)[0], t == 1)


def test_boundary_iou_hand():
    t = square_target()
    torch.testing.assert_close(boundary_iou(t, t, 2), torch.ones(2, dtype=torch.float64))
    p = torch.zeros(6, 6, dtype=torch.int64)
    p[1:5, 2:6] = 1  # the square moved right by one, touching the image border
    # class 1: both boundaries have 12 pixels and share rows 1 and 4 at columns 2..4 -> 6 / 18.
    # class 0: all 20 background pixels are boundary in both; they share 16 -> 16 / 24.
    inter, union = boundary_counts(p, t, 2, dilation_ratio=0.02)
    assert inter.tolist() == [16, 6] and union.tolist() == [24, 18]
    torch.testing.assert_close(boundary_iou(p, t, 2), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    # ignored target pixels are excluded from both counts
    t_ign = t.clone()
    t_ign[0, :] = 255
    inter, union = boundary_counts(p, t_ign, 2)
    assert union[0] < 24


def test_boundary_accumulator_merge_and_state():
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, B=2, H=8, W=10, C=4) for _ in range(3)]
    whole, a, b = BoundaryIoU(4), BoundaryIoU(4), BoundaryIoU(4)
    for i, (p, t) in enumerate(batches):
        whole.update(p, t)
        (a if i < 2 else b).update(p, t)
    a.merge(b)
    assert torch.equal(a.intersection, whole.intersection) and torch.equal(a.union, whole.union)
    inter = sum(boundary_counts(p, t, 4)[0] for p, t in batches)
    union = sum(boundary_counts(p, t, 4)[1] for p, t in batches)
    torch.testing.assert_close(whole.iou(), inter.double() / union.double())
    restored = BoundaryIoU(4)
    restored.load_state_dict(whole.state_dict())
    assert restored.miou() == whole.miou()
    m = whole.as_metrics(["a", "b", "c", "d"])
    assert set(m) == {"eval/boundary_mIoU"} | {f"eval/boundary_IoU/{n}" for n in "abcd"}
    assert 0 <= m["eval/boundary_mIoU"] <= 100


def test_boundary_many_classes_chunked():
    rng = np.random.default_rng(4)
    p, t = random_batch(rng, B=1, H=7, W=8, C=150)
    inter, union = boundary_counts(p, t, 150)
    inter1, union1 = boundary_counts(p, t, 150, class_chunk=150)
    assert torch.equal(inter, inter1) and torch.equal(union, union1)
    assert (inter <= union).all()
