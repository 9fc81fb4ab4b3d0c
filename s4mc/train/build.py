"""Builds everything a run needs from its config: data, model, teacher, optimizer, host framework.

This is the one place where config keys turn into explicit constructor arguments; the library
modules below it never see the config. `build_run` returns a `Run` that the loop drives.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from s4mc.config import ConfigError
from s4mc.data.base import EvalDataset, LabeledDataset, UnlabeledDataset
from s4mc.data.sampler import StepBatchSampler, eval_batches
from s4mc.data.transforms import GeometricAug
from s4mc.frameworks.hosts import HOSTS, STUDENT_PHOTOMETRIC, UniMatch
from s4mc.models import build_model
from s4mc.pseudo_label import PseudoLabeler
from s4mc.refine import estimate_cooccurrence


@dataclass
class DataBundle:
    labeled: LabeledDataset
    unlabeled: UnlabeledDataset | None
    val: EvalDataset
    num_classes: int
    class_names: list[str]
    labeled_masks: Any = field(repr=False)  # iterable of H x W masks, for E_c (docs/method.md §3)


def build_data(cfg: DictConfig, num_strong: int, needs_unlabeled: bool) -> DataBundle:
    d = cfg.data
    geometric = GeometricAug(crop_size=d.crop_size, scale_range=(d.scale_min, d.scale_max), hflip=d.flip)
    if d.name == "embedded":
        from s4mc.data.embedded import CLASS_NAMES, make_embedded

        e = d.embedded
        data = make_embedded(image_size=e.image_size, num_train=e.num_train, num_val=e.num_val, seed=e.seed)
        labeled_idx, unlabeled_idx = data.split_indices(d.split, seed=e.seed)
        train_reader, val_reader, val_idx = data.train, data.val, None
        unl_reader = train_reader
        class_names = list(CLASS_NAMES)
    else:
        from s4mc.data.real import build_real_reader
        from s4mc.data.splits import resolve_split

        lists = resolve_split(d.name, d.split_family, d.split, root=d.root)
        train_reader = build_real_reader(d.name, d.root, list(lists.labeled))
        unl_reader = build_real_reader(d.name, d.root, list(lists.unlabeled))
        val_reader = build_real_reader(d.name, d.root, list(lists.val))
        labeled_idx, unlabeled_idx, val_idx = None, None, None
        class_names = list(train_reader.class_names)
    labeled = LabeledDataset(train_reader, labeled_idx, geometric)
    unlabeled = None
    if needs_unlabeled:
        if unlabeled_idx is not None and len(unlabeled_idx) == 0 or len(unl_reader) == 0:
            raise ValueError(f"data.split={d.split!r} leaves no unlabeled images, but host.name="
                             f"{cfg.host.name!r} needs them; use host.name=supervised or a smaller split")
        unlabeled = UnlabeledDataset(unl_reader, unlabeled_idx, geometric, num_strong=num_strong)
    val = EvalDataset(val_reader, val_idx)
    masks = (train_reader.read(i)[1] for i in labeled.indices)
    return DataBundle(labeled, unlabeled, val, len(class_names), class_names, masks)


def build_pseudo_labeler(cfg: DictConfig, cooccurrence: torch.Tensor | None) -> PseudoLabeler:
    s = cfg.s4mc
    # The master switch wins over the two sub-switches: s4mc.enabled=false is the host's true
    # baseline with its own fixed threshold (docs/method.md §9: no half-disabled S4MC).
    return PseudoLabeler(
        refine_enabled=s.enabled and s.refine, dpa_enabled=s.enabled and s.dpa,
        confidence_kind=s.confidence, fixed_threshold=cfg.host.threshold,
        fixed_confidence_kind=cfg.host.threshold_confidence, alpha0=s.alpha0,
        neighbourhood=s.neighbourhood, k=s.k, beta=s.beta, joint=s.joint, selection=s.selection,
        cooccurrence=cooccurrence, clamp_joint=s.clamp_joint, cpu_kernel=s.cpu_kernel)


def resolve_student_photometric(cfg: DictConfig) -> bool:
    """host.student_photometric, with None read from the host's default (docs/hosts.md)."""
    value = cfg.host.student_photometric
    return STUDENT_PHOTOMETRIC.get(cfg.host.name, False) if value is None else bool(value)


