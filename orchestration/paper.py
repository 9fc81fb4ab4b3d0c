"""Paper-reproduction manifests (experiments/paper/<table>.yaml): typed, validated before anything runs.

One manifest per published table (docs/method.md §8): the training set-up shared by its cells (`base`, a
recipe in experiments/recipes, and `overrides`; docs/method.md §7), the seeds, and the cells, each with its
row (method), column (label count / split), host framework, S4MC options, published value and tolerance.
The schema is the dataclasses below under `OmegaConf.structured`, with the rules of the training schema
(s4mc/config.py): an unknown key or a wrong type fails with one `ConfigError` line naming it.
`load_table` also (1) resolves every cell's training config (schema <- `base` <- `overrides` <- the
cell's `overrides`) through `s4mc.config.load_config`, so a wrong training key fails here and not inside
a trial; (2) checks that each cell lists exactly the split files the data loader will read and that
every file still has the sha256 the manifest records; (3) estimates the GPU-hours of a cell x seed from
the published schedule (see `estimate_gpu_hours`). Data roots and pretrained weights are machine facts,
never in a manifest: they come from `--data-root` / `--pretrained` or the environment variables the
manifest names; a dry run shows a placeholder.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration.manifest import RayManifestConfig, ResourcesConfig, TrackingConfig
from s4mc.config import ConfigError, as_layer, config_layers, flatten, load_config, parse_overrides, read_yaml
from s4mc.data.splits import DEFAULT_SPLITS_DIR, file_sha256

PROJECT_DIR = Path(__file__).resolve().parents[1]
PAPER_DIR = PROJECT_DIR / "experiments" / "paper"
DEFAULT_EXPERIMENT = "s4mc-paper"  # one MLflow experiment for every table; a parent run per table
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
# Relative cost of one training image per backbone / output stride, against ResNet-101 OS16 (an
# assumption from the encoders' multiply-adds, not a measurement): ResNet-50 has ~0.55x the backbone
# multiply-adds of ResNet-101 (He et al. 2016, Table 1: 4.1 vs 7.8 GFLOPs) and shares the head; an
# OS8 ResNet runs layer3-4 and ASPP at 4x the pixels of OS16, about 2.5x the whole network.
BACKBONE_COST = {"resnet18": 0.35, "resnet34": 0.5, "resnet50": 0.65, "resnet101": 1.0, "xception65": 1.0}
OS8_COST = 2.5
NO_GRAD_COST = 1 / 3  # a forward without backward costs ~1/3 of forward + backward


@dataclass
class SplitFile:
    path: str = MISSING  # relative to experiments/splits, as in its SHA256SUMS
    sha256: str = MISSING


@dataclass
class Budget:
    """The basis of the GPU-hour estimates; every number here is an assumption, stated as one."""

    gpu_class: str = "A100-80GB-class GPU, bf16 autocast"
    ref_img_per_s: float = 60.0  # assumed training images/s (forward + backward), R101-OS16 at ref_crop
    ref_crop: int = 321
    pool_images: int | None = None  # training pool where no unlabeled list is vendored (COCO)
    basis: str = ""


@dataclass
class Cell:
    row: str = MISSING  # method, as the paper's row: "CutMix-Seg + S4MC"
    column: str = MISSING  # label count / split, as the paper's column: "366", "1/512"
    host: str | None = None  # host.name (required unless the table has runs_from)
    split: str | None = None  # data.split
    split_family: str | None = None  # data.split_family (real data sets)
    split_files: list[SplitFile] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # training-config keys of this cell (S4MC options, ...)
    published: float | None = None  # null = unknown (docs/method.md §8 lists no value)
    published_std: float | None = None
    published_delta: float | None = None  # a published difference against the row `delta_of`
    delta_of: str | None = None
    tolerance: float | None = None  # default: the table's
    gpu_hours: float | None = None  # per seed; default: estimate_gpu_hours
    notes: str = ""


@dataclass
class PaperTable:
    table: str = MISSING  # id: names the MLflow tag `table`, the storage folder and the report files
    title: str = MISSING
    source: str = "docs/method.md §8"
    metric: str = "eval/mIoU"
    base: str | None = None  # training config YAML, e.g. a recipe in experiments/recipes (project-relative)
    overrides: dict[str, Any] = field(default_factory=dict)  # training-config keys over `base`, every cell
    data_root_env: str | None = None  # env var holding data.root (real data sets)
    pretrained_env: str | None = None  # env var holding model.pretrained (ImageNet weights)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tolerance: float = 1.0
    tolerance_basis: str = ""
    budget: Budget = field(default_factory=Budget)
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(cpu=8.0, gpu=1.0))
    max_concurrent: int | None = None  # None: as many as the cluster's resources allow
    retries: int = 2  # Ray FailureConfig.max_failures per trial
    runs_from: str | None = None  # the trainings are another table's (table9 reads table5's runs)
    notes: str = ""
    cells: list[Cell] = field(default_factory=list)
    project: str | None = None  # default: the folder holding pyproject.toml above the manifest
    storage: str | None = None  # local path or s3://; default <project>/reproduce/<table>
    work_dir: str | None = None  # node-local run folders; default <storage or project>/runs
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayManifestConfig = field(default_factory=RayManifestConfig)


@dataclass
class ResolvedCell:
    index: int
    cell: Cell
    config: DictConfig  # the full, validated training config (placeholders for unset machine paths)
    overrides: dict[str, Any]  # dotted training keys this cell sets over `base` (what a trial applies)
    gpu_hours: float  # per seed

    @property
    def id(self) -> str:
        return f"c{self.index:02d}"


@dataclass
class LoadedTable:
    spec: PaperTable
    path: Path
    cells: list[ResolvedCell]
    unset: list[str] = field(default_factory=list)  # machine paths a real run still needs


def split_label(cfg: DictConfig) -> str:
    """`u2pl/pascal/366`, `unimatch/coco/1_512`, `embedded/25`: which labeled split a config trains on."""
    if cfg.data.name == "embedded":
        return f"embedded/{cfg.data.split}"
    return f"{cfg.data.split_family}/{cfg.data.name}/{cfg.data.split}"


def table_path(table: str | Path) -> Path:
    """`table1` -> experiments/paper/table1.yaml; a path to a YAML file stays as it is."""
    text = str(table)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return Path(text)
    return PAPER_DIR / f"{text}.yaml"


def available_tables() -> list[str]:
    return sorted(p.stem for p in PAPER_DIR.glob("*.yaml"))


def _apply_override(cfg: DictConfig, item: str) -> None:
    parse_overrides([item])  # the trainer's message for a malformed pair
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    # New keys are allowed under the free-form training overrides only; elsewhere the key must exist.
    free = key.startswith("overrides.") or re.match(r"^cells\.\d+\.overrides\.", key)
    if not free and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
        raise ConfigError(f"override {item!r}: key {key!r} is not a paper-manifest key")
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=bool(free))
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None


def _parse(path: Path, overrides: list[str] | tuple[str, ...]) -> PaperTable:
    raw = read_yaml(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PaperTable), raw)
        for item in overrides:
            _apply_override(cfg, item)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"paper manifest {path}: key {missing[0]!r} is required")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"paper manifest {path}: key {key!r}: {str(exc).splitlines()[0]}") from None


def _check_table(t: PaperTable, path: Path) -> None:
    checks = [
        (bool(_NAME.match(t.table)), f"table={t.table!r} is invalid; expected letters, digits, '_', '.', '-'"),
        (t.metric.startswith("eval/"), f"metric={t.metric!r} is not an evaluation metric; expected eval/..."),
        (bool(t.seeds) and all(s >= 0 for s in t.seeds) and len(set(t.seeds)) == len(t.seeds),
         f"seeds={list(t.seeds)} is invalid; expected distinct non-negative integers"),
        (t.tolerance > 0, f"tolerance={t.tolerance} must be > 0"),
        (t.resources.cpu > 0 and t.resources.gpu >= 0, f"resources={t.resources} needs cpu > 0, gpu >= 0"),
        (t.max_concurrent is None or t.max_concurrent >= 1, f"max_concurrent={t.max_concurrent} must be >= 1"),
        (t.retries >= 0, f"retries={t.retries} must be >= 0"),
        (t.budget.ref_img_per_s > 0 and t.budget.ref_crop > 0, "budget.ref_img_per_s and budget.ref_crop must be > 0"),
        (bool(t.cells), "cells is empty; a table needs at least one cell"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"paper manifest {path}: {message}")
    rows_by_column: dict[str, set[str]] = {}
    for c in t.cells:
        rows_by_column.setdefault(c.column, set()).add(c.row)
    seen: set[tuple[str, str]] = set()
    for i, c in enumerate(t.cells):
        where = f"paper manifest {path}: cells[{i}] ({c.row} | {c.column})"
        if (c.row, c.column) in seen:
            raise ConfigError(f"{where}: the (row, column) pair appears twice")
        seen.add((c.row, c.column))
        _check_cell(where, c, rows_by_column[c.column], t.runs_from is None)


# mIoU values are percentages; a published difference may be negative; GPU-hours have no upper bound.
CELL_RANGES = (("published", 0, 100), ("published_std", 0, 100), ("published_delta", -100, 100),
               ("tolerance", 0, 100), ("gpu_hours", 0, math.inf))


def _check_cell(where: str, c: Cell, rows_of_column: set[str], trains: bool) -> None:
    for name, lo, hi in CELL_RANGES:
        value = getattr(c, name)
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise ConfigError(f"{where}: {name}={value} is out of range; expected a value in [{lo}, {hi}]")
    rules = [
        ((c.published_delta is None) != (c.delta_of is None), "published_delta and delta_of go together"),
        (c.delta_of is not None and c.delta_of not in rows_of_column,
         f"delta_of={c.delta_of!r} is not a row of column {c.column!r}"),
        (trains and (c.host is None or c.split is None),
         "host and split are required (only a runs_from table may omit them)"),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(f"{where}: {message}")


@lru_cache(maxsize=256)
def _sha(path: str, mtime_ns: int, size: int) -> str:  # keyed by stat: an edited file is hashed again
    return file_sha256(path)


def _line_count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def expected_split_files(dataset: str, family: str, split: str, splits_dir: Path) -> list[str]:
    """The list files `s4mc.data.splits.resolve_split` reads for this split (relative paths)."""
    name = str(split).replace("/", "_")
    rels = [f"{family}/{dataset}/{name}/labeled.txt", f"{family}/{dataset}/{name}/unlabeled.txt",
            f"{family}/{dataset}/val.txt"]
    return [r for r in rels if (splits_dir / r).is_file() or not r.endswith("unlabeled.txt")]


def _check_splits(where: str, cfg: DictConfig, cell: Cell, splits_dir: Path) -> None:
    if cfg.data.name == "embedded":
        if cell.split_files:
            raise ConfigError(f"{where}: split_files are for real data sets; the embedded splits are generated")
        return
    expected = expected_split_files(cfg.data.name, cfg.data.split_family, cfg.data.split, splits_dir)
    listed = [f.path for f in cell.split_files]
    if sorted(listed) != sorted(expected):
        raise ConfigError(f"{where}: split_files {listed} differ from the files the loader reads for "
                          f"{cfg.data.split_family}/{cfg.data.name}/{cfg.data.split}: {expected}")
    for f in cell.split_files:
        file = splits_dir / f.path
        if not file.is_file():
            raise ConfigError(f"{where}: split file {file} does not exist")
        if not _SHA.match(f.sha256):
            raise ConfigError(f"{where}: split file {f.path}: sha256={f.sha256!r} is not a 64-digit hex digest")
        st = file.stat()
        actual = _sha(str(file), st.st_mtime_ns, st.st_size)
        if actual != f.sha256:
            raise ConfigError(f"{where}: split file {file} has sha256 {actual}, but the manifest records "
                              f"{f.sha256}: the vendored file changed (experiments/splits/README.md)")


def estimate_gpu_hours(cfg: DictConfig, cell: Cell, budget: Budget, splits_dir: Path) -> float:
    """GPU-hours of one cell x seed: an ESTIMATE, training only (evaluation adds a few percent).

    steps = epochs x ceil(pool / batch) as the trainer counts them (s4mc/train/build.py: the unlabeled
    pool, or the labeled one for the supervised host); images per step by host (s4mc/frameworks/hosts.py:
    gradient passes, plus no-grad teacher passes at 1/3 the cost); throughput = the budget's assumed
    images/s at ref_crop, scaled by crop area, backbone and output stride (BACKBONE_COST, OS8_COST).
    """
    if cell.gpu_hours is not None:
        return float(cell.gpu_hours)
    if cfg.data.name == "embedded" or cfg.train.device == "cpu":
        return 0.0
    host, b_l, b_u = cfg.host.name, cfg.data.batch_size, cfg.data.unlabeled_batch_size
    files = {Path(f.path).name: splits_dir / f.path for f in cell.split_files}
    labeled = _line_count(files["labeled.txt"])
    if host == "supervised":
        pool, batch = labeled, b_l
    elif "unlabeled.txt" in files:
        pool, batch = _line_count(files["unlabeled.txt"]), b_u
    elif budget.pool_images:
        pool, batch = budget.pool_images - labeled, b_u
    else:
        raise ConfigError(f"cell {cell.row} | {cell.column}: no unlabeled list and no budget.pool_images")
    steps = cfg.train.epochs * math.ceil(pool / batch) if cfg.train.epochs else cfg.train.steps
    grad, no_grad = {"supervised": (b_l, 0), "cutmix_seg": (b_l + b_u, b_u), "fixmatch": (b_l + 2 * b_u, 0),
                     "unimatch": (b_l + 3 * b_u, 0)}[host]
    if host == "unimatch" and cfg.host.w_fp > 0:
        grad += 0.25 * b_u  # the feature-perturbed decoder pass (the encoder output is shared)
    cost = BACKBONE_COST.get(cfg.model.backbone, 1.0) * (OS8_COST if cfg.model.output_stride == 8 else 1.0)
    img_per_s = budget.ref_img_per_s * (budget.ref_crop / cfg.data.crop_size) ** 2 / cost
    return steps * (grad + NO_GRAD_COST * no_grad) / img_per_s / 3600


def _project(t: PaperTable, path: Path) -> Path:
    if t.project:
        return Path(t.project).expanduser().resolve()
    for parent in path.resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd().resolve()


def _machine_path(value: str | None, env: str | None, what: str, flag: str, unset: list[str]) -> str | None:
    value = value or (os.environ.get(env) if env else None)
    if value or not env:
        return value
    unset.append(f"{what}: export {env}=... or pass {flag}")
    return f"<unset:{env}>"  # a dry run still validates every cell; a real run refuses (LoadedTable.unset)


def load_table(table: str | Path, overrides: list[str] | tuple[str, ...] = (), *, data_root: str | None = None,
               pretrained: str | None = None, storage: str | None = None, splits_dir: str | Path | None = None,
               _resolving: tuple[str, ...] = ()) -> LoadedTable:
    """Reads and validates a paper manifest; every cell's training config is resolved and validated."""
    path = table_path(table)
    if not path.is_file():
        known = ", ".join(available_tables())
        raise ConfigError(f"paper manifest {path} does not exist; tables: {known}")
    t = _parse(path, overrides)
    _check_table(t, path)
    splits = Path(splits_dir) if splits_dir is not None else DEFAULT_SPLITS_DIR
    project = _project(t, path)
    t.project = str(project)
    if t.runs_from is not None:
        return _borrow(t, path, _resolving, splits)
    if t.base:
        base = Path(t.base).expanduser()
        t.base = str(base if base.is_absolute() else (project / base).resolve())
        if not Path(t.base).is_file():
            raise ConfigError(f"paper manifest {path}: base={t.base!r} does not exist")
    unset: list[str] = []
    machine = {"data.root": _machine_path(data_root, t.data_root_env, "data.root", "--data-root", unset),
               "model.pretrained": _machine_path(pretrained, t.pretrained_env, "model.pretrained", "--pretrained",
                                                 unset)}
    base_cfg = config_layers(t.base)  # a recipe: validated below with each cell's keys (e.g. a data root)
    cells = []
    for i, c in enumerate(t.cells):
        where = f"paper manifest {path}: cells[{i}] ({c.row} | {c.column})"
        own = {"host.name": c.host, "data.split": c.split, **({"data.split_family": c.split_family}
                                                                if c.split_family else {})}
        layers = [flatten(dict(t.overrides)), own, flatten(dict(c.overrides)),
                  {k: v for k, v in machine.items() if v is not None}]
        dotted = {k: v for layer in layers for k, v in layer.items()}
        try:
            cfg = load_config(None, base=OmegaConf.merge(base_cfg, as_layer(dotted)))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except OmegaConfBaseException as exc:  # an unknown or ill-typed training key in overrides
            raise ConfigError(f"{where}: key {getattr(exc, 'full_key', None) or '?'!r}: "
                              f"{str(exc).splitlines()[0]}") from None
        _check_splits(where, cfg, c, splits)
        cells.append(ResolvedCell(i, c, cfg, dotted, estimate_gpu_hours(cfg, c, t.budget, splits)))
    t.storage = storage or t.storage or str(project / "reproduce" / t.table)
    if "://" not in t.storage:
        t.storage = str((project / t.storage).resolve())
    local_root = t.storage if "://" not in t.storage else str(project / "reproduce" / t.table)
    t.work_dir = t.work_dir or str(Path(local_root) / "runs")
    t.tracking.uri = os.environ.get("MLFLOW_TRACKING_URI") or t.tracking.uri or \
        f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    t.tracking.experiment = t.tracking.experiment or DEFAULT_EXPERIMENT
    t.ray.address = os.environ.get("RAY_ADDRESS") or t.ray.address
    return LoadedTable(t, path, cells, unset)


