"""`run_sweep`: one sweep manifest -> Ray Tune trials searched by Optuna, tracked in MLflow, summarised.

The driver starts (or joins, `ray.address` / RAY_ADDRESS) Ray, opens the sweep's MLflow parent run and
Optuna study, and runs a `Tuner` with the Optuna searcher (orchestration/search.py), ASHA or FIFO, a
per-trial `FailureConfig` and trial names from the stable trial key (`<sweep>-t<optuna number>`).
`resume=True` restores the same Ray experiment (`Tuner.restore`) with the same study and parent run:
finished trials stay finished, unfinished ones continue from their last checkpoint, and the
remaining trials are asked for, so no trial is lost or run twice. While it runs, `ProgressLine`
replaces Ray's tables with one line per finished trial (and one every 30 s). At the end it prints the best
configuration, the top trials and the timing, and writes results.csv, results.md and summary.json in
the sweep folder (timing is defined in orchestration/results.py and docs/sweeps.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from ray.tune import Callback

from orchestration.env import LOCAL_ENV, QUIET_ENV, apply_env  # noqa: F401 (re-exported)
from orchestration.manifest import Manifest, base_training_config, dp_workers, sweep_dir_of, to_yaml
from orchestration.results import collect_rows, mark_mlflow_runs, summarise, write_outputs
from orchestration.search import build_searcher, open_study, study_exists
from orchestration.trial import trial_key, trial_main
from s4mc.config import ConfigError

EXPERIMENT_DIR = "tune"  # Ray's experiment folder inside the sweep storage
STATE_FILE = "sweep_state.json"  # parent run id and the driver sessions' wall-clock intervals
DRIVER_CPU = 0.1  # a data-parallel trial's own share: it waits on its TorchTrainer
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


def storage_filesystem(storage: str):
    """(pyarrow filesystem or None, path) for Ray's RunConfig; S3 needs the endpoint passed explicitly
    because pyarrow ignores AWS_ENDPOINT_URL_S3 (platform-notes.md)."""
    if not storage.startswith("s3://"):
        return None, storage
    from urllib.parse import urlparse

    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        url = urlparse(endpoint)
        kwargs = {"endpoint_override": url.netloc, "scheme": url.scheme or "https"}
    if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    return pyarrow.fs.S3FileSystem(**kwargs), storage[len("s3://"):].rstrip("/")


def _init_ray(m: Manifest) -> None:
    import ray

    apply_env(local_ray=not m.ray.address)  # the CLI did this before importing Ray; again for library use
    if ray.is_initialized():
        return
    if m.ray.address:
        ray.init(address=m.ray.address, log_to_driver=False)
        return
    ray.init(num_cpus=m.ray.num_cpus or os.cpu_count(), object_store_memory=m.ray.object_store_mb * 2**20,
             _temp_dir=m.ray.temp_dir, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")


def _load_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"sessions": []}


def _save_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    tmp = sweep_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(sweep_dir / STATE_FILE)


def _tracking(m: Manifest, state: dict[str, Any], fresh: bool) -> dict[str, str]:
    from orchestration import tracking

    uri = tracking.configure(m.tracking.uri, project_dir=m.project)
    exp_id = tracking.ensure_experiment(m.tracking.experiment, tracking_uri=uri)
    if fresh:
        tracking_archive_parent(uri, exp_id, m.name)
    tags = {"num_trials": m.num_trials, "scheduler": m.scheduler.name, "sampler": m.sampler.name,
            "metric": m.metric, "storage": m.storage}
    parent = tracking.start_sweep_run(exp_id, m.name, tags=tags, tracking_uri=uri)
    if fresh:
        from mlflow import MlflowClient

        with open(Path(sweep_dir_of(m)) / "manifest.yaml", "w") as f:
            f.write(to_yaml(m))
        MlflowClient(uri).log_artifact(parent, str(Path(sweep_dir_of(m)) / "manifest.yaml"))
    state["parent_run_id"] = parent
    return {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent}


def tracking_archive_parent(uri: str, exp_id: str, name: str) -> None:
    """A fresh sweep must not adopt the parent run of an earlier sweep of the same name (deleted folder):
    the older parent keeps its runs but its sweep_name tag gets the run id appended."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run in client.search_runs([exp_id], filter_string=f"tags.sweep_name = '{name}' and "
                                  "tags.`s4mc.role` = 'sweep'"):
        client.set_tag(run.info.run_id, "sweep_name", f"{name}~{run.info.run_id[:8]}")