def resolve_eval_model(cfg: DictConfig, has_teacher: bool) -> str:
    """eval.model, with auto = the EMA teacher when the host has one, else the student (docs/hosts.md)."""
    choice = cfg.eval.model
    if choice == "teacher" and not has_teacher:  # load_config already refuses this; direct callers too
        raise ConfigError(f"eval.model='teacher' but host.name={cfg.host.name!r} has no EMA teacher; "
                          "expected eval.model=auto or student")
    if choice == "auto":
        return "teacher" if has_teacher else "student"
    return choice


@dataclass
class Run:
    cfg: DictConfig
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    framework: Any
    optimizer: torch.optim.Optimizer
    total_steps: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    eval_model: str = "student"  # eval.model resolved: "teacher" or "student"
    pretrained_path: str | None = None  # the encoder file the student started from (versions.json)

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def eval_network(self) -> nn.Module:
        """The network that is evaluated, drawn in the samples and picks best.pt."""
        return self.teacher if self.eval_model == "teacher" else self.student

    def _loader(self, dataset, batch_size: int, seed: int, start_step: int) -> DataLoader:
        sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step=start_step,
                                   total_steps=self.total_steps, rank=self.rank, world_size=self.world_size)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=self.cfg.data.num_workers > 0)

    def labeled_loader(self, start_step: int) -> DataLoader:
        return self._loader(self.data.labeled, self.cfg.data.batch_size, self.cfg.train.seed, start_step)

    def unlabeled_loader(self, start_step: int) -> DataLoader:
        # A different stream seed than the labeled one, so both orders are independent.
        return self._loader(self.data.unlabeled, self.cfg.data.unlabeled_batch_size,
                            self.cfg.train.seed + 1_000_003, start_step)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from s4mc.evaluation import evaluate

        e = self.cfg.eval
        # Every process evaluates the whole val set: the metric never depends on the sharding.
        batches = eval_batches(len(self.data.val), e.batch_size if e.mode != "sliding" else 1)
        loader = DataLoader(self.data.val, batch_sampler=batches, num_workers=self.cfg.data.num_workers)
        dtype = torch.bfloat16 if (self.cfg.train.bf16 and self.device.type == "cuda") else None
        return evaluate(model, loader, num_classes=self.data.num_classes, class_names=self.class_names,
                        mode=e.mode, crop_size=e.crop_size or self.cfg.data.crop_size,
                        stride_ratio=e.stride_ratio, scales=tuple(e.scales), flip=e.flip,
                        device=self.device, autocast_dtype=dtype, expected_images=len(self.data.val),
                        boundary_iou=e.boundary_iou)


def total_steps(cfg: DictConfig, data: DataBundle, world_size: int = 1) -> int:
    if cfg.train.epochs is None:
        return cfg.train.steps
    # Published runs count epochs over the larger of the two pools (UniMatch: the unlabeled loader).
    # The batch is per process: a data-parallel step consumes batch x world_size images.
    pool = len(data.unlabeled) if data.unlabeled is not None else len(data.labeled)
    batch = cfg.data.unlabeled_batch_size if data.unlabeled is not None else cfg.data.batch_size
    return cfg.train.epochs * math.ceil(pool / (batch * world_size))


def resolve_pretrained(cfg: DictConfig) -> str | None:
    """``model.pretrained``: a local file as it is, or the embedded benchmark's digit encoder
    (``embedded``), pretrained on first use and cached with its sha256 (s4mc/pretrain.py). Either
    way the file goes through the same ``load_pretrained`` path as real ImageNet weights."""
    from s4mc.pretrain import EMBEDDED_WEIGHTS, ensure_encoder

    if cfg.model.pretrained != EMBEDDED_WEIGHTS:
        return cfg.model.pretrained
    if cfg.data.name != "embedded":
        raise ConfigError(f"model.pretrained={EMBEDDED_WEIGHTS!r} is the embedded benchmark's digit encoder; "
                          f"data.name={cfg.data.name!r} needs a weights file path (ImageNet weights)")
    return str(ensure_encoder(embedded_encoder_spec(cfg), progress=bool(cfg.train.progress)))


