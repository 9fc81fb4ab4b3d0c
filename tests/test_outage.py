"""A tracking server that goes away and comes back loses nothing and fails no trial (services tier).

Both tests use a real `mlflow server` on loopback that is stopped and started again on the same port
and database. The first drives one TrialTracker in this process with MLflow's own HTTP retries turned
off, so the outage is longer than the client's retries; the second runs a real two-trial sweep on the
two-node loopback Ray cluster and stops the server for 30 s while they train. What MLflow holds
afterwards is counted against the trainer's own CSV files, which no outage touches.
"""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestration.services import free_port, start_mlflow_server
from tests.test_sweep import write_manifest
from tests.test_tracking import _eval_row, _train_row, run_folder  # noqa: F401 (fixture)

OUTAGE_S = 30.0  # the figure: a restart of the tracking server


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.services
def test_tracker_waits_out_an_outage_longer_than_the_client_retries(tmp_path, mlflow_db_copy, run_folder,  # noqa: F811
                                                                     monkeypatch):
    from mlflow import MlflowClient

    from orchestration.tracking import ensure_experiment, start_sweep_run
    from orchestration.trial_tracker import TrialTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client gives up at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    backend, port = mlflow_db_copy(tmp_path / "db" / "mlflow.db"), free_port()
    server = start_mlflow_server(backend, str(tmp_path / "artifacts"), port=port)
    try:
        exp_id = ensure_experiment("outage", tracking_uri=server.url)
        parent = start_sweep_run("outage", "sw", {}, tracking_uri=server.url)
        rd, cfg = run_folder
        tracker = TrialTracker(server.url, exp_id, parent, "t0", "sw-t000", cfg, {})
        tracker.on_train_start({"run_dir": str(rd), "total_steps": 20, "start_step": 0})
        server.stop()
        t0 = time.monotonic()
        for step in range(2, 21, 2):  # the trainer goes on while the server is away
            tracker.on_step(step, _train_row(step))
            if step % 10 == 0:
                tracker.on_checkpoint(step, rd / "checkpoints" / "best.pt", True)
                tracker.on_eval(step, _eval_row(step))
        assert time.monotonic() - t0 < 2.0, "training was blocked by the outage"
        time.sleep(8.0)
        server = start_mlflow_server(backend, str(tmp_path / "artifacts"), port=port)
        tracker.on_train_end(json.loads((rd / "summary.json").read_text()))
        client = MlflowClient(server.url)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and "tracking_errors" not in run.data.tags
        assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == list(range(2, 21, 2))
        assert [m.step for m in client.get_metric_history(tracker.run_id, "eval/mIoU")] == [10, 20]
        assert run.data.tags["best_checkpoint_step"] == "20"
    finally:
        server.stop()


def _slow_trial(config, settings, tracking, base_config=None):
    """trial_main with a 0.3 s pause per step, so that both trials are still training during the outage."""
    from ray import tune

    from orchestration.trial import run_trial

    class Slow:
        def on_step(self, step, metrics):
            time.sleep(0.3)

    run_trial(config, settings, tracking, tune.report, tune.get_checkpoint, tune.Checkpoint,
              callbacks=(Slow(),), base_config=base_config)


@pytest.mark.services
def test_sweep_loses_nothing_in_a_30s_tracking_outage(ray_cluster, tmp_path, mlflow_db_copy, monkeypatch):
    from mlflow import MlflowClient
    from ray import cloudpickle

    from orchestration.manifest import load_manifest
    from orchestration.sweep import run_sweep
    from orchestration.tracking import config_params

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    backend, port = mlflow_db_copy(tmp_path / "db" / "mlflow.db"), free_port()
    servers = [start_mlflow_server(backend, str(tmp_path / "artifacts"), port=port)]
    path = write_manifest(tmp_path, "outage", tracking_uri=servers[0].url, num_trials=2, retries=0,
                          overrides=["train.steps=40", "train.eval_every=20", "train.log_every=1",
                                     "data.embedded.num_train=64", "data.embedded.num_val=16",
                                     "data.embedded.image_size=32", "data.crop_size=32", "model.width=0.25",
                                     "eval.batch_size=16", "model.pretrained=null", "train.sup_only_steps=0"],
                          scheduler={"name": "fifo"}, ray={"address": ray_cluster})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # earlier tests set it (tracking.configure)
    m = load_manifest(path)
    assert m.tracking.uri == servers[0].url
    client = MlflowClient(servers[0].url)
    outage: dict[str, float] = {}

    def cut_when_training():  # a trial has logged rows: stop the server, start it again later
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "start" not in outage:
            try:
                runs = client.search_runs([client.get_experiment_by_name(m.tracking.experiment).experiment_id],
                                          filter_string="tags.`s4mc.role` = 'trial'")
                if any("train/loss" in r.data.metrics for r in runs):  # a trial is training
                    servers[0].stop()
                    outage["start"] = time.monotonic()
                    time.sleep(OUTAGE_S)
                    servers.append(start_mlflow_server(backend, str(tmp_path / "artifacts"), port=port))
                    outage["end"] = time.monotonic()
                    return
            except Exception as exc:  # noqa: BLE001 - the experiment may not exist yet
                outage["last_error"] = repr(exc)[:300]
            time.sleep(0.5)

    cutter = threading.Thread(target=cut_when_training, daemon=True)
    cutter.start()
    try:
        result = run_sweep(m, manifest_path=str(path), trainable=_slow_trial, echo=lambda *_: None)
        ended = time.monotonic()
        cutter.join(timeout=5)
        assert outage.get("start", ended) < ended, f"the outage did not happen while the sweep ran: {outage}"
        assert outage.get("end", 0) - outage.get("start", 0) >= OUTAGE_S - 1, (outage, result.rows)
        assert not result.errors and not result.interrupted
        client = MlflowClient(servers[-1].url)
        exp = client.get_experiment_by_name(m.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`s4mc.role` = 'trial'")
        assert sorted(r.data.tags["trial_key"] for r in runs) == ["outage-t000", "outage-t001"]
        for run in runs:
            run_dir = Path(m.work_dir) / run.data.tags["trial_key"] / "seed_0"
            train, evals = _rows(run_dir / "train.csv"), _rows(run_dir / "eval.csv")
            assert run.info.status == "FINISHED"
            for key in ("train/loss", "train/lr", "pl/quantity"):  # pl/* also comes with each evaluation
                logged = sorted(x.step for x in client.get_metric_history(run.info.run_id, key))
                expected = [int(r["step"]) for r in train] + ([int(r["step"]) for r in evals] if "pl/" in key else [])
                assert logged == sorted(expected), key
            assert [x.step for x in client.get_metric_history(run.info.run_id, "eval/mIoU")] == \
                [int(r["step"]) for r in evals]
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(run_dir / "config.yaml")
            assert set(config_params(cfg)) <= set(run.data.params)
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.yaml", "train.csv", "eval.csv", "summary.json"} <= files
    finally:
        for server in servers:
            server.stop()
