"""The one typed configuration schema of a training run.

Dataclasses define every key with its type and default; `OmegaConf.structured` turns them into a
config that rejects unknown keys and wrong types. `load_config` merges, in order, the schema
defaults, a YAML manifest and `key=value` command-line overrides, then `validate` checks choices and
ranges that types alone cannot express. Every failure is one `ConfigError` line naming the key, the
bad value and what is allowed, raised before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from s4mc import vocab
from s4mc.vocab import SLIDING_STRIDE_RATIO


class ConfigError(ValueError):
    """A configuration key has an unknown name, a wrong type or a value out of range."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: float = 1.0  # channel multiplier; < 1 gives the small CPU models of the embedded runs
    deep_stem: bool = False  # three 3x3 stem convs, as the published ResNet-101 runs (docs/method.md §7)
    output_stride: int = 16
    multi_grid: bool = False
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])  # docs/method.md §7 (VOC, COCO)
    head_channels: int = 256  # DeepLabV3+ ASPP/decoder width (Chen et al. 2018)
    fp_dropout: float = 0.5  # UniMatch feature perturbation (docs/method.md §5)
    pretrained: str | None = None  # local path or s3:// URI in torchvision's key layout
    pretrained_layout: str = "torchvision"  # or "deep_stem"


@dataclass
class EmbeddedDataConfig:
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 300
    seed: int = 0  # generation seed: fixed, independent of the training seed


@dataclass
class DataConfig:
    name: str = "embedded"  # embedded | pascal | cityscapes | coco
    root: str | None = None  # data root: local path or s3:// URI (real data sets only)
    split: str = "50"  # labeled split: "50" (embedded label count), "366", "1_16", ...
    split_family: str = "unimatch"  # published split family for real data: unimatch | u2pl
    crop_size: int = 64
    scale_min: float = 0.5  # random scale 0.5-2.0 (docs/method.md / UniMatch)
    scale_max: float = 2.0
    flip: bool = True
    batch_size: int = 8  # labeled images per step (per process)
    unlabeled_batch_size: int = 8
    num_workers: int = 0
    embedded: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)


@dataclass
class HostConfig:
    name: str = "cutmix_seg"  # supervised | cutmix_seg | fixmatch | unimatch
    # The host's own fixed threshold, used whenever DPA is off. FixMatch's 0.95 on max probability
    # (Sohn et al. 2020; docs/method.md §4); UniMatch uses the same; we apply it to CutMix-Seg as well.
    threshold: float = 0.95
    threshold_confidence: str = "max"
    unsup_weight: float = 1.0  # lambda in L = L_sup + lambda L_unsup (docs/method.md §1)
    ema_decay: float = 0.99  # mean-teacher tau (docs/method.md §5)
    cutmix_prob: float = 0.5  # FixMatch / UniMatch strong-view CutMix (docs/method.md §5)
    # UniMatch loss (L_x + w_s1 L_s1 + w_s2 L_s2 + w_fp L_fp) * scale (docs/method.md §5); the S4MC paper's
    # variant is w_s1 = w_s2 = 0.5, w_fp = 0.
    w_s1: float = 0.25
    w_s2: float = 0.25
    w_fp: float = 0.5
    loss_scale: float = 0.5
    # Host fidelity switches (docs/hosts.md). None = the host's own default, the table
    # STUDENT_PHOTOMETRIC in s4mc/frameworks/hosts.py: cutmix_seg False (the student sees the CutMix
    # of the weak views), fixmatch / unimatch True (photometric strong views + CutMix).
    student_photometric: bool | None = None
    # CutMix partner within the unlabeled batch: "derangement" (no sample mixed with itself; ours,
    # docs/hosts.md) or "shuffle" (a plain permutation, ~1/B samples paired with themselves).
    cutmix_partner: str = "derangement"


