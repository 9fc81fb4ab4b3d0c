"""`reproduce`: run a paper table's cells x seeds on Ray as a grid, tracked in MLflow like a sweep.

A paper manifest (experiments/paper/<table>.yaml, orchestration/paper.py) expands into one trial per
cell x seed. Each trial is the sweep's own trial function (`orchestration.trial.trial_main`: training,
Ray reports with checkpoints, exact resume, the MLflow `TrialTracker`) run with a one-seed sweep
manifest whose name is `<table>-<cell id>`, so its trial key is `<table>-c07-t002` (cell 7, seed 2).
Before training, the trial opens its MLflow child run itself with the reproduction tags (table, cell,
row, column, seed, published), and the tracker reuses that run by its trial_key. The table has one
MLflow parent run (the sweep's `start_sweep_run`, named by the table id) in the experiment
`s4mc-paper`. `--dry-run` loads and validates everything and prints each cell with its split files,
host, options, seeds and the GPU-hour estimate, without starting Ray or MLflow. `--resume` restores
Ray's experiment (unfinished trials continue from their last checkpoint) and skips every trial whose
MLflow run is already FINISHED; without Ray's saved state it starts the unfinished ones afresh.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from orchestration.paper import LoadedTable, ResolvedCell, load_table, split_label
from orchestration.secrets import secure_manifest
from s4mc.config import ConfigError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # as orchestration/cli.py


class ReproduceError(ConfigError):
    """The reproduction cannot start as asked (state exists without --resume, unset data root, ...)."""


@dataclass
class TrialSpec:
    """One cell x seed: everything a Ray worker needs, picklable."""

    key: str
    table: str
    cell: str
    row: str
    column: str
    seed: int
    overrides: dict[str, Any]
    settings: Any  # orchestration.trial.TrialSettings of this cell x seed
    tags: dict[str, str]


def cell_options(rc: ResolvedCell) -> dict[str, Any]:
    from s4mc.config import flatten

    return flatten(dict(rc.cell.overrides))


def list_cells(table, **load_kwargs) -> list[dict[str, Any]]:
    """One row per cell: id, row, column, host, split, split files, options, seeds, GPU-hour estimate."""
    loaded = table if isinstance(table, LoadedTable) else load_table(table, **load_kwargs)
    t = loaded.spec
    rows = []
    for rc in loaded.cells:
        cfg = rc.config
        rows.append({"id": rc.id, "row": rc.cell.row, "column": rc.cell.column, "host": cfg.host.name,
                     "split": split_label(cfg),
                     "split_files": [(f.path, f.sha256) for f in rc.cell.split_files],
                     "options": cell_options(rc), "seeds": list(t.seeds), "gpu_hours_per_seed": rc.gpu_hours,
                     "gpu_hours": rc.gpu_hours * len(t.seeds), "published": rc.cell.published,
                     "tolerance": rc.cell.tolerance or t.tolerance})
    return rows


def _fmt_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_dry_run(loaded: LoadedTable) -> str:
    t = loaded.spec
    rows = list_cells(loaded)
    lines = [f"{t.table}: {t.title} | published values: {t.source}",
             f"metric {t.metric} | seeds {list(t.seeds)} | tolerance ±{t.tolerance:g} | per trial cpu="
             f"{t.resources.cpu:g} gpu={t.resources.gpu:g} | max concurrent {t.max_concurrent or 'cluster-bound'}",
             f"storage {t.storage or f'that of {t.runs_from}'} | tracking {t.tracking.uri} "
             f"(experiment {t.tracking.experiment})"]
    if t.runs_from:
        lines.append(f"no trainings of its own: reports the runs of {t.runs_from} under {t.metric}")
    lines += [f"UNSET {u}" for u in loaded.unset]
    lines.append(f"{'id':<4} {'row':<34} {'column':<12} {'host':<10} {'split':<24} {'published':>9} "
                 f"{'GPU-h/seed':>10}  options")
    for r in rows:
        pub = "unknown" if r["published"] is None else f"{r['published']:g}"
        opts = " ".join(f"{k}={_fmt_value(v)}" for k, v in r["options"].items()) or "-"
        lines.append(f"{r['id']:<4} {r['row'][:34]:<34} {r['column']:<12} {r['host']:<10} {r['split']:<24} "
                     f"{pub:>9} {r['gpu_hours_per_seed']:>10.1f}  {opts}")
        if r["split_files"]:
            lines.append("     files: " + ", ".join(f"{p} ({s[:12]})" for p, s in r["split_files"]))
    total = 0.0 if t.runs_from else sum(r["gpu_hours"] for r in rows)
    n = len(rows) * (0 if t.runs_from else len(t.seeds))
    basis = (f"on {t.budget.gpu_class} (assumed {t.budget.ref_img_per_s:g} training img/s at {t.budget.ref_crop}² "
             "for R101-OS16: an estimate, not a measurement; docs/reproduce.md)" if total else
             f"({t.budget.gpu_class})" if not t.runs_from else f"(the trainings are {t.runs_from}'s)")
    lines.append(f"total: {len(rows)} cells x {len(t.seeds)} seeds = {n} trials, estimated {total:.1f} GPU-hours "
                 + basis)
    return "\n".join(lines)


def trial_specs(loaded: LoadedTable) -> list[TrialSpec]:
    from orchestration.keys import NUMBER_KEY, trial_key
    from orchestration.trial import TrialSettings

    t = loaded.spec
    specs = []
    for rc in loaded.cells:
        for seed in t.seeds:
            m = TrialSettings(name=f"{t.table}-{rc.id}", base=t.base, seeds=(int(seed),), work_dir=t.work_dir,
                              storage=t.storage, resources_per_trial=t.resources, retries=t.retries, metric=t.metric)
            key = trial_key(m.name, {NUMBER_KEY: seed})
            specs.append(TrialSpec(key, t.table, rc.id, rc.cell.row, rc.cell.column, int(seed), dict(rc.overrides),
                                   m, run_tags(t.table, rc, int(seed))))
    return specs


def run_tags(table: str, rc: ResolvedCell, seed: int) -> dict[str, str]:
    """The tags that make a child run part of a reproduced table (orchestration/report.py reads them)."""
    pub = rc.cell.published
    return {"table": table, "cell": rc.id, "row": rc.cell.row, "column": rc.cell.column, "seed": str(seed),
            "published": "unknown" if pub is None else f"{pub:g}", "s4mc.kind": "paper"}


def cell_trial(config: dict, specs: dict[str, TrialSpec], tracking=None,
               skip: frozenset[str] = frozenset()) -> None:
    """The Ray trainable: one cell x seed through the sweep's trial function."""
    from orchestration.keys import NUMBER_KEY
    from orchestration.trial import trial_main

    spec = specs[config["trial"]]
    if spec.key in skip:  # FINISHED in MLflow already (resume)
        return
    if tracking:
        from orchestration.tracking import open_child_run

        open_child_run(tracking, spec.key, spec.tags)
    trial_main({NUMBER_KEY: spec.seed, **spec.overrides}, settings=spec.settings, tracking=tracking)


