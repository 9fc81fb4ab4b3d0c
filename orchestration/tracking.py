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
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from orchestration import plots
from orchestration.storage import S3Storage, is_s3_uri
from s4mc.config import flatten, to_yaml

log = logging.getLogger(__name__)

# Limits of mlflow.utils.validation in MLflow 3.17.2.
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000
TRUNCATED = "...[truncated]"
# platform-notes.md: concurrent writers to one SQLite file get "database is locked". 8 tries from 0.1 s,
# doubling with x0.5-1.5 jitter, wait up to ~25 s in all: longer than any commit a trial makes.
LOCK_ATTEMPTS, LOCK_BACKOFF_S = 8, 0.1
SAMPLES_LOGGED = 4  # "a few" sample predictions: the newest ones
STATUSES = ("FINISHED", "FAILED", "KILLED")
# Keys that must never reach MLflow: credentials live in the AWS chain only (orchestration/storage.py).
SECRET_KEY = re.compile(r"secret|passw|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ inside URIs
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow's allowed key characters (validation.py)
TAG_ROLE, TAG_SWEEP, TAG_TRIAL_KEY, TAG_PARENT = "s4mc.role", "sweep_name", "trial_key", "mlflow.parentRunId"
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # platform-notes.md


def retry_locked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls fn, retrying with backoff while the (SQLite) store reports "database is locked"."""
    for attempt in range(LOCK_ATTEMPTS - 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "database is locked" not in str(exc):
                raise
            time.sleep(LOCK_BACKOFF_S * 2**attempt * (0.5 + random.random()))
    return fn(*args, **kwargs)


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
    """Absolute artifact location for a local SQLite store (platform-notes.md: otherwise a trial creates
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


def _quoted(value: str, what: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"{what}={value!r} holds a quote or backslash, which MLflow search filters cannot")
    return f"'{value}'"


def find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]):
    """The oldest run of the experiment carrying all these tag values, or None."""
    filt = " and ".join(f"tags.`{k}` = {_quoted(v, k)}" for k, v in tags.items())
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
    all_tags = {**_clean_tags(tags or {}), TAG_SWEEP: sweep_name, TAG_ROLE: "sweep"}
    if found is None:
        return retry_locked(client.create_run, exp_id, tags=all_tags, run_name=sweep_name).info.run_id
    run_id = found.info.run_id
    retry_locked(client.update_run, run_id, status="RUNNING")
    _log_tags(client, run_id, all_tags)
    log.info("reusing sweep run %s for sweep %r", run_id, sweep_name)
    return run_id


def finish_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Ends any run (e.g. the sweep's parent) as FINISHED, FAILED or KILLED."""
    _check_status(status)
    retry_locked(MlflowClient(tracking_uri).set_terminated, run_id, status=status)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status={status!r} is not allowed; expected one of: {', '.join(STATUSES)}")


def _value(value: Any, limit: int) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)
    text = _USERINFO.sub("***@", text)
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


def _key(key: str) -> str:
    return re.sub(r"/{2,}", "/", _BAD_KEY_CHARS.sub("_", str(key))).strip("/")[:MAX_KEY]


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_key(k): _value(v, MAX_TAG_VALUE) for k, v in tags.items()
            if v is not None and not SECRET_KEY.search(str(k))}


def _batches(client: MlflowClient, run_id: str, field: str, items: list, size: int) -> None:
    for i in range(0, len(items), size):  # MLflow caps the entities per log_batch request
        retry_locked(client.log_batch, run_id, **{field: items[i:i + size]})


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    _batches(client, run_id, "tags", [RunTag(k, v) for k, v in tags.items()], MAX_PARAMS_TAGS_PER_BATCH)


def _number(value: Any) -> float | None:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def config_params(cfg: Any) -> dict[str, str]:
    """MLflow params of a config: flattened dotted keys, secret-looking keys skipped, values cut to fit."""
    return {_key(k): _value(v, MAX_PARAM_VALUE) for k, v in flatten(cfg).items() if not SECRET_KEY.search(k)}