@dataclass
class S4MCConfig:
    enabled: bool = True  # master switch: False = the host's true baseline (no refinement, no DPA)
    refine: bool = True
    dpa: bool = True
    confidence: str = "margin"  # kappa for DPA (docs/method.md §2; paper Table F.1: margin best)
    neighbourhood: str = "3x3"  # paper Table 7 best
    k: int = 1
    beta: str = "one"
    joint: str = "independent"
    selection: str = "max"
    alpha0: float = 0.4  # paper Table 6 best
    # Cap the expected joint at q (Frechet bound, s4mc/refine.py); False = the released code's
    # uncapped J = max(p q, p E_c) (docs/hosts.md).
    clamp_joint: bool = True
    # E_c estimation: a void (ignore) neighbour counts as "different class" (the released estimator,
    # docs/hosts.md) or the pair is excluded; with "exclude" void outlines make E_c ~ 1.
    cooccurrence_void: str = "different"
    # CPU pseudo-labelling: the fused C kernel (same bits; 4.5x faster than eager, 8.8x with its AVX-512 body,
    # as measured in docs/performance.md) where a C compiler builds it (auto), required (fused), or never (eager).
    cpu_kernel: str = "auto"


@dataclass
class TrainConfig:
    steps: int = 600  # optimisation steps (iterations); the schedule runs per step (docs/method.md §4)
    epochs: int | None = None  # if set, steps = epochs x ceil(len(pool) / batch) (published runs)
    # Steps trained on the supervised loss alone before the unsupervised loss counts (the released
    # U2PL-based S4MC code's sup_only_epoch; docs/hosts.md). 0 = none, as the S4MC paper describes.
    sup_only_steps: int = 0
    # sgd: the published set-up (docs/method.md §7). adamw: ours for the from-scratch embedded CPU runs,
    # where SGD sat on the all-background plateau for 1000+ steps (measured, README "Embedded").
    optimizer: str = "sgd"
    lr: float = 0.01
    head_lr_mult: float = 10.0  # docs/method.md §7 (VOC, COCO)
    momentum: float = 0.9  # docs/method.md §7
    weight_decay: float = 1e-4  # docs/method.md §7
    poly_power: float = 0.9  # docs/method.md §7
    eval_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 1  # recent checkpoints kept besides best.pt
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast to bfloat16 on CUDA only
    # Optimizer kernels (docs/performance.md): auto = fused on CUDA, foreach elsewhere (foreach SGD is
    # bit-identical to the per-parameter loop on CPU, measured); for_loop | foreach | fused force one.
    optimizer_impl: str = "auto"
    channels_last: bool = True  # NHWC model and activations on CUDA only (docs/performance.md)
    compile: bool = False  # opt-in torch.compile of the networks; its cost is logged as first_step_s
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    progress: bool = True  # tqdm progress bar


@dataclass
class EvalConfig:
    mode: str = "full"  # full | center_crop | sliding
    crop_size: int = 0  # window / crop for center_crop and sliding; 0 = data.crop_size
    stride_ratio: float = SLIDING_STRIDE_RATIO  # sliding-window stride = 2/3 window (s4mc/vocab.py)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    boundary_iou: bool = False  # also log eval/boundary_mIoU (paper Table 9)
    batch_size: int = 16
    # Which network is evaluated (and picks best.pt): auto = the EMA teacher when the host has one
    # (U2PL / S4MC's CutMix-Seg code), else the student (FixMatch, UniMatch); docs/hosts.md.
    model: str = "auto"


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/${run.name}"  # the run folder (config, versions, metrics, checkpoints)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    host: HostConfig = field(default_factory=HostConfig)
    s4mc: S4MCConfig = field(default_factory=S4MCConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Choices and ranges that types cannot express. Kept as visible tables so `--help` and errors
# can quote them.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "xception65"),
    "model.output_stride": (8, 16),
    "model.pretrained_layout": ("torchvision", "deep_stem"),
    "data.name": ("embedded", "pascal", "cityscapes", "coco"),
    "data.split_family": ("unimatch", "u2pl"),
    "host.name": ("supervised", "cutmix_seg", "fixmatch", "unimatch"),
    "host.threshold_confidence": vocab.CONFIDENCE_KINDS,
    "host.cutmix_partner": ("derangement", "shuffle"),
    "s4mc.confidence": vocab.CONFIDENCE_KINDS,
    "s4mc.neighbourhood": vocab.NEIGHBOURHOODS,
    "s4mc.beta": vocab.BETAS,
    "s4mc.joint": vocab.JOINTS,
    "s4mc.selection": vocab.SELECTIONS,
    "s4mc.cooccurrence_void": vocab.VOID_RULES,
    "s4mc.cpu_kernel": vocab.CPU_KERNELS,
    "train.device": ("auto", "cpu", "cuda"),
    "train.optimizer": ("sgd", "adamw"),
    "train.optimizer_impl": ("auto", "for_loop", "foreach", "fused"),
    "eval.mode": vocab.EVAL_MODES,
    "eval.model": ("auto", "teacher", "student"),
}

