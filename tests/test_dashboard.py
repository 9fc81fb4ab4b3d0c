"""orchestration/dashboard.py: the optuna-dashboard command of a sweep manifest, and a real dashboard served on
loopback over a small study (its REST API lists the study)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import optuna
import pytest

from orchestration.dashboard import HOST, dashboard_command
from s4mc.config import ConfigError

MANIFEST = "experiments/sweeps/embedded_default.yaml"


def _study(tmp_path) -> str:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="dash", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("s4mc.alpha0", 0.2, 0.6), n_trials=3)
    return storage


def test_command_binds_loopback_on_the_manifest_storage(tmp_path):
    storage = _study(tmp_path)
    cmd = dashboard_command(MANIFEST, 8123, (f"optuna_storage={storage}",))
    assert cmd[0].endswith("optuna-dashboard") and cmd[1:] == ["--host", "127.0.0.1", "--port", "8123", storage]
    with pytest.raises(ConfigError, match="does not exist yet: run the sweep first"):
        dashboard_command(MANIFEST, 8123, (f"optuna_storage=sqlite:///{tmp_path / 'none.db'}",))
    with pytest.raises(ConfigError, match="--port=0 is not a TCP port"):
        dashboard_command(MANIFEST, 0, (f"optuna_storage={storage}",))


@pytest.mark.services
def test_dashboard_serves_the_study_on_loopback(tmp_path):
    from orchestration.services import free_port

    port = free_port()
    cmd = dashboard_command(MANIFEST, port, (f"optuna_storage={_study(tmp_path)}",))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/api/studies", timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # gunicorn's master can sit on SIGTERM for seconds
        proc.wait(10)
