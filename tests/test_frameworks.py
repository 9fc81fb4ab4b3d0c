"""Host frameworks against docs/method.md §5 and §9: forward-pass counts, one normalisation of the
unsupervised loss, pseudo-labels from the same teacher output, and no ground truth in any loss."""

import pytest
import torch

from s4mc.config import load_config
from s4mc.data.transforms import apply_cutmix, cutmix_boxes, random_derangement
from s4mc.frameworks.base import unsupervised_loss
from s4mc.frameworks.hosts import STUDENT_PHOTOMETRIC
from s4mc.pseudo_label import PseudoLabels
from s4mc.train.build import build_run, resolve_student_photometric

TINY = ["data.embedded.image_size=32", "data.embedded.num_train=48", "data.embedded.num_val=6",
        "data.crop_size=32", "data.split=20", "data.batch_size=2", "data.unlabeled_batch_size=2",
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


# ------------------------------------------------------------------ host fidelity (docs/hosts.md)

class Recorder(torch.nn.Module):
    """Wraps the student and records every input batch it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x, **kwargs):
        self.inputs.append(x.detach().clone())
        return self.inner(x, **kwargs)


def test_host_defaults_of_the_student_view():
    assert STUDENT_PHOTOMETRIC == {"cutmix_seg": False, "fixmatch": True, "unimatch": True}
    for host, default in STUDENT_PHOTOMETRIC.items():
        assert resolve_student_photometric(load_config(overrides=[f"host.name={host}"])) is default
        for value in (True, False):
            cfg = load_config(overrides=[f"host.name={host}", f"host.student_photometric={value}"])
            assert resolve_student_photometric(cfg) is value


@pytest.mark.parametrize("photometric", [None, "true"])
def test_cutmix_seg_student_input_is_the_cutmix_of_the_chosen_view(photometric):
    extra = [] if photometric is None else [f"host.student_photometric={photometric}"]
    run, labeled, unlabeled = _run("cutmix_seg", *extra)
    recorder = Recorder(run.student)
    run.framework.student = recorder
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
    # The draws of CutMixSeg.step in order (max selection draws nothing): boxes (p = 1), partners.
    g = torch.Generator().manual_seed(0)
    boxes = cutmix_boxes(2, 32, 32, g, p=1.0)
    partner = random_derangement(2, g)
    if photometric is None:  # the host's default: the weak views, and no strong view is even built
        assert "strong1" not in unlabeled
        source = unlabeled["weak"]
    else:
        source = unlabeled["strong1"]
        assert not torch.equal(source, unlabeled["weak"])
    (seen,) = recorder.inputs
    assert torch.equal(seen[:2], labeled["image"])
    assert torch.equal(seen[2:], apply_cutmix(source, boxes, partner))
    assert not torch.equal(seen[2:], source)  # a box of the other image was pasted in


def test_unimatch_without_photometric_views_mixes_the_weak_view_twice():
    run, labeled, unlabeled = _run("unimatch", "host.student_photometric=false")
    assert "strong1" not in unlabeled and "strong2" not in unlabeled
    recorder = Recorder(run.student)
    run.framework.student = recorder
    run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(2):  # two streams, each with its own boxes and partners
        boxes = cutmix_boxes(2, 32, 32, g, p=run.framework.cutmix_prob)
        expected.append(apply_cutmix(unlabeled["weak"], boxes, random_derangement(2, g)))
    assert torch.equal(recorder.inputs[1], torch.cat(expected))


@pytest.mark.parametrize("n", range(2, 17))
def test_derangement_has_no_fixed_point(n):
    g = torch.Generator().manual_seed(n)
    seen = set()
    for _ in range(200):
        perm = random_derangement(n, g)
        assert sorted(perm.tolist()) == list(range(n)) and perm.dtype == torch.int64
        assert not (perm == torch.arange(n)).any(), perm
        seen.add(tuple(perm.tolist()))
    if n == 3:  # uniform over the two derangements of 3: both appear
        assert seen == {(1, 2, 0), (2, 0, 1)}
    a = [random_derangement(n, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])  # a pure function of the generator state


def test_derangement_of_one_sample_is_itself():
    assert random_derangement(1, torch.Generator().manual_seed(0)).tolist() == [0]
    with pytest.raises(ValueError, match="n=0"):
        random_derangement(0, torch.Generator())


@pytest.mark.parametrize("partner", ["derangement", "shuffle"])
def test_mix_partner_rule(partner):
    run, _, _ = _run("fixmatch", f"host.cutmix_partner={partner}")
    b, h, w = 8, 6, 5
    images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    pl = PseudoLabels(label=torch.arange(b).view(b, 1, 1).expand(b, h, w).clone(),
                      keep=torch.ones(b, h, w, dtype=torch.bool))
    valid = torch.ones(b, h, w, dtype=torch.bool)
    mixed, label, keep, valid_m = run.framework.mix(images, pl, valid, 1.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    boxes = cutmix_boxes(b, h, w, g, p=1.0)
    # "shuffle" is the old behaviour exactly: a torch.randperm after the boxes.
    order = random_derangement(b, g) if partner == "derangement" else torch.randperm(b, generator=g)
    assert torch.equal(mixed, apply_cutmix(images, boxes, order))
    assert torch.equal(label, apply_cutmix(pl.label, boxes, order))
    if partner == "derangement":  # every pasted box holds another image's label
        for i in range(b):
            assert (label[i][boxes[i]] != i).all()


@pytest.mark.parametrize("host", ["cutmix_seg", "fixmatch", "unimatch"])
def test_supervised_step_is_the_supervised_loss_alone(host):
    from s4mc.frameworks.base import supervised_loss

    run, labeled, unlabeled = _run(host)
    run.framework.pseudo_labeler = None  # would raise if the warm-up step pseudo-labelled
    teacher_calls = _count_forwards(run.teacher.backbone) if run.teacher is not None else []
    torch.manual_seed(0)  # the same ASPP dropout draws in both forwards
    result = run.framework.supervised_step(labeled)
    assert teacher_calls == [] and set(result.metrics) == {"train/loss", "train/loss_sup"}
    torch.manual_seed(0)
    with torch.no_grad():
        expected = supervised_loss(run.student(labeled["image"]), labeled["mask"])
    torch.testing.assert_close(result.loss.detach(), expected)  # unscaled, also for UniMatch