# (low, high, low_inclusive, high_inclusive)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "model.width": (0.0, 4.0, False, True),
    "model.fp_dropout": (0.0, 1.0, True, False),
    "model.head_channels": (8, 4096, True, True),
    "data.crop_size": (8, 4096, True, True),
    "data.scale_min": (0.0, 10.0, False, True),
    "data.scale_max": (0.0, 10.0, False, True),
    "data.batch_size": (1, 4096, True, True),
    "data.unlabeled_batch_size": (1, 4096, True, True),
    "data.num_workers": (0, 256, True, True),
    "data.embedded.image_size": (16, 1024, True, True),
    "data.embedded.num_train": (10, 1_000_000, True, True),
    "data.embedded.num_val": (1, 1_000_000, True, True),
    "host.threshold": (-1e9, 1e9, True, True),  # entropy-based kappa is negative; checked per kind below
    "host.unsup_weight": (0.0, 1e6, True, True),
    "host.ema_decay": (0.0, 1.0, True, True),
    "host.cutmix_prob": (0.0, 1.0, True, True),
    "host.w_s1": (0.0, 1e6, True, True),
    "host.w_s2": (0.0, 1e6, True, True),
    "host.w_fp": (0.0, 1e6, True, True),
    "host.loss_scale": (0.0, 1e6, False, True),
    "s4mc.k": (1, vocab.MAX_K, True, True),
    "s4mc.alpha0": (0.0, 1.0, True, True),
    "train.steps": (1, 10**9, True, True),
    "train.epochs": (1, 10**6, True, True),
    "train.sup_only_steps": (0, 10**9, True, True),
    "train.lr": (0.0, 10.0, False, True),
    "train.head_lr_mult": (0.0, 1e4, False, True),
    "train.momentum": (0.0, 1.0, True, False),
    "train.weight_decay": (0.0, 1.0, True, True),
    "train.poly_power": (0.0, 100.0, True, True),
    "train.eval_every": (1, 10**9, True, True),
    "train.log_every": (1, 10**9, True, True),
    "train.keep_checkpoints": (1, 1000, True, True),
    "train.threads": (0, 1024, True, True),
    "eval.crop_size": (0, 8192, True, True),
    "eval.stride_ratio": (0.0, 1.0, False, True),
    "eval.batch_size": (1, 4096, True, True),
}

NEIGHBOUR_COUNT = vocab.NEIGHBOUR_COUNT  # k cannot exceed them (docs/method.md §3)


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted, throw_on_missing=True)


def _fmt_range(lo: float, hi: float, lo_inc: bool, hi_inc: bool) -> str:
    return f"{'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"


def _check_choices_and_ranges(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{key}={value!r} is not allowed; expected one of: {shown}")
    for key, (lo, hi, lo_inc, hi_inc) in RANGES.items():
        value = _get(cfg, key)
        if value is None:
            continue
        ok = (value >= lo if lo_inc else value > lo) and (value <= hi if hi_inc else value < hi)
        if not ok or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key}={value!r} is out of range; expected a value in "
                              f"{_fmt_range(lo, hi, lo_inc, hi_inc)}")


