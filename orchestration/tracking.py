"""MLflow tracking for sweeps and trials: experiments, the sweep's parent run, one child run per trial.

`configure` picks the store (by default a local SQLite file with absolute artifact paths under
<project>/mlruns), `ensure_experiment` and `start_sweep_run` run on the driver, and `TrialTracker` is an
s4mc trainer callback (docs/architecture.md) that a Ray trial passes to `run_training`. Everything goes
through `MlflowClient` with explicit run ids, never the fluent active-run stack, so that trials in Ray
workers and threads cannot step on each other. Runs are idempotent by tag: a resumed sweep reuses its
parent run (tag sweep_name), a retried or resumed trial its child run (tag trial_key), and metric rows
that a resumed trainer replays are not logged twice. SQLite "database is locked" is retried.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from orchestration.outbox import call_with_retry
from s4mc.config import flatten

log = logging.getLogger(__name__)

# Limits of mlflow.utils.validation in MLflow 3.17.2.
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000
TRUNCATED = "...[truncated]"
# docs/platform.md: concurrent writers to one SQLite file get "database is locked". 8 tries from 0.1 s,
# doubling with x0.5-1.5 jitter, wait up to ~25 s in all: longer than any commit a trial makes.
LOCK_ATTEMPTS, LOCK_BACKOFF_S = 8, 0.1
SAMPLES_LOGGED = 4  # "a few" sample predictions: the newest ones
STATUSES = ("FINISHED", "FAILED", "KILLED")
# Keys that must never reach MLflow: credentials live in the AWS chain only (orchestration/storage.py).
SECRET_KEY = re.compile(r"secret|passw|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ inside URIs
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow's allowed key characters (validation.py)
TAG_ROLE, TAG_SWEEP, TAG_TRIAL_KEY, TAG_PARENT = "s4mc.role", "sweep_name", "trial_key", "mlflow.parentRunId"
PARAM_PREFIX = "param."  # a trial's sampled parameters: MLflow tags and results.csv columns "param.<key>"
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # docs/platform.md


def retry_locked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls fn, retrying with backoff while the store is locked (SQLite) or unreachable (a server
    outage), for up to the outage budget (orchestration/outbox.py); any other error raises at once."""
    return call_with_retry(fn, *args, **kwargs)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def configure(tracking_uri: str | None = None, project_dir: str | Path | None = None) -> str:
    """Sets the tracking URI (process-wide and in MLFLOW_TRACKING_URI for child processes); returns it.

    Default: sqlite:///<project_dir>/mlruns/mlflow.db with artifacts in <project_dir>/mlruns/artifacts,
    project_dir defaulting to the working directory. Relative SQLite paths become absolute.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not tracking_uri:
        tracking_uri = f"sqlite:///{Path(project_dir or Path.cwd()).resolve() / 'mlruns' / 'mlflow.db'}"
    if (db := _sqlite_path(tracking_uri)) is not None:
        db = db.expanduser().resolve()
        (db.parent / "artifacts").mkdir(parents=True, exist_ok=True)
        tracking_uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return tracking_uri


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Absolute artifact location for a local SQLite store (docs/platform.md: otherwise a trial creates
    ./mlruns inside Ray's session directory); None lets a server or file store choose."""
    if (db := _sqlite_path(tracking_uri)) is None:
        return None
    slug = re.sub(r"[^\w.-]+", "_", experiment).strip("_") or "experiment"
    return (db.resolve().parent / "artifacts" / slug).as_uri()