def embedded_encoder_spec(cfg: DictConfig):
    """The ``PretrainSpec`` of the digit encoder a config's model loads (``s4mc pretrain`` makes it)."""
    from s4mc.pretrain import PretrainSpec

    m = cfg.model
    return PretrainSpec(backbone=m.backbone, width=float(m.width), deep_stem=bool(m.deep_stem),
                        data_seed=int(cfg.data.embedded.seed))


def optimizer_kernels(impl: str, device: torch.device) -> dict[str, bool]:
    """torch.optim keyword arguments for train.optimizer_impl (docs/performance.md). auto: fused on
    CUDA; foreach elsewhere, which on CPU gives the per-parameter loop's bits ~1.6x faster (measured)."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def prepare_networks(student: nn.Module, ema_teacher: bool, cfg: DictConfig, device: torch.device
                     ) -> tuple[nn.Module, nn.Module | None]:
    """(student, EMA teacher or None) with train.channels_last (CUDA only) and train.compile applied.
    compile is in place (Module.compile), so parameter names and state_dict keys stay those of the
    plain model and checkpoints and the EMA update are unchanged; it runs in the first step
    (summary.json first_step_s; docs/performance.md)."""
    if device.type == "cuda" and cfg.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = None
    if ema_teacher:
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
    for net in (student, teacher) if cfg.train.compile else ():
        if net is not None:
            net.compile()
    return student, teacher


def build_run(cfg: DictConfig, device: torch.device) -> Run:
    host_cls = HOSTS[cfg.host.name]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    photometric = resolve_student_photometric(cfg)
    eval_model = resolve_eval_model(cfg, host_cls.uses_ema_teacher)
    # Without photometric student views the strong views are never read: do not augment them.
    data = build_data(cfg, host_cls.num_strong_views if photometric else 0, host_cls.uses_unlabeled)
    steps = total_steps(cfg, data, world)
    if cfg.train.sup_only_steps >= steps:  # with train.epochs the count is known only now
        raise ConfigError(f"train.sup_only_steps={cfg.train.sup_only_steps} leaves no semi-supervised "
                          f"step of the {steps} steps of this run; expected a value < {steps}")
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # model initialisation
    pretrained_path = resolve_pretrained(cfg)
    student = build_model(backbone=m.backbone, num_classes=data.num_classes, width=m.width,
                          deep_stem=m.deep_stem, output_stride=m.output_stride, multi_grid=m.multi_grid,
                          aspp_rates=tuple(m.aspp_rates), head_channels=m.head_channels,
                          fp_dropout=m.fp_dropout, pretrained=pretrained_path,
                          pretrained_layout=m.pretrained_layout).to(device)
    student, teacher = prepare_networks(student, host_cls.uses_ema_teacher, cfg, device)
    groups = student.param_groups(cfg.train.lr, cfg.train.head_lr_mult, cfg.train.weight_decay)
    impl = optimizer_kernels(cfg.train.optimizer_impl, device)
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                    weight_decay=cfg.train.weight_decay, **impl)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **impl)
    for group in optimizer.param_groups:
        group["lr_mult"] = group["lr"] / cfg.train.lr
    pseudo_labeler = None
    if host_cls.uses_unlabeled:
        cooc = None
        if cfg.s4mc.enabled and cfg.s4mc.joint == "expected":
            cooc = estimate_cooccurrence(data.labeled_masks, data.num_classes,
                                         neighbourhood=cfg.s4mc.neighbourhood,
                                         void=cfg.s4mc.cooccurrence_void).to(device)
        pseudo_labeler = build_pseudo_labeler(cfg, cooc)
    h = cfg.host
    kwargs: dict[str, Any] = {"unsup_weight": h.unsup_weight, "cutmix_prob": h.cutmix_prob, "teacher": teacher,
                              "student_photometric": photometric, "cutmix_partner": h.cutmix_partner}
    if host_cls is UniMatch:
        kwargs.update(w_s1=h.w_s1, w_s2=h.w_s2, w_fp=h.w_fp, loss_scale=h.loss_scale)
    framework = host_cls(student, pseudo_labeler, **kwargs)
    return Run(cfg, data, student, teacher, framework, optimizer, steps, device, rank, world,
               eval_model=eval_model, pretrained_path=pretrained_path)
