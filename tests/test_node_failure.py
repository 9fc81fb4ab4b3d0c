"""Trials survive a dead worker node, and a trial that fails every attempt fails the sweep (services).

The node test adds a third node (127.0.0.4, one CPU) to the session's two-node loopback cluster, runs
three trials at once so that one trains there, and SIGKILLs every process of that node once its trial
has a checkpoint. Ray retries the trial on a surviving node from that checkpoint. Each trial must then
appear exactly once in Optuna, in MLflow and in the results, all complete. The second test runs a
one-trial sweep whose trial always raises, through the `s4mc-sweep` command line: exit code 1 and one
line that names the trial.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_sweep import REPO, write_manifest

VICTIM_IP = "127.0.0.4"
VICTIM_TEMP = f"/tmp/ray-s4mc-{os.getpid()}v"
OVERRIDES = ["train.steps=30", "train.eval_every=10", "train.log_every=5", "data.embedded.num_train=64",
             "data.embedded.num_val=16", "data.embedded.image_size=32", "data.crop_size=32", "model.width=0.25",
             "eval.batch_size=16", "model.pretrained=null", "train.sup_only_steps=0"]


def _noting_trial(config, settings, tracking, base_config=None):
    """trial_main, pausing 0.3 s a step and noting `<node ip> <step>` once each evaluation was reported
    with its checkpoint, so that the test knows when the trial on the victim node has one."""
    import ray
    from ray import tune

    from orchestration.trial import run_trial

    note = Path(settings.work_dir) / "nodes" / f"t{int(config['optuna_trial']):03d}"
    note.parent.mkdir(parents=True, exist_ok=True)
    ip = ray.util.get_node_ip_address()

    class Note:
        def on_step(self, step, metrics):
            time.sleep(0.3)

        def on_eval(self, step, metrics):  # after the Ray reporter's on_eval: the report with its checkpoint
            with note.open("a") as f:
                f.write(f"{ip} {step}\n")

    run_trial(config, settings, tracking, tune.report, tune.get_checkpoint, tune.Checkpoint,
              callbacks=(Note(),), base_config=base_config)


@pytest.mark.services
def test_trials_of_a_killed_node_finish_elsewhere_from_their_checkpoints(ray_cluster, tmp_path, mlflow_db_copy):
    from conftest import RAY_ENV, stop_ray_processes
    from mlflow import MlflowClient
    from ray import cloudpickle

    from orchestration.manifest import load_manifest
    from orchestration.search import open_study
    from orchestration.services import free_port
    from orchestration.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray_cli = str(Path(sys.executable).with_name("ray"))
    out = subprocess.run([ray_cli, "start", f"--address={ray_cluster}", f"--node-ip-address={VICTIM_IP}",
                          f"--temp-dir={VICTIM_TEMP}", "--num-cpus=1", "--object-store-memory=104857600",
                          "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                          f"--metrics-export-port={free_port()}"],
                         env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    killed: dict[str, str] = {}
    try:
        path = write_manifest(tmp_path, "nodes", tracking_uri=mlflow_db_copy(tmp_path / "mlruns" / "mlflow.db"),
                              num_trials=3, max_concurrent=3, retries=2, overrides=OVERRIDES,
                              scheduler={"name": "fifo"}, ray={"address": ray_cluster})
        m = load_manifest(path)
        notes = Path(m.work_dir) / "nodes"

        def kill_victim_after_its_checkpoint():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                for note in notes.glob("t*") if notes.is_dir() else []:
                    if any(line.startswith(VICTIM_IP) for line in note.read_text().splitlines()):
                        killed["trial"] = note.name
                        time.sleep(2.0)  # the driver takes the report (and so the checkpoint) in first
                        stop_ray_processes([VICTIM_TEMP], grace_s=0.0)  # SIGTERM, then SIGKILL at once
                        return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_victim_after_its_checkpoint, daemon=True)
        killer.start()
        result = run_sweep(m, manifest_path=str(path), trainable=_noting_trial, echo=lambda *_: None)
        killer.join(timeout=5)
    finally:
        stop_ray_processes([VICTIM_TEMP])

    assert killed, "no trial ever checkpointed on the victim node"
    assert not result.errors and not result.interrupted
    assert sorted(r["trial"] for r in result.rows) == ["nodes-t000", "nodes-t001", "nodes-t002"]
    assert {r["state"] for r in result.rows} == {"COMPLETE"}
    row = next(r for r in result.rows if r["trial"] == f"nodes-{killed['trial']}")
    assert VICTIM_IP in row["node_ips"] and len(row["node_ips"]) == 2, row["node_ips"]
    assert row["resumed_from"] >= 10, "the retried trial started from zero, not from its checkpoint"
    trials = open_study(m, create=False).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 3
    client = MlflowClient(m.tracking.uri)
    exp = client.get_experiment_by_name(m.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`s4mc.role` = 'trial'")
    assert sorted(r.data.tags["trial_key"] for r in runs) == ["nodes-t000", "nodes-t001", "nodes-t002"]
    victim = next(r for r in runs if r.data.tags["trial_key"] == row["trial"])
    assert [x.step for x in client.get_metric_history(victim.info.run_id, "eval/mIoU")] == [10, 20, 30]


def _failing_trial(config, settings, tracking, base_config=None):
    raise RuntimeError("this trial always fails")


@pytest.mark.services
def test_a_trial_that_fails_every_attempt_fails_the_sweep_naming_it(tmp_path, mlflow_db_copy):
    path = write_manifest(tmp_path, "fails", tracking_uri=mlflow_db_copy(tmp_path / "mlruns" / "mlflow.db"),
                          num_trials=1, max_concurrent=1, retries=1, project=str(tmp_path),
                          ray={"num_cpus": 1, "temp_dir": f"/tmp/ray-s4mc-{os.getpid()}f"})
    script = ("import sys; from orchestration import cli, sweep; from tests.test_node_failure import "
              "_failing_trial as f; from ray import cloudpickle; import tests.test_node_failure as t; "
              "cloudpickle.register_pickle_by_value(t); orig = sweep.run_sweep; "
              "sweep.run_sweep = lambda m, **kw: orig(m, trainable=f, **kw); "
              f"sys.exit(cli.main(['run', '--manifest', {str(path)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        from conftest import stop_ray_processes

        stop_ray_processes([f"/tmp/ray-s4mc-{os.getpid()}f"])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("s4mc-sweep: error:")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1 and "fails-t000" in errors[0] and "this trial always fails" in errors[0], errors
