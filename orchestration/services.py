"""Real local services on loopback: an MLflow tracking server and a moto S3 server.

Tests and `make ui` need the same processes the project uses in production, started lean and torn
down reliably. Each service runs in its own process group (MLflow's server forks uvicorn workers), is
polled over HTTP until it answers, and is stopped by signalling the whole group; the handles are
context managers. Everything binds to 127.0.0.1 unless told otherwise, and telemetry is off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
# measured on the project's 2-core machines: ~4 s warm, ~12 s when the first start runs the SQLite
# migrations; generous so a loaded CI machine does not flake.
MLFLOW_START_TIMEOUT_S = 120.0
MOTO_START_TIMEOUT_S = 30.0  # platform-notes.md: up in under a second
STOP_GRACE_S = 10.0
# platform-notes.md (MLflow 3.17): telemetry is on unless both are set; the job runner spawns extra
# processes that a tracking server for training does not need.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# urllib would send loopback requests through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS considers free right now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Service:
    """A started server process group: `.url`, `.stop()`, usable as a context manager."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str, log_path: Path):
        self.name, self.proc, self.url, self.log_path = name, proc, url, log_path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if not self.alive:
            return
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # uvicorn workers may outlive the parent by a moment; make sure the group is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.name} {self.url} pid={self.proc.pid} {'alive' if self.alive else 'stopped'}>"


def _http_ok(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _launch(name: str, argv: list[str], url: str, probe: str, timeout: float,
            env: dict[str, str] | None, cwd: str | Path | None = None) -> Service:
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    log_fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log_file:
        # start_new_session: own process group, so stop() reaches the forked workers too.
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, cwd=cwd, start_new_session=True)
    service = Service(name, proc, url, Path(log_name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before answering {probe}; "
                               f"log {log_name}:\n{service.log_tail()}")
        if _http_ok(probe):
            return service
        time.sleep(0.25)
    service.stop()
    raise RuntimeError(f"{name} did not answer {probe} within {timeout:.0f} s; log {log_name}:\n"
                       f"{service.log_tail()}")


def _default_artifacts(backend_uri: str) -> str | None:
    # Beside a SQLite file, as tracking.configure lays out <project>/mlruns/{mlflow.db,artifacts}.
    if backend_uri.startswith("sqlite:///"):
        return str(Path(backend_uri[len("sqlite:///"):]).parent / "artifacts")
    return None


def mlflow_server_argv(backend_uri: str, artifacts_destination: str | None, host: str, port: int,
                       workers: int = 1) -> list[str]:
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--host", host, "--port", str(port), "--workers", str(workers)]
    artifacts = artifacts_destination or _default_artifacts(backend_uri)
    if artifacts:
        # Proxied artifacts (platform-notes.md): clients and Ray workers need no S3 credentials.
        argv += ["--artifacts-destination", artifacts]
    return argv


def start_mlflow_server(backend_uri: str, artifacts_destination: str | None = None, host: str = LOOPBACK,
                        port: int = 0, workers: int = 1, env: dict[str, str] | None = None,
                        timeout: float = MLFLOW_START_TIMEOUT_S) -> Service:
    """A lean `mlflow server` (platform-notes.md: --workers 1, no job runner: ~4 s, ~0.5 GB).

    backend_uri: e.g. sqlite:////abs/mlflow.db. artifacts_destination: a local directory or
    s3://bucket/prefix that the server proxies (it then needs S3 credentials and, for an S3-compatible
    store, MLFLOW_S3_ENDPOINT_URL in `env` or the environment). port 0 picks a free port.
    """
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    argv = mlflow_server_argv(backend_uri, artifacts_destination, host, port, workers)
    return _launch("mlflow-server", argv, url, url + "/health", timeout, env)


def start_moto_server(port: int = 0, host: str = LOOPBACK, env: dict[str, str] | None = None,
                      timeout: float = MOTO_START_TIMEOUT_S) -> Service:
    """moto's S3 HTTP API (platform-notes.md: a real S3 endpoint for boto3, any credentials work)."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    return _launch("moto-server", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                   url, url + "/", timeout, env)


def serve_ui(backend_uri: str, artifacts: str | None = None, port: int = 5000) -> int:
    """Serves the MLflow UI over a store on 127.0.0.1:port until Ctrl-C (`make ui`); returns the exit code.

    Bound to loopback only: the UI has no authentication. Reach it remotely through an SSH tunnel.
    """
    argv = mlflow_server_argv(backend_uri, artifacts, LOOPBACK, port)
    proc = subprocess.Popen(argv, env={**os.environ, **QUIET_ENV}, start_new_session=True)
    print(f"MLflow UI on http://{LOOPBACK}:{port} (store {backend_uri}); Ctrl-C stops it", flush=True)
    service = Service("mlflow-ui", proc, f"http://{LOOPBACK}:{port}", Path(os.devnull))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        service.stop()
