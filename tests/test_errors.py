"""Bad input and unreachable services end in one line naming the setting, exit code 2, nothing lost.

The rules behind these checks are unit-tested in tests/test_execution.py; here the command lines run.

Each case runs the installed command line in a subprocess, as a user would, with the tiny training of
tests/test_sweep.py; the checks run before Ray (or any trial) starts unless the case needs a cluster
to say what it lacks. A subprocess also keeps each case's environment (AWS variables, RAY_ADDRESS,
MLFLOW_TRACKING_URI) away from the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_sweep import as_mapping

pytestmark = pytest.mark.integration  # command lines in subprocesses, tiny trainings

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "embedded" / "cutmix_seg_s4mc.yaml"
TINY = ["train.steps=2", "train.eval_every=2", "train.log_every=1", "data.embedded.num_train=64",
        "data.embedded.num_val=4", "data.embedded.image_size=32", "data.crop_size=32", "model.width=0.25",
        "model.pretrained=null", "train.sup_only_steps=0", "train.threads=1"]
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "S4MC_DEBUG"))}
NO_AWS_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
                "AWS_EC2_METADATA_DISABLED": "true"}
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret", **NO_AWS_FILES}


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**CLEAN_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, *named: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "error" in ln.lower()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def _train(run_dir: str | Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return _run(["-m", "orchestration.train_cli", "train", "--config", str(BASE), *TINY, f"run.dir={run_dir}",
                 *extra], **kw)


def _manifest(tmp_path: Path, **keys) -> Path:
    doc = {"name": "bad", "base": str(BASE), "project": str(tmp_path), "overrides": as_mapping(TINY), "num_trials": 1,
           "max_concurrent": 1,
           "storage": str(tmp_path / "store"), "work_dir": str(tmp_path / "work"),
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
           "ray": {"temp_dir": f"/tmp/ray-s4mc-{os.getpid()}e"}, **keys}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sweep(path: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return _run(["-m", "orchestration.cli", "run", "--manifest", str(path), *overrides], **kw)


# -- s4mc train ----------------------------------------------------------------------------------------
def test_run_dir_under_an_existing_file(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    _one_line(_train(tmp_path / "a_file" / "run"), "run.dir=", "choose a writable folder")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_run_dir_not_writable(tmp_path):
    _one_line(_train("/proc/s4mc-no-such-run"), "run.dir='/proc/s4mc-no-such-run'", "cannot write there")


def test_resuming_a_checkpoint_of_another_model(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir).returncode == 0
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    _one_line(_train(run_dir, "model.head_channels=16"), f"checkpoint {run_dir}/checkpoints/last.pt",
              "another model")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before  # nothing already done is lost


# -- s4mc-sweep run, before Ray starts -------------------------------------------------------------------
def test_sweep_storage_not_writable(tmp_path):
    _one_line(_sweep(_manifest(tmp_path, storage="/proc/s4mc-no-such-store")), "storage:", "/proc/s4mc-no-such-store")


def test_s3_data_root_without_credentials(tmp_path):
    proc = _sweep(_manifest(tmp_path), "overrides.data.root=s3://data/embedded",
                  env=NO_AWS_FILES, timeout=60)
    _one_line(proc, "data.root='s3://data/embedded'", "no AWS credentials")


def test_s3_data_root_without_endpoint(tmp_path):
    proc = _sweep(_manifest(tmp_path), "overrides.data.root=s3://data/embedded",
                  env=FAKE_KEYS, timeout=90)
    _one_line(proc, "data.root='s3://data/embedded'")


def test_s3_sweep_storage_without_endpoint(tmp_path):
    proc = _sweep(_manifest(tmp_path, storage="s3://sweeps/bad"), env=FAKE_KEYS, timeout=90)
    _one_line(proc, "storage='s3://sweeps/bad'")


def test_unreachable_ray_address(tmp_path):
    proc = _sweep(_manifest(tmp_path), env={"RAY_ADDRESS": "127.0.0.1:9"}, timeout=60)
    _one_line(proc, "env RAY_ADDRESS='127.0.0.1:9'", "does not answer")


def test_unreachable_tracking_server(tmp_path):
    proc = _sweep(_manifest(tmp_path), env={"MLFLOW_TRACKING_URI": "http://user:hunter2@127.0.0.1:9"}, timeout=60)
    _one_line(proc, "env MLFLOW_TRACKING_URI=", "127.0.0.1:9", "does not answer")
    assert "hunter2" not in proc.stderr + proc.stdout


@pytest.mark.services
def test_gpu_trial_on_a_cluster_without_gpu(tmp_path):
    proc = _sweep(_manifest(tmp_path, resources_per_trial={"cpu": 1, "gpu": 1}), timeout=180)
    _one_line(proc, "resources_per_trial.gpu=1", "GPU")
