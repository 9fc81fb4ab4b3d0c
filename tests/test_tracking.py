"""orchestration/tracking.py and plots.py: a TrialTracker driven like the trainer drives it, against a real
`mlflow server` whose artifacts go to S3 (moto), and against a local SQLite store."""

from __future__ import annotations

import csv
import json
import math
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestration import plots, tracking
from orchestration.storage import sha256_file
from orchestration.tracking import ensure_experiment, start_sweep_run
from orchestration.trial_tracker import TrialTracker
from s4mc.config import load_config, to_yaml

services = pytest.mark.services
CLASSES = ("background", "potted plant", "tv/monitor")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _train_row(step: int) -> dict[str, float]:
    p = step / 100
    return {"train/loss": 1.0 / (1 + p), "train/lr": 0.01 * (1 - p) ** 0.9, "pl/quantity": 0.5 + 0.3 * p,
            "pl/quality": 0.8 + 0.1 * p, "pl/quantity_no_refine": 0.45 + 0.25 * p, "pl/quality_no_refine": 0.78}


def _eval_row(step: int) -> dict[str, float]:
    row = {"eval/mIoU": 40.0 + step / 10, "eval/pixel_acc": 0.9, "pl/quantity": 0.6, "pl/quality": 0.85}
    row.update({f"eval/IoU/{c}": 30.0 + i + step / 10 for i, c in enumerate(CLASSES)})
    return row


@pytest.fixture
def run_folder(tmp_path) -> tuple[Path, object]:
    """A run folder as s4mc.train.run_training leaves it after 20 steps (docs/architecture.md)."""
    cfg = load_config(overrides=["train.steps=20", "train.eval_every=10", "data.split=50", "train.seed=3"])
    rd = tmp_path / "run"
    (rd / "samples").mkdir(parents=True)
    (rd / "checkpoints").mkdir()
    (rd / "config.yaml").write_text(to_yaml(cfg))
    (rd / "versions.json").write_text(json.dumps({"python": "3.11.7", "torch": "2.13.0", "git_commit": "abc123"}))
    _write_csv(rd / "train.csv", [{"step": s, **_train_row(s)} for s in range(2, 21, 2)])
    _write_csv(rd / "eval.csv", [{"step": s, **_eval_row(s)} for s in (10, 20)])
    for step in (10, 20):
        Image.new("RGB", (48, 16), (step * 10, 80, 160)).save(rd / "samples" / f"step_{step:08d}.png")
    (rd / "checkpoints" / "best.pt").write_bytes(b"fake checkpoint " * 64)
    summary = {"run_dir": str(rd), "steps": 20, "total_steps": 20, "stopped_early": False,
               "best/eval/mIoU": 42.0, "best/step": 20, "final": {"step": 20, **_eval_row(20)},
               "train_time_s": 1.5, "wall_time_s": 2.0, "steps_per_s": 13.3}
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd, cfg


def _drive(tracker: TrialTracker, rd: Path, steps=range(2, 21, 2), end: bool = True) -> None:
    """Callback calls in the order s4mc/train/loop.py makes them."""
    tracker.on_train_start({"run_dir": str(rd), "total_steps": 20, "start_step": 0, "num_params": 1234})
    for step in steps:
        tracker.on_step(step, _train_row(step))
        if step % 10 == 0:
            tracker.on_checkpoint(step, rd / "checkpoints" / "best.pt", True)
            tracker.on_eval(step, _eval_row(step))
    if end:
        tracker.on_train_end(json.loads((rd / "summary.json").read_text()))


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _check_run(client: MlflowClient, run_id: str, parent: str, key: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["mlflow.parentRunId"] == parent and tags["trial_key"] == key
    assert (tags["dataset"], tags["split"], tags["seed"], tags["host"]) == ("embedded", "50", "3", "cutmix_seg")
    assert tags["git_commit"] == "abc123" and tags["manifest"] == "experiments/sweeps/x.yaml"
    assert params["train.lr"] == "0.01" and params["model.aspp_rates"] == "[6, 12, 18]"
    assert params["s4mc.alpha0"] == "0.4" and params["train.seed"] == "3"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(2, 21, 2))
    assert _history(client, run_id, "eval/mIoU") == [(10, 41.0), (20, 42.0)]
    assert _history(client, run_id, "eval/IoU/tv/monitor")[-1] == (20, 34.0)
    assert "eval/IoU/potted plant" in run.data.metrics
    assert run.data.metrics["best/eval/mIoU"] == 42.0