class TrialTracker:
    """s4mc trainer callback mirroring one trial into an MLflow child run of the sweep's parent run.

    Artifacts (config, summary, CSVs, plots, samples, best checkpoint) are logged by `on_train_end`,
    `log_final` (before the last Ray report, which may never return) and `finish` (failed / stopped
    trials); a file already logged unchanged is not sent again. checkpoint_prefix: when the sweep's
    storage is S3 (s3://bucket/.../<trial>), the best checkpoint goes there and into the tag
    best_checkpoint_uri; otherwise it is the artifact checkpoints/best.pt (local or proxied store).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str | None, trial_name: str,
                 trial_key: str, cfg: Any, tags: Mapping[str, Any] | None = None,
                 checkpoint_prefix: str | None = None, samples: int = SAMPLES_LOGGED):
        _quoted(trial_key, "trial_key")
        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent_run_id = str(experiment_id), parent_run_id
        self.trial_name, self.trial_key, self.cfg = trial_name, trial_key, cfg
        self.extra_tags = dict(tags or {})
        self.checkpoint_prefix = checkpoint_prefix.rstrip("/") if checkpoint_prefix else None
        self.samples = samples
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.ended = False
        self._logged_up_to = {"train": -1, "eval": -1}  # steps already in a reused run (resume replays)
        self._best_path: Path | None = None
        self._last_step = 0
        self._sent: dict[tuple[str, str], tuple[int, int]] = {}  # (artifact dir, file) -> (size, mtime_ns)

    # -- the callback interface (docs/architecture.md) ---------------------------------------------
    def on_train_start(self, info: Mapping[str, Any]) -> None:
        if info.get("run_dir"):
            self.run_dir = Path(info["run_dir"])
        self.ensure_run()
        tags = {k: info[k] for k in ("total_steps", "start_step", "num_params", "device") if k in info}
        _log_tags(self.client, self.run_id, _clean_tags({**tags, **self._versions_tags()}))

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log_metrics("train", step, metrics)

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log_metrics("eval", step, metrics)

    def on_checkpoint(self, step: int, path: str | Path, is_best: bool = False) -> None:
        if is_best:
            self._best_path = Path(path)
            _log_tags(self.client, self.ensure_run(), {"best_checkpoint_step": str(int(step))})

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self.log_summary(summary)
        self._log_artifacts(summary)
        self._end("FINISHED")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Logs the summary's top-level numbers (best/eval/mIoU, best/step, steps_per_s, ...); its
        "final" entry repeats the last on_eval and is skipped."""
        numbers = {k: v for k, v in summary.items() if (n := _number(v)) is not None and math.isfinite(n)}
        self._log_metrics("summary", int(numbers.get("steps", self._last_step)), numbers)

    def log_final(self, row: Mapping[str, Any] | None = None) -> None:
        """Logs the artifacts as they are now, without ending the run (call before the last report)."""
        self._log_artifacts(None)

    def finish(self, status: str = "FAILED", error: BaseException | str | None = None) -> None:
        """Ends the run as FAILED / KILLED (or FINISHED) with whatever artifacts exist; no-op once ended."""
        _check_status(status)
        if self.ended:
            return
        self.ensure_run()
        if error is not None:
            text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
            _log_tags(self.client, self.run_id, _clean_tags({"error": text}))
        try:
            self._log_artifacts(None)
        except Exception as exc:  # never hide the original failure behind an artifact problem
            log.warning("trial %s: logging artifacts on %s failed: %s", self.trial_key, status, exc)
        self._end(status)

    # -- the run ----------------------------------------------------------------------------------
    def ensure_run(self) -> str:
        """Creates the child run, or reuses the one tagged with this trial_key; returns its id."""
        if self.run_id is not None:
            return self.run_id
        identity = {k: v for k, v in ((TAG_ROLE, "trial"), (TAG_TRIAL_KEY, self.trial_key),
                                      (TAG_PARENT, self.parent_run_id)) if v}
        run = find_run(self.client, self.experiment_id, identity)
        existing: dict[str, str] = {}
        if run is not None:
            self.run_id, existing = run.info.run_id, dict(run.data.params)
            retry_locked(self.client.update_run, self.run_id, status="RUNNING")
            for kind in self._logged_up_to:
                self._logged_up_to[kind] = self._max_logged_step(run, kind + "/")
            log.info("trial %s: reusing MLflow run %s (logged up to %s)", self.trial_key, self.run_id,
                     self._logged_up_to)
        else:
            self.run_id = retry_locked(self.client.create_run, self.experiment_id, tags=identity,
                                       run_name=self.trial_name).info.run_id
        self.ended = False
        params = config_params(self.cfg)
        if conflicts := sorted(k for k, v in params.items() if existing.get(k, v) != v):
            # MLflow params are immutable: the first values stay, and the log says which differ.
            log.warning("trial %s: params differ from the reused run (first values kept): %s",
                        self.trial_key, ", ".join(conflicts))
        _batches(self.client, self.run_id, "params", [Param(k, v) for k, v in params.items() if k not in existing],
                 MAX_PARAMS_TAGS_PER_BATCH)
        _log_tags(self.client, self.run_id, self._identity_tags())
        return self.run_id

    def _identity_tags(self) -> dict[str, str]:
        p = flatten(self.cfg)
        tags: dict[str, Any] = {"dataset": p.get("data.name"), "split": p.get("data.split"),
                                "split_family": p.get("data.split_family"), "seed": p.get("train.seed"),
                                "host": p.get("host.name"), "s4mc": p.get("s4mc.enabled"),
                                TAG_TRIAL_KEY: self.trial_key, TAG_ROLE: "trial"}
        from s4mc.train.reporting import git_commit  # lazy: it imports torch, which only trials need

        if (commit := self.extra_tags.get("git_commit") or git_commit()) != "unknown":
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
        return _clean_tags({**tags, **self.extra_tags})

    def _versions_tags(self) -> dict[str, Any]:
        # versions.json is written by the trainer (s4mc/train/reporting.py): the exact code that ran.
        try:
            versions = json.loads((self.run_dir / "versions.json").read_text()) if self.run_dir else {}
        except (OSError, ValueError):
            return {}
        tags = {f"versions.{k}": v for k, v in versions.items() if isinstance(v, str | int | float)}
        if (commit := versions.get("git_commit")) and commit != "unknown":
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
        return tags

    def _max_logged_step(self, run, prefix: str) -> int:
        keys = sorted(k for k in run.data.metrics if k.startswith(prefix))
        history = retry_locked(self.client.get_metric_history, self.run_id, keys[0]) if keys else []
        return max((m.step for m in history), default=-1)

    def _end(self, status: str) -> None:
        retry_locked(self.client.set_terminated, self.ensure_run(), status=status)
        self.ended = True

    def _log_metrics(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        run_id, step = self.ensure_run(), int(step)
        self._last_step = max(self._last_step, step)
        if step <= self._logged_up_to.get(kind, -1):
            return  # a resumed trainer replays the rows after its checkpoint: they are already logged
        now = int(time.time() * 1000)
        items = [Metric(_key(k), num, now, step) for k, v in metrics.items()
                 if k != "step" and (num := _number(v)) is not None]
        _batches(self.client, run_id, "metrics", items, MAX_METRICS_PER_BATCH)

    # -- artifacts --------------------------------------------------------------------------------
    def _send(self, path: Path, dest: str, failures: list[str], always: bool = False) -> None:
        """Logs a file as an artifact under dest ("" = the root), or uploads it when dest is an s3:// URI;
        skipped when this file (same size and mtime) already went there."""
        stat = path.stat()
        mark, sig = (dest, str(path)), (stat.st_size, stat.st_mtime_ns)
        if not always and self._sent.get(mark) == sig:
            return
        try:
            if is_s3_uri(dest):
                S3Storage().upload_file(path, dest)
                _log_tags(self.client, self.run_id, {"best_checkpoint_uri": dest})
            else:
                retry_locked(self.client.log_artifact, self.run_id, str(path), dest or None)
            self._sent[mark] = sig
        except Exception as exc:  # one failed artifact must not lose the others (or end the trial)
            failures.append(f"{path.name}: {exc}")

    def _log_artifacts(self, summary: Mapping[str, Any] | None) -> None:
        rd, failures = self.run_dir, []
        self.ensure_run()
        with tempfile.TemporaryDirectory(prefix="s4mc-mlflow-") as tmp_name:
            tmp = Path(tmp_name)
            names = ("config.yaml", "summary.json", "versions.json", "train.csv", "eval.csv")
            files = {n: rd / n for n in names if rd and (rd / n).is_file()}
            if "config.yaml" not in files:  # no run folder yet (failed early): the config we were given
                files["config.yaml"] = tmp / "config.yaml"
                files["config.yaml"].write_text(to_yaml(self.cfg))
            if "summary.json" not in files and summary is not None:
                files["summary.json"] = tmp / "summary.json"
                files["summary.json"].write_text(json.dumps(dict(summary), indent=2, default=str))
            for path in files.values():
                self._send(path, "", failures, always=path.parent == tmp)
            for name, render, source in (("figure4.png", plots.figure4, "train.csv"),
                                         ("eval_curves.png", plots.curves, "eval.csv")):
                if source in files:
                    try:
                        self._send(render(files[source], tmp / name), "plots", failures, always=True)
                    except ValueError as exc:  # e.g. no pl/* columns for the supervised host
                        log.info("trial %s: %s not drawn: %s", self.trial_key, name, exc)
            # samples/step_<t>.png: the newest few; (length, name) orders step numbers with or without padding
            pngs = sorted((rd / "samples").glob("*.png"), key=lambda p: (len(p.stem), p.stem)) if rd else []
            for png in pngs[max(0, len(pngs) - self.samples):]:
                self._send(png, "samples", failures)
            # best.pt is the stable copy; the step_<t>.pt we were told about may have been rotated away.
            best = [p for p in (rd / "checkpoints" / "best.pt" if rd else None, self._best_path) if p and p.is_file()]
            if best:
                s3 = bool(self.checkpoint_prefix) and is_s3_uri(self.checkpoint_prefix)
                self._send(best[0], f"{self.checkpoint_prefix}/best.pt" if s3 else "checkpoints", failures)
        if failures:
            text = "; ".join(failures)
            log.warning("trial %s: %d artifacts not logged: %s", self.trial_key, len(failures), text)
            _log_tags(self.client, self.run_id, _clean_tags({"artifact_errors": text}))
