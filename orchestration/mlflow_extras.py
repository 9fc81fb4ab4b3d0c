"""What a trial's MLflow run carries beyond metrics and files: system metrics and its best model.

`start_system_metrics` runs MLflow's own `SystemMetricsMonitor` for one run id (CPU, memory, disk and
network through psutil; NVIDIA GPUs through nvidia-ml-py where a GPU and the library are present,
otherwise MLflow skips them with one log line) as `system/*` metrics. `TrialTracker`
(orchestration/tracking.py) starts it when it opens a child run and stops it when it ends the run; we
use the monitor directly rather than `mlflow.start_run(log_system_metrics=True)` because the tracker
never uses the fluent active-run stack (several trials share a process in Ray).

`log_best_model` registers the trial's best checkpoint as an MLflow 3 *logged model*: a LoggedModel
named `<trial key>-best`, whose source run is the trial's run, whose artifacts are best.pt and the
trial's config.yaml (enough to rebuild the network: s4mc.train.build), whose params are the trial's
sampled parameters, and whose metrics are the evaluation metrics of the step that made it best (`best_eval_row`). The
run lists it under its logged models and the experiment's Models tab compares models by those metrics.
A checkpoint already registered for the same run and step is not registered again (resumed trials).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow's default sampling interval (mlflow.system_metrics, 10 s): about 9 samples in a 90 s trial of
# the embedded sweep, and one SQLite write per sample per running trial stays far below lock contention.
SYSTEM_METRICS_INTERVAL_S = 10.0
MODEL_TYPE = "s4mc-checkpoint"


def start_system_metrics(run_id: str, tracking_uri: str, resume: bool):
    """A started SystemMetricsMonitor for run_id (call `.finish()` to stop it), or None if unavailable."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       resume_logging=resume, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # e.g. psutil missing: a trial must not fail because of its monitoring
        log.warning("run %s: no system metrics: %s", run_id, exc)
        return None


def best_eval_row(eval_csv: Path | None) -> tuple[int | None, dict[str, float]]:
    """(step, metrics) of the evaluation that wrote best.pt: the first row with the highest eval/mIoU,
    the trainer's own rule (s4mc/train/loop.py); (None, {}) without an eval.csv."""
    from s4mc.train.callbacks import read_csv

    rows = [r for r in (read_csv(eval_csv) if eval_csv is not None and eval_csv.is_file() else [])
            if isinstance(r.get("eval/mIoU"), int | float)]
    if not rows:
        return None, {}
    best = max(rows, key=lambda r: r["eval/mIoU"])  # max keeps the first of equal values, as the trainer
    return int(best["step"]), {k: float(v) for k, v in best.items() if k != "step" and isinstance(v, int | float)}


def _already_registered(client, experiment_id: str, run_id: str, name: str, step: int) -> bool:
    found = client.search_logged_models([experiment_id],
                                        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    # Only READY ones: a registration that failed half-way (e.g. a locked SQLite store) is done again.
    return any(m.tags.get("checkpoint_step") == str(step) and str(m.status) == "READY" for m in found)


def log_best_model(client, experiment_id: str, run_id: str, name: str, checkpoint: Path,
                   config: Path | None, step: int, metrics: Mapping[str, float],
                   params: Mapping[str, Any] | None = None) -> str | None:
    """Registers checkpoint (+ config) as a READY logged model with metrics at step; returns its id."""
    if _already_registered(client, experiment_id, run_id, name, step):
        return None
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
                                       tags={"checkpoint_step": str(step), "checkpoint_file": checkpoint.name},
                                       params={k: str(v) for k, v in (params or {}).items()})
    try:
        with tempfile.TemporaryDirectory(prefix="s4mc-model-") as tmp:
            for src in (checkpoint, config):
                if src is not None and src.is_file():
                    try:
                        os.link(src, Path(tmp) / src.name)  # checkpoints are large: no second copy on disk
                    except OSError:
                        shutil.copy2(src, Path(tmp) / src.name)
            client.log_model_artifacts(model.model_id, tmp)
        items = _model_metrics(client, run_id, int(step), metrics, model.model_id)
        if items:
            client.log_batch(run_id, metrics=items)
        _link_output(client, run_id, model.model_id, step)
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def _model_metrics(client, run_id: str, step: int, metrics: Mapping[str, float], model_id: str) -> list:
    """The run's own metric points at `step` that match `metrics`, re-sent with the model id.

    MLflow attaches metrics to a logged model only through a run's log_batch; sending each point with its
    original timestamp makes the store link it to the model without adding a second point to the run's
    history. A value the run does not hold at that step (a multi-seed trial's run holds the seed mean,
    its best.pt is seed 0's) is left off rather than written into the run as a new point."""
    from mlflow.entities import Metric

    items = []
    for key, value in metrics.items():
        for point in client.get_metric_history(run_id, key):
            if point.step == step and math.isclose(point.value, value, rel_tol=1e-6, abs_tol=1e-9):
                items.append(Metric(key, point.value, point.timestamp, step, model_id=model_id))
                break
    return items


def _link_output(client, run_id: str, model_id: str, step: int) -> None:
    # The run page lists a model as an output of the run only when it is logged as one.
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(model_id, int(step))])