def ensure_experiment(name: str, artifact_location: str | None = None, tracking_uri: str | None = None) -> str:
    """The id of experiment `name`, created (or restored from deleted) if needed. Call on the driver."""
    client = MlflowClient(tracking_uri)
    exp = retry_locked(client.get_experiment_by_name, name)
    if exp is None:
        location = artifact_location or default_artifact_location(client.tracking_uri, name)
        try:
            # The kind tag opens the UI on training runs and their charts, not MLflow 3's GenAI view.
            return retry_locked(client.create_experiment, name, artifact_location=location,
                                tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException as exc:  # another driver created it meanwhile
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            exp = retry_locked(client.get_experiment_by_name, name)
    if exp.lifecycle_stage == "deleted":
        retry_locked(client.restore_experiment, exp.experiment_id)
    return exp.experiment_id


# The UI's query parameter for its training-runs view (MLflow 3.17 opens a bare URL on the GenAI side).
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_id(name: str, tracking_uri: str | None = None) -> str | None:
    """The id of experiment `name`, or None when it does not exist (nothing is created)."""
    exp = retry_locked(MlflowClient(tracking_uri).get_experiment_by_name, name)
    return exp.experiment_id if exp is not None else None


def quoted(value: str, what: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"{what}={value!r} holds a quote or backslash, which MLflow search filters cannot")
    return f"'{value}'"


def find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]):
    """The oldest run of the experiment carrying all these tag values, or None."""
    filt = " and ".join(f"tags.`{k}` = {quoted(v, k)}" for k, v in tags.items())
    found = retry_locked(client.search_runs, [experiment_id], filter_string=filt, max_results=1,
                         order_by=["attributes.start_time ASC"])
    return found[0] if found else None


