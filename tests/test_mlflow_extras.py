"""orchestration/mlflow_extras.py through TrialTracker: the best checkpoint as an MLflow 3 logged model with
its metrics, and MLflow's system metrics per trial run, on a real local SQLite store."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from orchestration.mlflow_extras import best_eval_row
from orchestration.tracking import ensure_experiment, start_sweep_run
from orchestration.trial import _Tracked
from orchestration.trial_tracker import TrialTracker
from tests.test_tracking import _eval_row, _train_row, run_folder  # noqa: F401 (fixture)


def test_best_eval_row_is_the_first_highest_miou(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("step,eval/mIoU,pl/quality\n10,41.0,0.8\n20,43.5,0.9\n30,43.5,0.95\n")
    assert best_eval_row(path) == (20, {"eval/mIoU": 43.5, "pl/quality": 0.9})
    assert best_eval_row(tmp_path / "missing.csv") == (None, {})


@pytest.mark.services
def test_tracker_registers_best_model_and_system_metrics(sqlite_tracking_uri, run_folder, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a sample within the short test run
    uri = sqlite_tracking_uri
    exp_id = ensure_experiment("extras", tracking_uri=uri)
    parent = start_sweep_run("extras", "sw", {}, tracking_uri=uri)
    rd, cfg = run_folder
    tracker = TrialTracker(uri, exp_id, parent, "t0", "sw-t000", cfg, {"param.s4mc.k": 2})
    tracker.on_train_start({"run_dir": str(rd), "total_steps": 20, "start_step": 0})
    for step in range(2, 21, 2):
        tracker.on_step(step, _train_row(step))
        if step % 10 == 0:
            tracker.on_checkpoint(step, rd / "checkpoints" / "best.pt", True)
            tracker.on_eval(step, _eval_row(step))
    time.sleep(1.0)  # let the monitor take a few samples
    tracker.finish("FINISHED")  # before the last Ray report (RayReporter); what follows registers nothing twice
    _Tracked(tracker).on_train_end(json.loads((rd / "summary.json").read_text()))
    tracker.finish("FINISHED")

    client = MlflowClient(uri)
    models = client.search_logged_models([exp_id])
    assert [m.name for m in models] == ["sw-t000-best"]
    model = models[0]
    assert str(model.status) == "READY" and model.source_run_id == tracker.run_id
    assert model.tags["checkpoint_step"] == "20" and model.params == {"s4mc.k": "2"}
    assert {m.key: m.value for m in model.metrics}["eval/mIoU"] == 42.0
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert files == {"best.pt", "config.yaml"}
    system = {k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
