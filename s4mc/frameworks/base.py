"""What every host framework shares: the losses, the pseudo-labelling call and batch plumbing.

A host framework turns one labeled batch and one unlabeled batch into a scalar loss and a dict of
0-dim metric tensors (`train/*`, `pl/*`). Frameworks never synchronise with the host: metrics stay
tensors until the trainer logs them. S4MC enters only through the `PseudoLabeler`, built with the
master switch already applied, so a host with S4MC off is its true baseline (docs/method.md §9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s4mc.data.transforms import apply_cutmix, cutmix_boxes, random_derangement
from s4mc.pseudo_label import PseudoLabeler, PseudoLabels
from s4mc.vocab import IGNORE_INDEX

CUTMIX_PARTNERS = ("derangement", "shuffle")  # docs/hosts.md


def supervised_loss(logits: Tensor, mask: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX)


def unsupervised_loss(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """Sum of per-pixel CE over kept pixels divided by the number of valid pixels (docs/method.md §5).

    Normalised once, by valid pixels: dividing by kept pixels (or re-scaling an averaged loss, as
    U2PL's code did) would make the loss weight depend on the threshold.
    """
    ce = F.cross_entropy(logits.float(), label.clamp(max=logits.shape[1] - 1), reduction="none")
    kept = keep & valid
    return (ce * kept).sum() / valid.sum().clamp(min=1)


@dataclass
class StepResult:
    loss: Tensor
    metrics: dict[str, Tensor]


class HostFramework(nn.Module):
    """Base: holds the student (and optionally an EMA teacher) and the pseudo-labeler."""

    name = "base"
    uses_unlabeled = True
    uses_ema_teacher = False
    num_strong_views = 1

    def __init__(self, student: nn.Module, pseudo_labeler: PseudoLabeler | None, unsup_weight: float,
                 cutmix_prob: float = 0.5, teacher: nn.Module | None = None,
                 student_photometric: bool = True, cutmix_partner: str = "derangement"):
        super().__init__()
        if cutmix_partner not in CUTMIX_PARTNERS:
            raise ValueError(f"cutmix_partner={cutmix_partner!r} is not one of {CUTMIX_PARTNERS}")
        self.student = student
        self.teacher = teacher
        self.pseudo_labeler = pseudo_labeler
        self.unsup_weight = unsup_weight
        self.cutmix_prob = cutmix_prob
        self.student_photometric = bool(student_photometric)
        self.cutmix_partner = cutmix_partner

    def step(self, labeled: dict, unlabeled: dict | None, progress: float,
             generator: torch.Generator) -> StepResult:
        raise NotImplementedError

    def supervised_step(self, labeled: dict) -> StepResult:
        """Labeled data alone: the supervised host's step and every host's warm-up step
        (train.sup_only_steps). No teacher forward and no pseudo-labels, hence no pl/* metrics; the
        loss is the plain supervised CE, unscaled, as in the released U2PL-based code (docs/hosts.md)."""
        loss = supervised_loss(self.student(labeled["image"]), labeled["mask"])
        return StepResult(loss, {"train/loss": loss.detach(), "train/loss_sup": loss.detach()})

    def student_view(self, unlabeled: dict, k: int = 1) -> Tensor:
        """The unlabeled view the student's k-th stream is mixed from: the photometric strong view,
        or, with student_photometric off, the weak (geometric only) view (docs/hosts.md)."""
        return unlabeled[f"strong{k}"] if self.student_photometric else unlabeled["weak"]

    def pseudo_label(self, probs: Tensor, unlabeled: dict, progress: float,
                     generator: torch.Generator) -> PseudoLabels:
        return self.pseudo_labeler(probs.float(), unlabeled["valid"], progress, gt=unlabeled.get("gt"),
                                   generator=generator)

    def mix(self, images: Tensor, pl: PseudoLabels, valid: Tensor, prob: float,
            generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CutMix within the unlabeled batch: image, pseudo-label, keep and valid share one box.

        The partner is a permutation of the same batch, so its pseudo-labels come from the same
        teacher forward (docs/method.md §9: no extra forward in another BN mode). "derangement" never
        pairs a sample with itself (except for B = 1, where no other partner exists); "shuffle" is a
        plain permutation, where about 1/B of the samples are their own partner and get no mix.
        """
        b, _, h, w = images.shape
        boxes = cutmix_boxes(b, h, w, generator, p=prob).to(images.device)
        if self.cutmix_partner == "derangement":
            partner = random_derangement(b, generator).to(images.device)
        else:
            partner = torch.randperm(b, generator=generator).to(images.device)
        mixed = apply_cutmix(images, boxes, partner)
        label = apply_cutmix(pl.label, boxes, partner)
        keep = apply_cutmix(pl.keep, boxes, partner)
        valid_mixed = apply_cutmix(valid, boxes, partner)
        return mixed, label, keep, valid_mixed


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> None:
    """Mean-teacher EMA with warm-up tau_t = min(1 - 1/(t+1), tau) (docs/method.md §5)."""
    tau = min(1.0 - 1.0 / (step + 1), decay)
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.mul_(tau).add_(s_param.detach(), alpha=1.0 - tau)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        if t_buf.dtype.is_floating_point:
            t_buf.mul_(tau).add_(s_buf, alpha=1.0 - tau)
        else:
            t_buf.copy_(s_buf)