def finished_keys(tracking_uri: str, experiment_id: str, table: str) -> set[str]:
    from orchestration.tracking import table_runs

    return {r.data.tags.get("trial_key") for r in table_runs(tracking_uri, table, [experiment_id])
            if r.info.status == "FINISHED"}


def _cell_key(config: dict) -> str:
    return str(config["trial"])


def reproduce(table, dry_run: bool = False, resume: bool = False, max_concurrent: int | None = None,
              overrides: list[str] | tuple[str, ...] = (), data_root: str | None = None,
              pretrained: str | None = None, storage: str | None = None, echo=print) -> dict[str, Any]:
    """Runs (or resumes, or only lists) a paper table; returns a summary dict of the trials."""
    loaded = table if isinstance(table, LoadedTable) else load_table(
        table, overrides, data_root=data_root, pretrained=pretrained, storage=storage)
    t = secure_manifest(loaded.spec)  # a password in tracking.uri moves to the environment (secrets.py)
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ReproduceError(f"max_concurrent={max_concurrent} must be >= 1")
        t.max_concurrent = max_concurrent
    if dry_run:
        echo(format_dry_run(loaded))
        return {"table": t.table, "dry_run": True, "cells": len(loaded.cells),
                "trials": 0 if t.runs_from else len(loaded.cells) * len(t.seeds)}
    if t.runs_from:
        raise ReproduceError(f"{t.table} has no trainings of its own: run `reproduce --table {t.runs_from}`, "
                             f"then `report --table {t.table}`")
    if loaded.unset:
        raise ReproduceError(f"{t.table}: {loaded.unset[0]} (a real run needs it; --dry-run shows the cells)")
    return _launch(loaded, resume, echo)