ARTIFACTS = {"config.yaml", "summary.json", "versions.json", "train.csv", "eval.csv", "plots/figure4.png",
             "plots/eval_curves.png", "samples/step_00000010.png", "samples/step_00000020.png",
             "checkpoints/best.pt"}


@services
def test_tracker_on_proxied_server_puts_artifacts_in_s3(mlflow_server, s3, run_folder):
    rd, cfg = run_folder
    uri, client = mlflow_server.url, MlflowClient(mlflow_server.url)
    exp_id = ensure_experiment(f"proxied-{uuid.uuid4().hex[:6]}", tracking_uri=uri)
    assert ensure_experiment(client.get_experiment(exp_id).name, tracking_uri=uri) == exp_id
    parent = start_sweep_run(exp_id, "sweep-a", {"manifest": "experiments/sweeps/x.yaml"}, tracking_uri=uri)
    assert start_sweep_run(exp_id, "sweep-a", tracking_uri=uri) == parent  # a resumed sweep reuses it

    tags = {"manifest": "experiments/sweeps/x.yaml", "aws_secret_access_key": "never"}
    tracker = TrialTracker(uri, exp_id, parent, "sweep-a-t000", "sweep-a-t000", cfg, tags)
    _drive(tracker, rd)
    _check_run(client, tracker.run_id, parent, "sweep-a-t000")
    assert "aws_secret_access_key" not in client.get_run(tracker.run_id).data.tags

    listed = s3.list_objects(f"s3://{mlflow_server.artifacts_bucket}/{mlflow_server.artifacts_prefix}/{exp_id}/")
    base = f"{mlflow_server.artifacts_prefix}/{exp_id}/{tracker.run_id}/artifacts/"
    assert {o.key[len(base):] for o in listed if o.key.startswith(base)} == ARTIFACTS

    # A retried trial: same trial_key, new tracker. It reuses the run and skips the replayed rows.
    again = TrialTracker(uri, exp_id, parent, "sweep-a-t000", "sweep-a-t000", cfg, tags)
    _drive(again, rd, steps=range(12, 23, 2), end=False)
    again.finish("KILLED")
    assert again.run_id == tracker.run_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in children] == [tracker.run_id]
    assert [s for s, _ in _history(client, tracker.run_id, "train/loss")] == [*range(2, 21, 2), 22]
    assert client.get_run(tracker.run_id).info.status == "KILLED"


@services
def test_best_checkpoint_goes_to_s3_when_the_sweep_storage_is_s3(mlflow_server, s3, s3_bucket, run_folder):
    rd, cfg = run_folder
    uri = mlflow_server.url
    exp_id = ensure_experiment(f"ckpt-{uuid.uuid4().hex[:6]}", tracking_uri=uri)
    prefix = f"s3://{s3_bucket}/sweeps/b/trial-1"
    tracker = TrialTracker(uri, exp_id, None, "t1", "b-t001", cfg, checkpoint_prefix=prefix)
    _drive(tracker, rd)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags["best_checkpoint_uri"] == f"{prefix}/best.pt"
    assert run.data.tags["best_checkpoint_step"] == "20"
    assert s3.head(f"{prefix}/best.pt").sha256 == sha256_file(rd / "checkpoints" / "best.pt")
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id)}
    assert "checkpoints" not in artifacts and "config.yaml" in artifacts