def _borrow(t: PaperTable, path: Path, resolving: tuple[str, ...], splits: Path) -> LoadedTable:
    """A runs_from table (paper Table 9: Boundary IoU of the COCO models of Table 5) reports another
    table's trainings under its own metric: its cells must exist there and take their definitions."""
    if t.runs_from in resolving + (t.table,):
        raise ConfigError(f"paper manifest {path}: runs_from={t.runs_from!r} forms a cycle")
    source = load_table(t.runs_from, splits_dir=splits, _resolving=resolving + (t.table,))
    by_key = {(rc.cell.row, rc.cell.column): rc for rc in source.cells}
    cells = []
    for i, c in enumerate(t.cells):
        rc = by_key.get((c.row, c.column))
        if rc is None:
            raise ConfigError(f"paper manifest {path}: cells[{i}] ({c.row} | {c.column}) is not a cell of "
                              f"runs_from={t.runs_from!r}")
        merged = Cell(**{**vars(rc.cell), "published": c.published, "published_std": c.published_std,
                         "published_delta": None, "delta_of": None, "tolerance": c.tolerance, "notes": c.notes})
        cells.append(ResolvedCell(rc.index, merged, rc.config, rc.overrides, 0.0))  # no training of its own
    t.tracking.uri = source.spec.tracking.uri
    t.tracking.experiment = t.tracking.experiment or source.spec.tracking.experiment
    return LoadedTable(t, path, cells, [])