def _launch(loaded: LoadedTable, resume: bool, echo) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from ray import tune

    from orchestration import execution
    from orchestration import tracking as trk
    from orchestration.env import apply_env

    t = loaded.spec
    apply_env(local_ray=not t.ray.address)
    execution.check_object_store({"storage": t.storage, **{
        f"{rc.id} {k}": str(OmegaConf.select(rc.config, k) or "") for rc in loaded.cells
        for k in ("data.root", "model.pretrained")}})
    _, _, exp_path = execution.experiment_location(t.storage)
    can_restore = execution.can_restore(t.storage)
    execution.preflight(t.ray, t.resources, t.storage, t.tracking.uri or "", resources_setting="resources")
    uri = trk.configure(t.tracking.uri, project_dir=t.project)
    exp_id = trk.ensure_experiment(t.tracking.experiment, tracking_uri=uri)
    done = finished_keys(uri, exp_id, t.table)
    if not resume and (can_restore or done):
        what = f"Ray state in {exp_path}" if can_restore else f"{len(done)} FINISHED runs in MLflow"
        raise ReproduceError(f"{t.table} was started before ({what}); continue it with --resume (make reproduce "
                             f"TABLE={t.table} RESUME=1), or delete that state to start over")
    if not can_restore:
        trk.archive_parent(uri, exp_id, t.table)  # a fresh start never adopts an old parent run
    parent = trk.start_sweep_run(exp_id, t.table, tags={"table": t.table, "title": t.title, "s4mc.kind": "paper",
                                                        "metric": t.metric}, tracking_uri=uri)
    tracking = trk.TrackingTarget(uri, exp_id, parent, kind="paper")
    specs = {s.key: s for s in trial_specs(loaded)}
    todo = [k for k in specs if k not in done]
    echo(f"[reproduce {t.table}] {len(specs)} trials, {len(specs) - len(todo)} already FINISHED in MLflow"
         f"{', resuming Ray state' if can_restore else ''}; MLflow parent run {parent} ({uri})")
    if not todo:
        trk.finish_run(parent, "FINISHED", tracking_uri=uri)
        return {"table": t.table, "trials": [], "interrupted": False, "errors": [], "parent_run_id": parent}
    plan = execution.TrialPlan(
        label=f"reproduce {t.table}",
        trainable=tune.with_parameters(cell_trial, specs=specs, tracking=tracking, skip=frozenset(done)),
        storage=t.storage, resources=t.resources, max_concurrent=t.max_concurrent, retries=t.retries,
        metric=t.metric, mode="max", total=len(todo), key=_cell_key, param_space={"trial": tune.grid_search(todo)})
    try:
        grid = execution.run_plan(plan, restore=can_restore)
    except BaseException:
        trk.finish_run(parent, "KILLED", tracking_uri=uri)  # no RUNNING parent left behind a crash or kill
        raise
    # A Ctrl-C'd Tune run returns normally with its trials marked terminated: a trial is complete only when
    # its last report reached the end of its schedule (trial/progress, orchestration/trial.py) or it was skipped.
    unfinished = [r for r in grid if r.error is None and (r.config or {}).get("trial") not in done
                  and float((r.metrics or {}).get("trial/progress", 0.0)) < 1.0]
    interrupted = bool(unfinished) or len(grid) < len(todo)
    rows = []
    for r in grid:
        key = (r.config or {}).get("trial")
        spec = specs.get(key)
        rows.append({"trial": key, "row": spec.row if spec else None, "column": spec.column if spec else None,
                     "seed": spec.seed if spec else None, "error": execution.error_line(r.error),
                     t.metric: (r.metrics or {}).get(t.metric)})
    errors = [f"{row['trial']}: {row['error']}" for row in rows if row["error"]]
    trk.finish_run(parent, "KILLED" if interrupted else ("FAILED" if errors else "FINISHED"), tracking_uri=uri)
    for row in sorted(rows, key=lambda r: str(r["trial"])):
        value, error = row[t.metric], f"  ERROR {row['error']}" if row["error"] else ""
        echo(f"  {row['trial']:<22} {str(row['row'])[:34]:<34} {str(row['column']):<12} seed {row['seed']}  "
             f"{t.metric} {'-' if value is None else f'{value:.2f}'}{error}")
    status = "INTERRUPTED: continue with --resume" if interrupted else f"{len(errors)} failed" if errors else "done"
    echo(f"[reproduce {t.table}] {status}; the table: s4mc-sweep report --table {t.table}")
    return {"table": t.table, "trials": rows, "interrupted": interrupted, "errors": errors, "parent_run_id": parent}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="table id (experiments/paper/<id>.yaml) or a manifest path")
    p.add_argument("--dry-run", action="store_true", help="list cells, splits, options and GPU-hour estimates; "
                                                          "start nothing")
    p.add_argument("--resume", action="store_true", help="continue: skip FINISHED trials, resume unfinished ones")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the manifest's, else the cluster)")
    p.add_argument("--data-root", help="data.root (local path or s3://); default: the manifest's data_root_env")
    p.add_argument("--pretrained", help="ImageNet weights (path or s3://); default: the manifest's pretrained_env")
    p.add_argument("--storage", help="Ray storage (path or s3://bucket/prefix); default <project>/reproduce/<table>")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="paper-manifest overrides, e.g. overrides.train.steps=500 seeds=[0]")


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `reproduce` on an argparse subparsers object; the handler is `args.handler(args)`."""
    p = subparsers.add_parser("reproduce", help="run a paper table's cells x seeds (docs/reproduce.md)",
                              description="Expand a paper table into cell x seed trials and run them on Ray, "
                                          "tracked in MLflow; --dry-run lists them with GPU-hour estimates.")
    _add_arguments(p)
    p.set_defaults(handler=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    try:
        result = reproduce(args.table, dry_run=args.dry_run, resume=args.resume, max_concurrent=args.max_concurrent,
                           overrides=args.overrides, data_root=args.data_root, pretrained=args.pretrained,
                           storage=args.storage)
    except ConfigError as exc:
        print(f"s4mc-sweep reproduce: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `--dry-run | head`: the reader left early, which is not a failure
        sys.stdout = open(os.devnull, "w")  # the interpreter flushes stdout at exit: give it a sink
        return 0
    return EXIT_INTERRUPTED if result.get("interrupted") else (1 if result.get("errors") else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.reproduce", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
