"""The typed sweep manifest: what a sweep searches, how many trials, where results go.

A manifest is YAML validated against the dataclasses below (`OmegaConf.structured`), under the same
rules as the training schema in `s4mc/config.py`: an unknown key, a wrong type or a bad value fails
with one `ConfigError` line naming the key, before Ray, Optuna or MLflow start. Search keys are
training-config keys and are checked against the training schema; every categorical choice and
numeric bound is merged into the sweep's base config and validated, so a space that cannot produce a
valid training config is rejected up front. `load_manifest` also resolves every default that depends
on the machine (project folder, storage, tracking URI, Ray address, Optuna storage) to absolute
values, so the rest of the sweep code never guesses. docs/sweeps.md describes every key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from s4mc.config import ConfigError, as_layer, load_config, parse_overrides, read_yaml, schema


@dataclass
class WhenConfig:
    """Sample the parameter only when `key` (an earlier search key, or a fixed training key) matches."""

    key: str = MISSING
    equals: Any = None  # a value or a list of values (any of them)
    not_equals: Any = None  # a value or a list of values (none of them)


@dataclass
class ParamConfig:
    key: str = MISSING  # dotted training-config key, e.g. s4mc.neighbourhood
    type: str = MISSING  # categorical | int | float | loguniform
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    when: WhenConfig | None = None


@dataclass
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0  # fractional: trials share a GPU; > 1 (whole): that many data-parallel GPU workers
    workers: int | None = None  # data-parallel Ray Train workers per trial; None = gpu if gpu > 1, else 1


def dp_workers(r: ResourcesConfig) -> int:
    """Data-parallel workers of one trial (1 = a plain trial)."""
    return int(r.workers) if r.workers else (int(r.gpu) if r.gpu > 1 else 1)


@dataclass
class SchedulerConfig:
    name: str = "asha"  # asha | fifo
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: float = 2.0
    max_t: int | None = None  # evaluations; None = the number of evaluations of one training run


@dataclass
class SamplerConfig:
    name: str = "tpe"  # tpe | random
    seed: int = 0
    n_startup_trials: int = 10  # TPE's random warm-up trials (Optuna's default)
    # Optuna 5's TPE defaults are multivariate with constant liar, whose suggestions depend on how many
    # trials run at once (docs/platform.md); off keeps a seeded sweep reproducible.
    multivariate: bool = False
    constant_liar: bool = False


@dataclass
class TrackingConfig:
    uri: str | None = None  # default sqlite:///<project>/mlruns/mlflow.db; env MLFLOW_TRACKING_URI wins
    experiment: str | None = None  # default: the sweep name


@dataclass
class NoiseFloorConfig:
    """The seed noise of the sweep's default configuration, measured elsewhere (e.g. a 3-seed table).

    A trial whose gap to the best is within ``value`` is no evidence of a worse configuration: the
    sweep summary marks which differences exceed it."""

    value: float | None = None  # in the metric's unit; None = not measured, no marks
    source: str = ""  # where it was measured (file and how)


@dataclass
class RayManifestConfig:
    address: str | None = None  # None: a local Ray started by the sweep; env RAY_ADDRESS wins
    num_cpus: int | None = None  # local Ray only; None = all cores
    object_store_mb: int = 512  # local Ray only; Ray's default is 30% of RAM (docs/platform.md)
    temp_dir: str = "/tmp/ray-s4mc"  # local Ray only; socket paths must stay < 107 bytes (docs/platform.md)
    # The cluster adds nodes on demand (Ray autoscaler, KubeRay): a trial that no node fits yet waits for
    # one instead of failing at once (orchestration/execution.py).
    autoscaling: bool = False


@dataclass
class Manifest:
    name: str = MISSING
    base: str | None = None  # training config YAML; relative paths are taken from the project folder
    # Training-config keys applied to every trial, nested or dotted (s4mc.config.as_layer): the same form
    # as a paper manifest's `overrides`; on the command line `overrides.train.steps=600`.
    overrides: dict[str, Any] = field(default_factory=dict)
    search: list[ParamConfig] = field(default_factory=list)
    num_trials: int = 8
    max_concurrent: int = 2
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metric: str = "eval/mIoU"
    mode: str = "max"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    evaluate_default_first: bool = True
    project: str | None = None  # default: the folder holding pyproject.toml above the manifest, else cwd
    storage: str | None = None  # local path or s3://bucket/prefix; default <project>/sweeps/<name>
    work_dir: str | None = None  # node-local trial run folders; default <project>/sweeps/<name>/runs
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayManifestConfig = field(default_factory=RayManifestConfig)
    optuna_storage: str | None = None  # default sqlite:///<project>/sweeps/<name>/optuna.db
    retries: int = 2  # Ray FailureConfig.max_failures per trial
    noise_floor: NoiseFloorConfig = field(default_factory=NoiseFloorConfig)


PARAM_TYPES = ("categorical", "int", "float", "loguniform")
# Keys a sweep may not search: seeds come from `seeds`, run folders from the sweep itself.
FORBIDDEN_PREFIXES = ("run.", "train.seed", "train.progress")
METRIC_PREFIXES = ("eval/", "pl/", "train/")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def condition_holds(when: WhenConfig, value: Any) -> bool:
    """Whether a conditional parameter is active given the value of `when.key`."""
    equals, not_equals = _as_list(when.equals), _as_list(when.not_equals)
    if equals is not None and value not in equals:
        return False
    return not (not_equals is not None and value in not_equals)


def _project_root(manifest_path: Path | None) -> Path:
    if manifest_path is not None:
        for parent in manifest_path.resolve().parents:
            if (parent / "pyproject.toml").is_file():
                return parent
    return Path.cwd().resolve()


def _abs(path: str, project: Path) -> str:
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (project / p).resolve())


def _first_failure(where: str, rules: list[tuple[bool, str]]) -> None:
    for bad, message in rules:
        if bad:
            raise ConfigError(f"{where}: {message}")


def _check_key(where: str, p: ParamConfig, train_schema: DictConfig, earlier: dict[str, ParamConfig]) -> None:
    parent, _, leaf = p.key.rpartition(".")
    section = OmegaConf.select(train_schema, parent, default=None) if parent else train_schema
    if not isinstance(section, DictConfig) or leaf not in section:
        raise ConfigError(f"{where}: key {p.key!r} is not a training-config key (see s4mc/config.py)")
    _first_failure(where, [
        (isinstance(section[leaf], DictConfig | ListConfig),
         f"key {p.key!r} is a section or a list; expected a single value key"),
        (p.key.startswith(FORBIDDEN_PREFIXES),
         f"key {p.key!r} cannot be searched (seeds come from `seeds`, run folders from the sweep)"),
        (p.key in earlier, f"key {p.key!r} appears twice in search"),
        (p.type not in PARAM_TYPES, f"type={p.type!r} is not allowed; expected one of: {', '.join(PARAM_TYPES)}"),
    ])


def _categorical_values(where: str, p: ParamConfig) -> list[Any]:
    _first_failure(where, [
        (not p.choices, "categorical needs a non-empty `choices` list"),
        (p.low is not None or p.high is not None or p.step is not None,
         "categorical takes `choices`, not low/high/step"),
        (len({repr(c) for c in p.choices or ()}) != len(p.choices or ()), f"choices={p.choices} has duplicates"),
    ])
    return list(p.choices)


def _whole(value: float | None) -> bool:
    return value is None or float(value).is_integer()


def _range_values(where: str, p: ParamConfig) -> list[Any]:
    _first_failure(where, [
        (p.choices is not None, f"type={p.type} takes low/high, not `choices`"),
        (p.low is None or p.high is None or not p.low < p.high,
         f"needs low < high, got low={p.low}, high={p.high}"),
    ])
    _first_failure(where, [
        (p.type == "int" and not (_whole(p.low) and _whole(p.high) and _whole(p.step) and (p.step or 1) >= 1),
         f"type=int needs whole low/high/step, got low={p.low}, high={p.high}, step={p.step}"),
        (p.type == "loguniform" and (p.low <= 0 or p.step is not None),
         f"loguniform needs low > 0 and no step, got low={p.low}, step={p.step}"),
        (p.step is not None and p.step <= 0, f"step={p.step} must be positive"),
    ])
    return [int(p.low), int(p.high)] if p.type == "int" else [float(p.low), float(p.high)]


def _check_values(where: str, p: ParamConfig, base: DictConfig, values: list[Any]) -> None:
    for value in values:  # every choice / bound must give a valid training config
        try:
            load_config(None, base=OmegaConf.merge(base, as_layer({p.key: value})))
        except ConfigError as exc:
            raise ConfigError(f"{where}: value {value!r} gives an invalid training config: {exc}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: value {value!r} does not fit the key's type: "
                              f"{str(exc).splitlines()[0]}") from None


def _check_when(where: str, w: WhenConfig, base: DictConfig, earlier: dict[str, ParamConfig],
                all_keys: set[str]) -> None:
    _first_failure(where, [
        (w.equals is None and w.not_equals is None, "when needs `equals` or `not_equals`"),
        (w.key in all_keys and w.key not in earlier, f"when.key={w.key!r} is searched below this parameter; "
                                                     "list it above (parameters are sampled in order)"),
    ])
    if w.key in earlier:
        return
    fixed = OmegaConf.select(base, w.key, default="__missing__")
    _first_failure(where, [
        (fixed == "__missing__", f"when.key={w.key!r} is neither an earlier search key nor a training-config "
                                 "key (a condition must refer to a parameter listed above it)"),
        (fixed != "__missing__" and not condition_holds(w, fixed),
         f"when.key={w.key!r} is fixed at {fixed!r} by the base config, so this parameter would never be sampled"),
    ])


def _check_param(i: int, p: ParamConfig, train_schema: DictConfig, base: DictConfig,
                 earlier: dict[str, ParamConfig], all_keys: set[str]) -> None:
    where = f"search[{i}] ({p.key})"
    _check_key(where, p, train_schema, earlier)
    values = _categorical_values(where, p) if p.type == "categorical" else _range_values(where, p)
    _check_values(where, p, base, values)
    if p.when is not None:
        _check_when(where, p.when, base, earlier, all_keys)


def base_training_config(m: Manifest) -> DictConfig:
    """The base config + manifest overrides every trial starts from (validated)."""
    try:
        return load_config(m.base, layers=[m.overrides])
    except ConfigError as exc:
        raise ConfigError(f"base/overrides of sweep {m.name!r}: {exc}") from None


def _validate(m: Manifest) -> None:
    checks: list[tuple[bool, str]] = [
        (bool(_NAME.match(m.name)), f"name={m.name!r} is invalid; expected letters, digits, '_', '.', '-' "
                                    "(it names folders, the Optuna study and MLflow runs)"),
        (m.num_trials >= 1, f"num_trials={m.num_trials} must be >= 1"),
        (m.max_concurrent >= 1, f"max_concurrent={m.max_concurrent} must be >= 1"),
        (m.resources_per_trial.cpu > 0, f"resources_per_trial.cpu={m.resources_per_trial.cpu} must be > 0"),
        (m.resources_per_trial.gpu >= 0, f"resources_per_trial.gpu={m.resources_per_trial.gpu} must be >= 0"),
        (m.resources_per_trial.gpu <= 1 or float(m.resources_per_trial.gpu).is_integer(),
         f"resources_per_trial.gpu={m.resources_per_trial.gpu}: above 1 it counts data-parallel workers "
         "and must be whole"),
        (m.resources_per_trial.workers is None or m.resources_per_trial.workers >= 1,
         f"resources_per_trial.workers={m.resources_per_trial.workers} must be >= 1"),
        (m.resources_per_trial.gpu <= 1 or m.resources_per_trial.workers in (None, int(m.resources_per_trial.gpu)),
         f"resources_per_trial.workers={m.resources_per_trial.workers} must equal resources_per_trial.gpu="
         f"{m.resources_per_trial.gpu} (one GPU per data-parallel worker)"),
        (m.scheduler.name in ("asha", "fifo"), f"scheduler.name={m.scheduler.name!r} is not allowed; "
                                               "expected one of: asha, fifo"),
        (m.scheduler.grace_period >= 1, f"scheduler.grace_period={m.scheduler.grace_period} must be >= 1"),
        (m.scheduler.reduction_factor > 1, f"scheduler.reduction_factor={m.scheduler.reduction_factor} "
                                           "must be > 1"),
        (m.scheduler.max_t is None or m.scheduler.max_t >= m.scheduler.grace_period,
         f"scheduler.max_t={m.scheduler.max_t} must be >= scheduler.grace_period={m.scheduler.grace_period}"),
        (m.metric.startswith(METRIC_PREFIXES), f"metric={m.metric!r} is not a trainer metric; expected a key "
                                               "starting with eval/, pl/ or train/ (docs/architecture.md)"),
        (m.mode in ("max", "min"), f"mode={m.mode!r} is not allowed; expected one of: max, min"),
        (m.sampler.name in ("tpe", "random"), f"sampler.name={m.sampler.name!r} is not allowed; "
                                              "expected one of: tpe, random"),
        (m.sampler.n_startup_trials >= 0, f"sampler.n_startup_trials={m.sampler.n_startup_trials} must be >= 0"),
        (len(m.seeds) >= 1 and all(s >= 0 for s in m.seeds),
         f"seeds={list(m.seeds)} is invalid; expected a non-empty list of non-negative integers"),
        (len(set(m.seeds)) == len(m.seeds), f"seeds={list(m.seeds)} has duplicates"),
        (m.retries >= 0, f"retries={m.retries} must be >= 0"),
        (m.ray.num_cpus is None or m.ray.num_cpus >= 1, f"ray.num_cpus={m.ray.num_cpus} must be >= 1"),
        (m.ray.object_store_mb >= 80, f"ray.object_store_mb={m.ray.object_store_mb} must be >= 80 "
                                      "(Ray's minimum object store)"),
        (len(m.ray.temp_dir) <= 40, f"ray.temp_dir={m.ray.temp_dir!r} is too long; Ray's socket paths must "
                                    "stay under 107 bytes (docs/platform.md), keep it <= 40 characters"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _apply_override(cfg: DictConfig, item: str) -> None:
    # OmegaConf.update walks list indices too (search.0.high=3), which a dotlist merge cannot.
    parse_overrides([item])  # same malformed-pair message as the trainer's overrides
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    # New keys are allowed under the training-config overrides only; elsewhere the key must exist.
    if not key.startswith("overrides.") and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
        raise ConfigError(f"override {item!r}: key {key!r} is not a manifest key")
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None


def load_manifest(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Manifest:
    """Reads, validates and resolves a manifest; overrides are `key=value` on manifest keys."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Manifest), raw)
        if not isinstance(raw.get("overrides", {}), Mapping):
            raise ConfigError(f"manifest {path}: overrides must be a mapping of training-config keys, e.g. "
                              "{train.steps: 600} or {train: {steps: 600}} (docs/sweeps.md)")
        cfg.overrides = as_layer(cfg.overrides)  # dotted keys nested: command-line overrides merge into them
        for item in overrides:
            _apply_override(cfg, item)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"manifest {path}: key {missing[0]!r} is required")
        m: Manifest = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"manifest {path}: key {key!r}: {str(exc).splitlines()[0]}") from None
    _validate(m)
    project = Path(m.project).expanduser().resolve() if m.project else _project_root(path)
    m.project = str(project)
    if m.base:
        m.base = _abs(m.base, project)
        if not Path(m.base).is_file():
            raise ConfigError(f"base={m.base!r}: the training config file does not exist")
    base = base_training_config(m)
    train_schema = schema()
    earlier: dict[str, ParamConfig] = {}
    for i, p in enumerate(m.search):
        _check_param(i, p, train_schema, base, earlier, {q.key for q in m.search})
        earlier[p.key] = p
    sweep_dir = project / "sweeps" / m.name
    m.storage = _abs(m.storage, project) if m.storage else str(sweep_dir)
    m.work_dir = _abs(m.work_dir, project) if m.work_dir else str(Path(sweep_dir_of(m)) / "runs")
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    m.tracking.uri = env_uri or m.tracking.uri or f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    m.tracking.experiment = m.tracking.experiment or m.name
    m.ray.address = os.environ.get("RAY_ADDRESS") or m.ray.address
    m.optuna_storage = m.optuna_storage or f"sqlite:///{Path(sweep_dir_of(m)) / 'optuna.db'}"
    return m


def sweep_dir_of(m: Manifest) -> str:
    """The driver-local sweep folder (results, Optuna DB, state): storage itself when it is local."""
    if m.storage and "://" not in m.storage:
        return m.storage
    return str(Path(m.project or ".") / "sweeps" / m.name)


def to_yaml(m: Manifest) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(m))
