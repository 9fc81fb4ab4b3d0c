"""`run_sweep`: one sweep manifest -> Ray Tune trials searched by Optuna, tracked in MLflow, summarised.

The driver starts (or joins, `ray.address` / RAY_ADDRESS) Ray, opens the sweep's MLflow parent run and
Optuna study, and runs a `Tuner` with the Optuna searcher (orchestration/search.py), ASHA or FIFO, a
per-trial `FailureConfig` and trial names from the stable trial key (`<sweep>-t<optuna number>`).
`resume=True` restores the same Ray experiment (`Tuner.restore`) with the same study and parent run:
finished trials stay finished, unfinished ones continue from their last checkpoint, and the
remaining trials are asked for, so no trial is lost or run twice; a resume whose manifest changed a key
that defines the experiment (`RESUME_KEYS`) is refused. The Tuner, the resource rule, the checks made
before Ray starts and the progress line belong to the execution layer (orchestration/execution.py).
At the end it prints the best configuration, the top trials and the timing, and writes results.csv,
results.md and summary.json in the sweep folder (timing is defined in orchestration/results.py and docs/sweeps.md).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from orchestration import execution, tracking
from orchestration.env import LOCAL_ENV, QUIET_ENV, apply_env  # noqa: F401 (re-exported)
from orchestration.manifest import Manifest, base_training_config, sweep_dir_of, to_yaml
from orchestration.results import collect_rows, summarise, write_outputs
from orchestration.search import build_searcher, open_study, study_exists
from orchestration.study_plots import write_study_plots
from orchestration.trial import TrialSettings, trial_key, trial_main
from s4mc.config import ConfigError

EXPERIMENT_DIR = execution.EXPERIMENT_DIR
STATE_FILE = "sweep_state.json"  # parent run id and the driver sessions' wall-clock intervals
class SweepError(ConfigError):
    """The sweep cannot start as asked (e.g. it exists and --resume was not given)."""


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]]  # one per trial, best first
    best: dict[str, Any] | None
    timing: dict[str, float]
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    parent_run_id: str | None = None


def _load_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"sessions": []}


def _save_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    tmp = sweep_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(sweep_dir / STATE_FILE)


def _tracking(m: Manifest, state: dict[str, Any], fresh: bool) -> tracking.TrackingTarget:
    uri = tracking.configure(m.tracking.uri, project_dir=m.project)
    exp_id = tracking.ensure_experiment(m.tracking.experiment, tracking_uri=uri)
    if fresh:
        tracking.archive_parent(uri, exp_id, m.name)
    tags = {"num_trials": m.num_trials, "scheduler": m.scheduler.name, "sampler": m.sampler.name,
            "metric": m.metric, "storage": m.storage}
    parent = tracking.start_sweep_run(exp_id, m.name, tags=tags, tracking_uri=uri)
    if fresh:
        path = Path(sweep_dir_of(m)) / "manifest.yaml"
        path.write_text(to_yaml(m))
        tracking.log_files(uri, parent, [path])
    state["parent_run_id"] = parent
    return tracking.TrackingTarget(uri, exp_id, parent, kind="sweep")


def _check_new_or_resumable(m: Manifest, resume: bool, restorable: bool, exp_path: str) -> None:
    sweep_dir = Path(sweep_dir_of(m))
    if restorable and not resume:
        raise SweepError(f"sweep {m.name!r} already exists in {exp_path}; resume it with --resume "
                         f"(make sweep RESUME=1) or delete {sweep_dir} (and {m.storage}) to start over")
    if not restorable and study_exists(m) and open_study(m).trials:
        if not resume:
            raise SweepError(f"Optuna study {m.name!r} in {m.optuna_storage} already holds trials; resume "
                             "with --resume or use a new sweep name")
        raise SweepError(f"cannot resume sweep {m.name!r}: the study exists but Ray's experiment state "
                         f"{exp_path} does not; use a new sweep name")


def run_sweep(m: Manifest, resume: bool = False, manifest_path: str | None = None, trainable=None,
              echo=print) -> SweepResult:
    """Runs (or resumes) the sweep described by `m`; `trainable` replaces trial_main (same signature)."""
    import optuna
    from ray import tune

    from orchestration.secrets import secure_manifest

    secure_manifest(m)  # passwords in tracking.uri / optuna_storage move to the environment (secrets.py)

    t_start = time.time()
    sweep_dir = Path(sweep_dir_of(m))
    _make_dirs(sweep_dir, m.work_dir)  # the Optuna study and the state file live there: writable first
    base = base_training_config(m)
    execution.check_object_store({"storage": m.storage, **{k: str(OmegaConf.select(base, k) or "")
                                                            for k in ("data.root", "model.pretrained")}})
    _, _, exp_path = execution.experiment_location(m.storage)
    restorable = execution.can_restore(m.storage)
    _check_new_or_resumable(m, resume, restorable, exp_path)
    if m.scheduler.name == "asha" and m.scheduler.max_t is None and base.train.epochs is not None:
        # With epochs the step count depends on the data; a wrong max_t would cut every trial short.
        raise SweepError("scheduler.max_t is required when train.epochs sets the schedule: give the "
                         "number of evaluations of one run")
    state = _load_state(sweep_dir)
    if restorable:
        check_resume_compatible(state, m)
    execution.preflight(m.ray, m.resources_per_trial, m.storage, m.tracking.uri or "")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = _tracking(m, state, fresh=not restorable)
    state["sessions"].append([t_start, None])
    state["manifest"] = resume_fingerprint(m)
    _save_state(sweep_dir, state)

    base_config = OmegaConf.to_container(base, resolve=True)  # workers need not hold the YAML files
    fn = tune.with_parameters(trainable or trial_main, settings=TrialSettings.of(m), tracking=target,
                              base_config=base_config)
    plan = execution.TrialPlan(
        label=f"sweep {m.name}", trainable=fn, storage=m.storage, resources=m.resources_per_trial,
        max_concurrent=m.max_concurrent, retries=m.retries, metric=m.metric, mode=m.mode, total=m.num_trials,
        key=functools.partial(trial_key, m.name), num_samples=m.num_trials, search_alg=build_searcher(m, base),
        scheduler=_scheduler(m, base))
    if restorable:
        echo(f"[sweep {m.name}] resuming {exp_path}")
    try:
        grid = execution.run_plan(plan, restore=restorable)
    except BaseException:
        _close_parent(target, "KILLED")  # a crashed or killed driver leaves no RUNNING parent run
        raise
    # Tune returns normally after Ctrl-C with the state saved; unfinished trials tell us it happened.
    interrupted = len(grid) - grid.num_terminated - grid.num_errors > 0 or len(grid) < m.num_trials
    state["sessions"][-1][1] = time.time()
    _save_state(sweep_dir, state)
    study = open_study(m, create=False)
    rows = collect_rows(grid, study, m)
    errors = [f"{row['trial']}: {row['error']}" for row in rows if row.get("error")]
    timing = summarise(rows, state["sessions"], m.max_concurrent)
    best = rows[0] if rows and rows[0].get("state") == "COMPLETE" else None
    result = SweepResult(sweep_dir, rows, best, timing, interrupted, errors, target.parent_run_id)
    files = write_outputs(result, m, manifest_path, echo)
    files += write_study_plots(study, sweep_dir)  # the four analysis views, logged to the parent run too
    tracking.close_children(target, rows, finished=not interrupted, files=files, timing=timing)
    return result


def _make_dirs(sweep_dir: Path, work_dir: str) -> None:
    for folder, key in ((sweep_dir, "storage"), (Path(work_dir), "work_dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise SweepError(f"{key}: cannot write to {folder} ({exc.strerror or exc}); choose a writable "
                             f"folder with {key}=...") from None


def _scheduler(m: Manifest, base):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if m.scheduler.name != "asha":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=m.metric, mode=m.mode,
                         max_t=m.scheduler.max_t or evaluations_per_run(base),
                         grace_period=m.scheduler.grace_period, reduction_factor=m.scheduler.reduction_factor)


def _close_parent(target: tracking.TrackingTarget, status: str) -> None:
    try:
        tracking.finish_run(target.parent_run_id, status, tracking_uri=target.uri)
    except Exception:  # noqa: BLE001 - the original exception is what the user must see
        pass


# Keys whose change makes a saved sweep a different experiment: its trials would not be comparable.
RESUME_KEYS = ("base", "overrides", "search", "scheduler", "metric", "mode", "sampler", "seeds",
               "evaluate_default_first", "resources_per_trial")


def resume_fingerprint(m: Manifest) -> dict[str, Any]:
    """The manifest keys a resume must keep, as plain values (num_trials may grow or shrink)."""
    plain = OmegaConf.to_container(OmegaConf.structured(m), resolve=True)
    return json.loads(json.dumps({k: plain[k] for k in RESUME_KEYS}, default=str))


def check_resume_compatible(state: dict[str, Any], m: Manifest) -> None:
    saved = state.get("manifest")
    if saved is None:  # a sweep saved before fingerprints existed
        return
    now = resume_fingerprint(m)
    changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        raise SweepError(f"cannot resume sweep {m.name!r}: manifest key {k!r} changed since it started "
                         f"(was {json.dumps(saved.get(k))}, now {json.dumps(now.get(k))}); restore it, or "
                         "start a new sweep under another name (only num_trials may change on resume)")


def evaluations_per_run(cfg) -> int:
    """Evaluations of one training run: every eval_every steps and at the last (s4mc/train/loop.py)."""
    steps = int(cfg.train.steps)
    return max(1, -(-steps // int(cfg.train.eval_every)))