def test_tracker_on_local_sqlite_store(tmp_path, run_folder, monkeypatch, mlflow_db_copy):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    try:
        uri = tracking.configure(None, project_dir=tmp_path / "project")
    finally:
        mlflow.set_tracking_uri(previous)
    db = (tmp_path / "project" / "mlruns" / "mlflow.db").resolve()
    assert uri == f"sqlite:///{db}" and (db.parent / "artifacts").is_dir()
    mlflow_db_copy(db)  # a migrated store: saves seconds of migrations
    exp_id = ensure_experiment("local exp", tracking_uri=uri)
    client = MlflowClient(uri)
    location = client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "project" / "mlruns" / "artifacts" / "local_exp").resolve().as_uri()
    parent = start_sweep_run("local exp", "sweep-l", {"manifest": "experiments/sweeps/x.yaml"}, tracking_uri=uri)

    rd, cfg = run_folder
    tracker = TrialTracker(uri, exp_id, parent, "t0", "sweep-l-t000", cfg, {"manifest": "experiments/sweeps/x.yaml"})
    _drive(tracker, rd)
    _check_run(client, tracker.run_id, parent, "sweep-l-t000")
    root = Path(client.get_run(tracker.run_id).info.artifact_uri.removeprefix("file://"))
    assert root.is_relative_to((tmp_path / "project" / "mlruns" / "artifacts").resolve())
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == ARTIFACTS


def test_params_are_truncated_and_secrets_skipped(sqlite_tracking_uri):
    cfg = {"data": {"root": "s3://user:pw@bucket/data", "note": "x" * 7000},
           "aws": {"secret_access_key": "nope", "api_token": "nope"}, "train": {"lr": 0.1, "seed": 1}}
    exp_id = ensure_experiment("params", tracking_uri=sqlite_tracking_uri)
    tracker = TrialTracker(sqlite_tracking_uri, exp_id, None, "p", "p-t000", cfg)
    tracker.on_train_start({})
    tracker.finish("FAILED", error=RuntimeError("data loader exploded"))
    run = MlflowClient(sqlite_tracking_uri).get_run(tracker.run_id)
    params = run.data.params
    assert len(params["data.note"]) == tracking.MAX_PARAM_VALUE and params["data.note"].endswith("[truncated]")
    assert params["data.root"] == "s3://***@bucket/data"
    assert not any("secret" in k or "token" in k for k in params)
    assert run.info.status == "FAILED"  # a crashed trial stays visible
    assert run.data.tags["error"] == "RuntimeError: data loader exploded"
    assert "config.yaml" in {a.path for a in MlflowClient(sqlite_tracking_uri).list_artifacts(tracker.run_id)}
    tracker.finish("FAILED")  # idempotent


def test_retry_locked_retries_only_lock_errors(monkeypatch):
    monkeypatch.setattr(tracking, "LOCK_BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        tracking.retry_locked(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_figure4_and_curves_render_pngs(tmp_path, run_folder):
    rd, _ = run_folder
    rows = [{"step": s, **_train_row(s)} for s in range(0, 3000, 10)]
    rows[5]["pl/quality_no_refine"] = math.nan  # gaps in a column are skipped
    for source, name in ((rows, "from_rows.png"), (rd / "train.csv", "from_csv.png")):
        out = plots.figure4(source, tmp_path / name)
        assert out.stat().st_size > 0
        with Image.open(out) as img:
            assert img.format == "PNG" and img.size == (1200, 480)
    curve = plots.curves(rd / "eval.csv", tmp_path / "curves.png")
    with Image.open(curve) as img:
        assert img.format == "PNG" and img.size[0] > 0
    with pytest.raises(ValueError, match="pl/quantity"):
        plots.figure4([{"step": 1, "train/loss": 1.0}], tmp_path / "none.png")
    assert list(plots.moving_average(plots.np.array([1.0, 2.0, 3.0, 4.0]), 3)) == [1.5, 2.0, 3.0, 3.5]
