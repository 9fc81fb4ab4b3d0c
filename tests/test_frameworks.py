"""Host frameworks against method.md §5 and §9: forward-pass counts, one normalisation of the
unsupervised loss, pseudo-labels from the same teacher output, and no ground truth in any loss."""

import torch

from s4mc.config import load_config
from s4mc.frameworks.base import unsupervised_loss
from s4mc.train.build import build_run

TINY = ["data.embedded.image_size=32", "data.embedded.num_train=48", "data.embedded.num_val=6",
        "data.crop_size=32", "data.split=25", "data.batch_size=2", "data.unlabeled_batch_size=2",
        "model.width=0.25", "model.head_channels=32", "train.threads=1", "train.progress=false"]


def _run(host: str, *extra: str):
    cfg = load_config(overrides=TINY + [f"host.name={host}", *extra])
    run = build_run(cfg, torch.device("cpu"))
    labeled = next(iter(run.labeled_loader(0)))
    unlabeled = next(iter(run.unlabeled_loader(0))) if run.framework.uses_unlabeled else None
    return run, labeled, unlabeled


def _count_forwards(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    return calls


def test_unsupervised_loss_is_normalised_once_by_valid_pixels():
    logits = torch.randn(2, 4, 3, 3)
    label = torch.randint(0, 4, (2, 3, 3))
    keep = torch.rand(2, 3, 3) > 0.5
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 0] = False
    ce = torch.nn.functional.cross_entropy(logits, label, reduction="none")
    expected = (ce * (keep & valid)).sum() / valid.sum()
    assert torch.allclose(unsupervised_loss(logits, label, keep, valid), expected)


def test_cutmix_seg_runs_one_teacher_and_one_student_forward():
    run, labeled, unlabeled = _run("cutmix_seg")
    student, teacher = _count_forwards(run.student.backbone), _count_forwards(run.teacher.backbone)
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    assert teacher == [2] and student == [4]  # weak views once; labeled + mixed in one batch


def test_fixmatch_and_unimatch_forward_counts():
    run, labeled, unlabeled = _run("fixmatch")
    calls = _count_forwards(run.student.backbone)
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    assert calls == [4, 2]  # labeled + weak together, then the strong view
    run, labeled, unlabeled = _run("unimatch")
    calls = _count_forwards(run.student.backbone)
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    assert calls == [4, 4]  # labeled + weak (with the perturbed decoder pass), then both strong views


def test_ground_truth_of_unlabeled_images_never_reaches_the_loss():
    run, labeled, unlabeled = _run("unimatch")
    other, _, _ = _run("unimatch")
    other.student.load_state_dict(run.student.state_dict())
    scrambled = dict(unlabeled, gt=torch.randint(0, 11, unlabeled["gt"].shape))
    torch.manual_seed(1)  # the same dropout draws in both steps
    a = run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    b = other.framework.step(labeled, scrambled, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss)
    assert a.metrics["pl/quality"] != b.metrics["pl/quality"]  # gt is used, for the metric only


def test_pseudo_labels_come_from_the_teacher_output_used_for_confidence():
    run, labeled, unlabeled = _run("cutmix_seg")
    seen = {}
    labeler = run.framework.pseudo_labeler

    def spy(probs, valid, progress, gt=None, generator=None):
        out = labeler(probs, valid, progress, gt=gt, generator=generator)
        seen["probs"], seen["out"] = probs, out
        return out

    run.framework.pseudo_labeler = spy
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        run.teacher.eval()
        probs = run.teacher(unlabeled["weak"]).softmax(1)
    assert torch.allclose(seen["probs"], probs)
    assert torch.equal(seen["out"].label, probs.argmax(1))
