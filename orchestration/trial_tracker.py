"""`TrialTracker`: one trial's MLflow child run, as an s4mc trainer callback (docs/architecture.md).

A Ray trial passes it to `run_training` (orchestration/trial.py). It creates or reuses the child run by
its trial key (a retried or resumed trial continues its run, and metric rows a resumed trainer replays
are not logged twice), logs the config as params and the trainer's metric rows through a background
outbox (orchestration/outbox.py: a tracking outage neither stalls training nor loses a row), and at the
end the run folder's files, plots, samples and best checkpoint (an MLflow 3 logged model,
orchestration/mlflow_extras.py) with the run's system metrics. Every MLflow call goes through
`MlflowClient` with explicit run ids, never the fluent active-run stack, so that trials in Ray workers
and threads cannot step on each other. Names of tags and the store's helpers: orchestration/tracking.py.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestration import plots
from orchestration.mlflow_extras import best_eval_row, log_best_model, start_system_metrics
from orchestration.outbox import Outbox
from orchestration.storage import S3Storage, is_s3_uri
from orchestration.tracking import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    PARAM_PREFIX,
    SAMPLES_LOGGED,
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL_KEY,
    as_number,
    check_status,
    clean_tags,
    config_params,
    find_run,
    log_in_batches,
    log_tags,
    metric_key,
    quoted,
    retry_locked,
)
from s4mc.config import flatten, to_yaml

log = logging.getLogger(__name__)


class TrialTracker:
    """s4mc trainer callback mirroring one trial into an MLflow child run of the sweep's parent run.

    Artifacts (config, summary, CSVs, plots, samples, best checkpoint) are logged by `on_train_end` and
    by `finish` (before the last Ray report, which may never return, and for failed / stopped trials);
    a file already logged unchanged is not sent again. checkpoint_prefix: when the sweep's
    storage is S3 (s3://bucket/.../<trial>), the best checkpoint goes there and into the tag
    best_checkpoint_uri; otherwise it is the artifact checkpoints/best.pt (local or proxied store).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str | None, trial_name: str,
                 trial_key: str, cfg: Any, tags: Mapping[str, Any] | None = None,
                 checkpoint_prefix: str | None = None, samples: int = SAMPLES_LOGGED):
        quoted(trial_key, "trial_key")
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
        # Metric rows and tags from the training loop are sent by a background thread (outbox.py): a slow
        # or restarting server neither stalls training nor loses a row; _end waits for all of it.
        self._outbox = Outbox(trial_key)
        self._monitor = None  # system metrics of this run (orchestration/mlflow_extras.py)

    # -- the callback interface (docs/architecture.md) ---------------------------------------------
    def on_train_start(self, info: Mapping[str, Any]) -> None:
        if info.get("run_dir"):
            self.run_dir = Path(info["run_dir"])
        self.ensure_run()
        tags = {k: info[k] for k in ("total_steps", "start_step", "num_params", "device") if k in info}
        log_tags(self.client, self.run_id, clean_tags({**tags, **self._versions_tags()}))

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log_metrics("train", step, metrics)

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log_metrics("eval", step, metrics)

    def on_checkpoint(self, step: int, path: str | Path, is_best: bool = False) -> None:
        if is_best:
            self._best_path = Path(path)
            self._outbox.put(log_tags, self.client, self.ensure_run(), {"best_checkpoint_step": str(int(step))})

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self.log_summary(summary)
        self._log_artifacts(summary)
        self._end("FINISHED")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Logs the summary's top-level numbers (best/eval/mIoU, best/step, steps_per_s, ...); its
        "final" entry repeats the last on_eval and is skipped."""
        numbers = {k: v for k, v in summary.items() if (n := as_number(v)) is not None and math.isfinite(n)}
        self._log_metrics("summary", int(numbers.get("steps", self._last_step)), numbers)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        log_tags(self.client, self.ensure_run(), clean_tags(tags))

    def finish(self, status: str = "FAILED", error: BaseException | str | None = None) -> None:
        """Ends the run as FAILED / KILLED (or FINISHED) with whatever artifacts exist; no-op once ended."""
        check_status(status)
        if self.ended:
            return
        self.ensure_run()
        if error is not None:
            text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
            log_tags(self.client, self.run_id, clean_tags({"error": text}))
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
        if self._monitor is None:
            self._monitor = start_system_metrics(self.run_id, self.client.tracking_uri, resume=run is not None)
        params = config_params(self.cfg)
        if conflicts := sorted(k for k, v in params.items() if existing.get(k, v) != v):
            # MLflow params are immutable: the first values stay, and the log says which differ.
            log.warning("trial %s: params differ from the reused run (first values kept): %s",
                        self.trial_key, ", ".join(conflicts))
        log_in_batches(self.client, self.run_id, "params",
                       [Param(k, v) for k, v in params.items() if k not in existing], MAX_PARAMS_TAGS_PER_BATCH)
        log_tags(self.client, self.run_id, self._identity_tags())
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
        return clean_tags({**tags, **self.extra_tags})

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
        self.flush()
        if self._monitor is not None:  # flushes its last samples before the run is closed
            self._monitor.finish()
            self._monitor = None
        retry_locked(self.client.set_terminated, self.ensure_run(), status=status)
        self.ended = True

    def _log_metrics(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        run_id, step = self.ensure_run(), int(step)
        self._last_step = max(self._last_step, step)
        if step <= self._logged_up_to.get(kind, -1):
            return  # a resumed trainer replays the rows after its checkpoint: they are already logged
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), num, now, step) for k, v in metrics.items()
                 if k != "step" and (num := as_number(v)) is not None]
        self._outbox.put(log_in_batches, self.client, run_id, "metrics", items, MAX_METRICS_PER_BATCH)

    def flush(self) -> None:
        """Waits until every queued metric row and tag reached the store; notes calls that could not."""
        if errors := self._outbox.drain():
            log.warning("trial %s: %d tracking calls failed: %s", self.trial_key, len(errors), errors[0])
            log_tags(self.client, self.ensure_run(), clean_tags({"tracking_errors": "; ".join(errors)[:2000]}))

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
                log_tags(self.client, self.run_id, {"best_checkpoint_uri": dest})
            else:
                retry_locked(self.client.log_artifact, self.run_id, str(path), dest or None)
            self._sent[mark] = sig
        except Exception as exc:  # one failed artifact must not lose the others (or end the trial)
            failures.append(f"{path.name}: {exc}")

    def _register_best(self, best: Path, config: Path | None, failures: list[str]) -> None:
        step, metrics = best_eval_row(self.run_dir / "eval.csv" if self.run_dir else None)
        params = {k[len(PARAM_PREFIX):]: v for k, v in self.extra_tags.items() if k.startswith(PARAM_PREFIX)}
        try:
            retry_locked(log_best_model, self.client, self.experiment_id, self.run_id, f"{self.trial_key}-best",
                         best, config, self._last_step if step is None else step, metrics, params)
        except Exception as exc:  # like a failed artifact: noted on the run, never ends the trial
            failures.append(f"logged model: {exc}")

    def _log_artifacts(self, summary: Mapping[str, Any] | None) -> None:
        self.flush()  # the metrics first: an artifact upload must not overtake the rows it summarises
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
                self._register_best(best[0], files.get("config.yaml"), failures)
        if failures:
            text = "; ".join(failures)
            log.warning("trial %s: %d artifacts not logged: %s", self.trial_key, len(failures), text)
            log_tags(self.client, self.run_id, clean_tags({"artifact_errors": text}))