def _cross_key_rules(cfg: DictConfig) -> list[tuple[bool, str]]:
    """(broken, message) for every rule that ties keys together; choices and ranges already hold."""
    n = NEIGHBOUR_COUNT[cfg.s4mc.neighbourhood]
    h, t = cfg.host, cfg.train
    return [
        (cfg.data.scale_min > cfg.data.scale_max,
         f"data.scale_min={cfg.data.scale_min} exceeds data.scale_max={cfg.data.scale_max}"),
        (cfg.s4mc.k > n, f"s4mc.k={cfg.s4mc.k} exceeds the {n} neighbours of "
                         f"s4mc.neighbourhood={cfg.s4mc.neighbourhood!r}; expected 1..{n}"),
        (h.threshold_confidence in ("max", "margin") and not 0.0 <= h.threshold <= 1.0,
         f"host.threshold={h.threshold} is out of range for host.threshold_confidence="
         f"{h.threshold_confidence!r}; expected [0, 1]"),
        (h.threshold_confidence == "entropy" and h.threshold > 0.0,
         f"host.threshold={h.threshold} is out of range for entropy confidence (kappa = -H <= 0); "
         "expected a value <= 0"),
        (len(cfg.model.aspp_rates) != 3 or any(r < 1 for r in cfg.model.aspp_rates),
         f"model.aspp_rates={list(cfg.model.aspp_rates)} is invalid; expected three positive dilation rates, "
         "e.g. [6, 12, 18]"),
        (not cfg.eval.scales or any(s <= 0 for s in cfg.eval.scales),
         f"eval.scales={list(cfg.eval.scales)} is invalid; expected positive scales"),
        # Checkpoints are written at evaluations; aligned log points keep resumed logs identical.
        (t.eval_every % t.log_every != 0,
         f"train.eval_every={t.eval_every} is not a multiple of train.log_every={t.log_every}"),
        # With epochs the step count is known only once the data is built (s4mc/train/build.py).
        (t.epochs is None and t.sup_only_steps >= t.steps,
         f"train.sup_only_steps={t.sup_only_steps} leaves no semi-supervised step of train.steps={t.steps}; "
         "expected a value < train.steps"),
        # s4mc/pretrain.py: the digit encoder exists for the embedded benchmark only.
        (cfg.model.pretrained == "embedded" and cfg.data.name != "embedded",
         f"model.pretrained='embedded' is the embedded benchmark's digit encoder; data.name={cfg.data.name!r} "
         "needs a weights file path (ImageNet weights)"),
        (cfg.data.name != "embedded" and not cfg.data.root,
         f"data.root is required for data.name={cfg.data.name!r}; expected a local path or an s3:// URI"),
    ]


def validate(cfg: DictConfig) -> None:
    """Checks choices, ranges and cross-key rules; raises ConfigError naming the key."""
    _check_choices_and_ranges(cfg)
    for broken, message in _cross_key_rules(cfg):
        if broken:
            raise ConfigError(message)
    if cfg.eval.model == "teacher":
        from s4mc.frameworks.hosts import HOSTS  # lazy: the schema itself needs no torch

        if not HOSTS[cfg.host.name].uses_ema_teacher:
            raise ConfigError(f"eval.model='teacher' but host.name={cfg.host.name!r} has no EMA teacher; "
                              "expected eval.model=auto or student")


def schema() -> DictConfig:
    return OmegaConf.structured(Config)


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key {key!r}: {msg}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`key=value` pairs (dotted keys, YAML values) into a config, failing on malformed pairs."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is malformed; expected key=value, e.g. s4mc.k=2")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides: {str(exc).splitlines()[0]}") from None


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Reads a manifest; a top-level `extends: other.yaml` (relative to the file) is merged first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several classes
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"config file {path} holds a list; expected a mapping of config keys")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in _seen:
        raise ConfigError(f"config file {path}: `extends: {parent}` forms a cycle")
    return OmegaConf.merge(read_yaml(parent_path, _seen + (parent_path,)), loaded)


def as_layer(mapping: Mapping[str, Any] | DictConfig | None) -> DictConfig:
    """A mapping of training-config keys, nested or dotted (``{"train": {"steps": 6}}`` or
    ``{"train.steps": 6}``: the one override form of manifests), as one nested config layer."""
    out = OmegaConf.create({})
    items = mapping.items() if mapping is not None else ()
    for key, value in items:
        OmegaConf.update(out, str(key), value, merge=True, force_add=True)
    return out


def config_layers(path: str | Path | None = None, layers: Sequence[Mapping[str, Any] | DictConfig] = (),
                  base: DictConfig | dict | None = None) -> DictConfig:
    """Schema defaults <- `base` <- YAML file <- mapping layers, merged but not yet validated: a recipe
    (experiments/recipes) may lack what only the whole (e.g. a data root) provides."""
    cfg = schema()
    if base is not None:
        cfg = _merge(cfg, base, "base config")
    if path is not None:
        cfg = _merge(cfg, read_yaml(path), f"config file {path}")
    for layer in layers:
        cfg = _merge(cfg, as_layer(layer), "override mapping")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: DictConfig | dict | None = None,
                layers: Sequence[Mapping[str, Any] | DictConfig] = ()) -> DictConfig:
    """Schema defaults <- `base` <- YAML file <- mapping layers <- key=value overrides, validated, resolved."""
    cfg = config_layers(path, layers, base)
    if overrides:
        cfg = _merge(cfg, parse_overrides(list(overrides)), "command-line override")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config interpolation failed: {str(exc).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a config (MLflow params, tables)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