def run_sweep(m: Manifest, resume: bool = False, manifest_path: str | None = None, trainable=None,
              echo=print) -> SweepResult:
    """Runs (or resumes) the sweep described by `m`; `trainable` replaces trial_main (same signature)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t_start = time.time()
    sweep_dir = Path(sweep_dir_of(m))
    fs, path = storage_filesystem(m.storage)
    exp_path = f"{m.storage.rstrip('/')}/{EXPERIMENT_DIR}"  # shown to the user
    fs_exp_path = f"{path.rstrip('/')}/{EXPERIMENT_DIR}"  # what Ray wants beside a pyarrow filesystem
    can_restore = tune.Tuner.can_restore(fs_exp_path, storage_filesystem=fs)
    if can_restore and not resume:
        raise SweepError(f"sweep {m.name!r} already exists in {exp_path}; resume it with --resume "
                         f"(make sweep RESUME=1) or delete {sweep_dir} (and {m.storage}) to start over")
    if not can_restore and study_exists(m) and open_study(m).trials:
        if not resume:
            raise SweepError(f"Optuna study {m.name!r} in {m.optuna_storage} already holds trials; resume "
                             "with --resume or use a new sweep name")
        raise SweepError(f"cannot resume sweep {m.name!r}: the study exists but Ray's experiment state "
                         f"{exp_path} does not; use a new sweep name")
    base = base_training_config(m)
    if m.scheduler.name == "asha" and m.scheduler.max_t is None and base.train.epochs is not None:
        # With epochs the step count depends on the data; a wrong max_t would cut every trial short.
        raise SweepError("scheduler.max_t is required when train.epochs sets the schedule: give the "
                         "number of evaluations of one run")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    Path(m.work_dir).mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = _load_state(sweep_dir)
    tracking = _tracking(m, state, fresh=not can_restore)
    state["sessions"].append([t_start, None])
    _save_state(sweep_dir, state)
    _init_ray(m)

    base_config = OmegaConf.to_container(base, resolve=True)  # workers need not hold the YAML files
    fn = tune.with_parameters(trainable or trial_main, manifest=m, tracking=tracking, base_config=base_config)
    r = m.resources_per_trial
    # Data-parallel: the trial only drives a TorchTrainer whose workers hold the resources
    # (orchestration/trial.py); Ray rejects an all-zero bundle, hence a token CPU share.
    fn = tune.with_resources(fn, {"cpu": r.cpu, "gpu": r.gpu} if dp_workers(r) == 1 else {"cpu": DRIVER_CPU})
    progress = ProgressLine(m.name, m.num_trials, m.metric, m.mode)
    if can_restore:
        echo(f"[sweep {m.name}] resuming {exp_path}")
        tuner = tune.Tuner.restore(fs_exp_path, trainable=fn, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        max_t = m.scheduler.max_t or evaluations_per_run(base)
        scheduler = (ASHAScheduler(time_attr="training_iteration", metric=m.metric, mode=m.mode, max_t=max_t,
                                   grace_period=m.scheduler.grace_period,
                                   reduction_factor=m.scheduler.reduction_factor)
                     if m.scheduler.name == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=build_searcher(m, base), scheduler=scheduler,
                                        num_samples=m.num_trials, max_concurrent_trials=m.max_concurrent,
                                        trial_name_creator=TrialName(m.name),
                                        trial_dirname_creator=TrialName(m.name), reuse_actors=True),
            run_config=tune.RunConfig(
                name=EXPERIMENT_DIR, storage_path=path, storage_filesystem=fs, verbose=0,
                failure_config=tune.FailureConfig(max_failures=m.retries),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[progress]))
    grid = tuner.fit()
    # Tune returns normally after Ctrl-C with the state saved; unfinished trials tell us it happened.
    interrupted = len(grid) - grid.num_terminated - grid.num_errors > 0 or len(grid) < m.num_trials
    state["sessions"][-1][1] = time.time()
    _save_state(sweep_dir, state)
    rows = collect_rows(grid, open_study(m, create=False), m)
    errors = [f"{row['trial']}: {row['error']}" for row in rows if row.get("error")]
    timing = summarise(rows, state["sessions"], m.max_concurrent)
    best = rows[0] if rows and rows[0].get("state") == "COMPLETE" else None
    result = SweepResult(sweep_dir, rows, best, timing, interrupted, errors, tracking["parent_run_id"])
    files = write_outputs(result, m, manifest_path, echo)
    mark_mlflow_runs(tracking, rows, finished=not interrupted, files=files, timing=timing)
    return result


class TrialName:
    """Ray trial name / folder = the stable trial key (a class so that Ray can pickle it)."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def __call__(self, trial) -> str:
        return trial_key(self.sweep, trial.config)


def evaluations_per_run(cfg) -> int:
    """Evaluations of one training run: every eval_every steps and at the last (s4mc/train/loop.py)."""
    steps = int(cfg.train.steps)
    return max(1, -(-steps // int(cfg.train.eval_every)))


class ProgressLine(Callback):
    """A compact progress line instead of Ray's tables: trials done / running, best so far."""

    def __init__(self, name: str, total: int, metric: str, mode: str, every_s: float = 30.0):
        self.name, self.total, self.metric, self.mode, self.every_s = name, total, metric, mode, every_s
        self.setup()

    def setup(self, *args, **kwargs) -> None:
        self.t0, self.last = time.time(), 0.0

    def _line(self, trials, event: str = "") -> None:
        done = sum(t.status == "TERMINATED" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        best = None
        for t in trials:
            value = (t.last_result or {}).get(self.metric)
            if value is not None and (best is None or (value > best[0]) == (self.mode == "max")):
                best = (value, t.trial_id, (t.last_result or {}).get("trial/key", ""))
        elapsed = time.strftime("%M:%S", time.gmtime(time.time() - self.t0))
        best_text = f"best {self.metric} {best[0]:.2f} ({best[2]})" if best else "no result yet"
        print(f"[sweep {self.name} {elapsed}] {done}/{self.total} done, {running} running"
              f"{f', {failed} failed' if failed else ''} | {best_text}{event}", flush=True)
        self.last = time.time()

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self.last >= self.every_s:
            self._line(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trials, f" | {(trial.last_result or {}).get('trial/key', trial)} finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, f" | {trial} failed (attempt {trial.run_metadata.num_failures})")