def start_sweep_run(experiment: str, sweep_name: str, tags: Mapping[str, Any] | None = None,
                    tracking_uri: str | None = None) -> str:
    """The sweep's parent run id: reopens the run tagged with this sweep name, else creates it.

    experiment: an experiment name (created if missing) or an existing experiment id.
    """
    client = MlflowClient(tracking_uri)
    exp = retry_locked(client.get_experiment_by_name, experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = retry_locked(client.get_experiment, experiment)
        except MlflowException:
            exp = None
    exp_id = exp.experiment_id if exp else ensure_experiment(experiment, tracking_uri=client.tracking_uri)
    found = find_run(client, exp_id, {TAG_SWEEP: sweep_name, TAG_ROLE: "sweep"})
    all_tags = {**clean_tags(tags or {}), TAG_SWEEP: sweep_name, TAG_ROLE: "sweep"}
    if found is None:
        return retry_locked(client.create_run, exp_id, tags=all_tags, run_name=sweep_name).info.run_id
    run_id = found.info.run_id
    retry_locked(client.update_run, run_id, status="RUNNING")
    log_tags(client, run_id, all_tags)
    log.info("reusing sweep run %s for sweep %r", run_id, sweep_name)
    return run_id


def finish_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Ends any run (e.g. the sweep's parent) as FINISHED, FAILED or KILLED."""
    check_status(status)
    retry_locked(MlflowClient(tracking_uri).set_terminated, run_id, status=status)


def check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status={status!r} is not allowed; expected one of: {', '.join(STATUSES)}")


def _value(value: Any, limit: int) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    text = _USERINFO.sub("***@", text)
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


def metric_key(key: str) -> str:
    return re.sub(r"/{2,}", "/", _BAD_KEY_CHARS.sub("_", str(key))).strip("/")[:MAX_KEY]


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {metric_key(k): _value(v, MAX_TAG_VALUE) for k, v in tags.items()
            if v is not None and not SECRET_KEY.search(str(k))}


def log_in_batches(client: MlflowClient, run_id: str, field: str, items: list, size: int) -> None:
    for i in range(0, len(items), size):  # MLflow caps the entities per log_batch request
        retry_locked(client.log_batch, run_id, **{field: items[i:i + size]})


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    log_in_batches(client, run_id, "tags", [RunTag(k, v) for k, v in tags.items()], MAX_PARAMS_TAGS_PER_BATCH)


def as_number(value: Any) -> float | None:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def config_params(cfg: Any) -> dict[str, str]:
    """MLflow params of a config: flattened dotted keys, secret-looking keys skipped, values cut to fit."""
    return {metric_key(k): _value(v, MAX_PARAM_VALUE) for k, v in flatten(cfg).items() if not SECRET_KEY.search(k)}


# -- the driver's side: a sweep's or a table's parent run and its children ----------------------------
@dataclass(frozen=True)
class TrackingTarget:
    """Where a job's trials log: the store, the experiment and the parent run (picklable for Ray)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    kind: str = "sweep"  # "sweep" (an Optuna trial number per trial) or "paper" (a seed per trial)


def archive_parent(uri: str, exp_id: str, name: str) -> None:
    """A fresh job must not adopt the parent run of an earlier one of the same name (deleted folder):
    the older parent keeps its runs but its sweep_name tag gets the run id appended."""
    client = MlflowClient(uri)
    for run in retry_locked(client.search_runs, [exp_id], filter_string=f"tags.{TAG_SWEEP} = {quoted(name, 'name')} "
                            f"and tags.`{TAG_ROLE}` = 'sweep'"):
        retry_locked(client.set_tag, run.info.run_id, TAG_SWEEP, f"{name}~{run.info.run_id[:8]}")


def log_files(uri: str, run_id: str, paths) -> None:
    client = MlflowClient(uri)
    for path in paths:
        retry_locked(client.log_artifact, run_id, str(path))


def open_child_run(target: TrackingTarget, key: str, tags: Mapping[str, str]) -> str:
    """The child run of trial `key` under the parent, created with `tags` (or tagged, if it exists): the
    trial's TrialTracker then finds it by (role, trial_key, parent), so every run of a paper table
    carries its table tags, even one that fails before its first report."""
    client = MlflowClient(target.uri)
    identity = {TAG_ROLE: "trial", TAG_TRIAL_KEY: key, TAG_PARENT: target.parent_run_id}
    run = find_run(client, target.experiment_id, identity)
    if run is None:
        return retry_locked(client.create_run, target.experiment_id, tags={**identity, **tags},
                            run_name=key).info.run_id
    log_tags(client, run.info.run_id, dict(tags))
    return run.info.run_id


def close_children(target: TrackingTarget, rows: list[dict[str, Any]], finished: bool, files=(),
                   timing: Mapping[str, float] | None = None) -> None:
    """Driver-side bookkeeping a trial cannot do itself (ASHA may end it inside `tune.report`): tag each
    child run with its Optuna state and early stop, close runs left RUNNING, and close the parent with
    the job's files and timing."""
    client = MlflowClient(target.uri)
    parent = target.parent_run_id
    children = retry_locked(client.search_runs, [target.experiment_id],
                            filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)
    by_key = {row["trial"]: row for row in rows}
    for run in children:
        row = by_key.get(run.data.tags.get(TAG_TRIAL_KEY))
        rid = run.info.run_id
        if row is None:  # asked for after Ray's last checkpoint before a driver kill (search.py)
            if finished and run.info.status == "RUNNING":
                log_tags(client, rid, {"orphaned": "true"})
                retry_locked(client.set_terminated, rid, status="KILLED")
            continue
        log_tags(client, rid, {"optuna_state": row["state"], "stopped_early": str(row["stopped_early"]).lower(),
                               "evaluations": str(row["evaluations"])})
        if run.info.status == "RUNNING" and row["state"] in ("COMPLETE", "PRUNED", "FAIL"):
            retry_locked(client.set_terminated, rid, status="FAILED" if row["state"] == "FAIL" else "FINISHED")
    log_files(target.uri, parent, files)
    metrics = [Metric(f"sweep/{k}", float(v), int(time.time() * 1000), 0) for k, v in (timing or {}).items()
               if (n := as_number(v)) is not None and math.isfinite(n)]
    log_in_batches(client, parent, "metrics", metrics, MAX_METRICS_PER_BATCH)
    retry_locked(client.set_terminated, parent, status="FINISHED" if finished else "KILLED")


def table_runs(tracking_uri: str, table: str, experiment_ids: list[str] | None = None) -> list:
    """Every trial run tagged with this paper table, in the given experiments (default: the whole store)."""
    client = MlflowClient(tracking_uri)
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in retry_locked(client.search_experiments)]
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = retry_locked(client.search_runs, experiment_ids, max_results=1000, page_token=token,
                            filter_string=f"tags.table = {quoted(table, 'table')} and tags.`{TAG_ROLE}` = 'trial'")
        runs += list(page)
        token = page.token
        if not token:
            return runs
