"""The four host frameworks S4MC plugs into (docs/method.md §5).

- supervised: labeled data alone, the lower bound of every table.
- cutmix_seg: mean teacher; the EMA teacher labels the weak views, the student learns on a CutMix
  of two unlabeled images with pseudo-labels mixed by the same box.
- fixmatch: one network; its own no-grad prediction on the weak view labels the strong view.
- unimatch: FixMatch with two strong views and a feature-perturbation stream.
Labeled and weak unlabeled images share one forward pass where the host allows it, so pseudo-labels
and confidences always come from the same output (docs/method.md §9). What the student sees and which
network is evaluated follow each host's own paper / code by default (docs/hosts.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from s4mc.frameworks.base import HostFramework, StepResult, supervised_loss, unsupervised_loss

# host.student_photometric=None resolves here: does the student's CutMix start from photometric strong
# views (colour jitter, grayscale, blur)? CutMix-Seg (French et al.) and the released S4MC CutMix-Seg
# code (built on U2PL) mix the weak views; FixMatch / UniMatch use strong views (docs/hosts.md).
STUDENT_PHOTOMETRIC: dict[str, bool] = {"cutmix_seg": False, "fixmatch": True, "unimatch": True}


class Supervised(HostFramework):
    name = "supervised"
    uses_unlabeled = False
    num_strong_views = 0

    def step(self, labeled, unlabeled, progress, generator) -> StepResult:
        return self.supervised_step(labeled)


class CutMixSeg(HostFramework):
    name = "cutmix_seg"
    uses_ema_teacher = True

    def step(self, labeled, unlabeled, progress, generator) -> StepResult:
        valid = unlabeled["valid"]
        with torch.no_grad():
            # The teacher runs in eval mode once; label and confidence come from this one output.
            self.teacher.eval()
            probs = self.teacher(unlabeled["weak"]).softmax(dim=1)
        pl = self.pseudo_label(probs, unlabeled, progress, generator)
        mixed, label, keep, valid_m = self.mix(self.student_view(unlabeled), pl, valid, 1.0, generator)
        n_l = labeled["image"].shape[0]
        logits = self.student(torch.cat([labeled["image"], mixed]))
        loss_sup = supervised_loss(logits[:n_l], labeled["mask"])
        loss_unsup = unsupervised_loss(logits[n_l:], label, keep, valid_m)
        loss = loss_sup + self.unsup_weight * loss_unsup
        metrics = {"train/loss": loss.detach(), "train/loss_sup": loss_sup.detach(),
                   "train/loss_unsup": loss_unsup.detach(), **pl.stats}
        return StepResult(loss, metrics)


class FixMatch(HostFramework):
    name = "fixmatch"

    def _weak_forward(self, labeled, unlabeled, fp: bool):
        n_l = labeled["image"].shape[0]
        out = self.student(torch.cat([labeled["image"], unlabeled["weak"]]), feature_perturbation=fp)
        logits, logits_fp = out if fp else (out, None)
        return n_l, logits, logits_fp

    def step(self, labeled, unlabeled, progress, generator) -> StepResult:
        n_l, logits, _ = self._weak_forward(labeled, unlabeled, fp=False)
        loss_sup = supervised_loss(logits[:n_l], labeled["mask"])
        pl = self.pseudo_label(logits[n_l:].detach().softmax(dim=1), unlabeled, progress, generator)
        mixed, label, keep, valid_m = self.mix(self.student_view(unlabeled), pl, unlabeled["valid"],
                                               self.cutmix_prob, generator)
        loss_s1 = unsupervised_loss(self.student(mixed), label, keep, valid_m)
        loss = loss_sup + self.unsup_weight * loss_s1
        metrics = {"train/loss": loss.detach(), "train/loss_sup": loss_sup.detach(),
                   "train/loss_unsup": loss_s1.detach(), **pl.stats}
        return StepResult(loss, metrics)


class UniMatch(FixMatch):
    name = "unimatch"
    num_strong_views = 2

    def __init__(self, *args, w_s1: float, w_s2: float, w_fp: float, loss_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_s1, self.w_s2, self.w_fp, self.loss_scale = w_s1, w_s2, w_fp, loss_scale

    def step(self, labeled, unlabeled, progress, generator) -> StepResult:
        # w_fp = 0 is the S4MC paper's variant: skip the perturbed decoder pass entirely.
        use_fp = self.w_fp > 0
        n_l, logits, logits_fp = self._weak_forward(labeled, unlabeled, fp=use_fp)
        loss_sup = supervised_loss(logits[:n_l], labeled["mask"])
        valid = unlabeled["valid"]
        pl = self.pseudo_label(logits[n_l:].detach().softmax(dim=1), unlabeled, progress, generator)
        # With student_photometric off both streams start from the weak view; their CutMix boxes and
        # partners are still drawn independently.
        s1, label1, keep1, valid1 = self.mix(self.student_view(unlabeled, 1), pl, valid, self.cutmix_prob,
                                             generator)
        s2, label2, keep2, valid2 = self.mix(self.student_view(unlabeled, 2), pl, valid, self.cutmix_prob,
                                             generator)
        n_u = s1.shape[0]
        logits_s = self.student(torch.cat([s1, s2]))
        loss_s1 = unsupervised_loss(logits_s[:n_u], label1, keep1, valid1)
        loss_s2 = unsupervised_loss(logits_s[n_u:], label2, keep2, valid2)
        loss_fp: Tensor = (unsupervised_loss(logits_fp[n_l:], pl.label, pl.keep, valid) if use_fp
                           else loss_s1.new_zeros(()))
        loss_unsup = self.w_s1 * loss_s1 + self.w_s2 * loss_s2 + self.w_fp * loss_fp
        loss = self.loss_scale * (loss_sup + self.unsup_weight * loss_unsup)
        metrics = {"train/loss": loss.detach(), "train/loss_sup": loss_sup.detach(),
                   "train/loss_unsup": loss_unsup.detach(), "train/loss_s1": loss_s1.detach(),
                   "train/loss_s2": loss_s2.detach(), "train/loss_fp": loss_fp.detach(), **pl.stats}
        return StepResult(loss, metrics)


HOSTS: dict[str, type[HostFramework]] = {
    "supervised": Supervised,
    "cutmix_seg": CutMixSeg,
    "fixmatch": FixMatch,
    "unimatch": UniMatch,
}
