"""Shared pytest fixtures, in separate sections per area.

1. Environment hygiene, applied at import time before any test imports mlflow, ray or boto3: no
   telemetry, no usage reports, no instance-metadata probing, loopback never proxied.
2. Object storage and MLflow (orchestration/storage.py, tracking.py, services.py): real moto and
   `mlflow server` processes on 127.0.0.1, each started once per session.
3. Ray / Optuna fixtures (orchestration/sweep.py, search.py, trial.py).
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

# =====================================================================================================
# 1. Environment hygiene (docs/platform.md: telemetry, Ray usage stats, EC2 metadata probing)
# =====================================================================================================
os.environ.update({
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
})
# A proxy from the developer's environment must never see requests to our loopback services.
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))


@pytest.fixture(autouse=True)
def _tracking_uri_stays_per_test():
    """orchestration.tracking.configure sets MLFLOW_TRACKING_URI process-wide (for child processes), and
    a manifest takes that variable over its own tracking.uri: without this, one test's (stopped) server
    or store would become the next test's."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# =====================================================================================================
# 2. Object storage (moto) and MLflow tracking servers
# =====================================================================================================
# Fake, recognisable credentials: moto accepts any, and tests assert these strings never reach logs.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIAS4MCTESTONLY0001", "AWS_SECRET_ACCESS_KEY": "s4mc-fake-secret-never-log-me"}
MLFLOW_ARTIFACTS_BUCKET = "mlflow-artifacts"
MLFLOW_ARTIFACTS_PREFIX = "proxied"


@pytest.fixture(scope="session")
def moto_server():
    """A real moto S3 HTTP server on loopback (handle with .url)."""
    pytest.importorskip("moto")
    from orchestration.services import start_moto_server

    with start_moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def aws_env(moto_server):
    """Points the standard AWS chain at moto with fake credentials for the rest of the session.

    Only the environment carries them (S3Storage takes none as arguments). A developer's own profile,
    session token and shared files are hidden, so no test can ever reach a real account.
    """
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        mp.delenv(name, raising=False)
    env = {**FAKE_AWS, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/s4mc-tests/credentials",
           "AWS_CONFIG_FILE": "/nonexistent/s4mc-tests/config",
           "AWS_ENDPOINT_URL_S3": moto_server.url, "AWS_ENDPOINT_URL": moto_server.url,
           "MLFLOW_S3_ENDPOINT_URL": moto_server.url}
    for name, value in env.items():
        mp.setenv(name, value)
    yield env
    mp.undo()


@pytest.fixture(scope="session")
def s3(aws_env):
    """An S3Storage bound to moto through the environment (AWS_ENDPOINT_URL_S3)."""
    from orchestration.storage import S3Storage

    return S3Storage()


@pytest.fixture
def s3_bucket(s3):
    """A fresh, empty bucket per test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty, fully migrated MLflow SQLite file. Migrating a fresh store takes 2-8 s (measured on
    the 2-core machines; docs/platform.md says ~1.5 s idle), so stores start as copies of this one."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # runs the migrations
    return path


def _copy_mlflow_db(template, dest) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


@pytest.fixture(scope="session")
def mlflow_db_copy(mlflow_db_template):
    """`mlflow_db_copy(path) -> sqlite:/// URI`: puts a migrated, empty MLflow store at path."""
    return lambda dest: _copy_mlflow_db(mlflow_db_template, dest)


@pytest.fixture(scope="session")
def mlflow_server(aws_env, s3, mlflow_db_template, tmp_path_factory):
    """A lean `mlflow server` (SQLite backend) proxying artifacts to s3://mlflow-artifacts/proxied on moto.

    Attributes besides .url: .artifacts_bucket, .artifacts_prefix, .backend_uri.
    """
    from orchestration.services import start_mlflow_server

    s3.client.create_bucket(Bucket=MLFLOW_ARTIFACTS_BUCKET)
    backend = _copy_mlflow_db(mlflow_db_template, tmp_path_factory.mktemp("mlflow-server") / "mlflow.db")
    with start_mlflow_server(backend, f"s3://{MLFLOW_ARTIFACTS_BUCKET}/{MLFLOW_ARTIFACTS_PREFIX}",
                             env={"MLFLOW_S3_ENDPOINT_URL": aws_env["MLFLOW_S3_ENDPOINT_URL"]}) as server:
        server.artifacts_bucket, server.artifacts_prefix = MLFLOW_ARTIFACTS_BUCKET, MLFLOW_ARTIFACTS_PREFIX
        server.backend_uri = backend
        yield server


@pytest.fixture
def sqlite_tracking_uri(tmp_path, mlflow_db_copy):
    """A fresh local SQLite tracking store laid out like `tracking.configure` (absolute paths)."""
    (tmp_path / "mlruns" / "artifacts").mkdir(parents=True)
    return mlflow_db_copy(tmp_path / "mlruns" / "mlflow.db")


# =====================================================================================================
# 3. Ray / Optuna
# =====================================================================================================
# Owned by the sweep machinery (tests/test_sweep.py). Ray costs 2-3 s and ~1 GB per start
# (docs/platform.md), so one two-node loopback cluster serves every sweep test of the session.
RAY_HEAD_IP, RAY_WORKER_IP = "127.0.0.2", "127.0.0.3"  # loopback aliases Ray leaves alone (docs/platform.md)
# Short temp dirs: Ray's socket paths must stay under 107 bytes (pytest's tmp_path is too long). The pid
# keeps concurrent test sessions on one machine apart (cleanup kills by temp dir).
RAY_TEMP_DIRS = {"head": f"/tmp/ray-s4mc-{os.getpid()}h", "worker": f"/tmp/ray-s4mc-{os.getpid()}w"}
RAY_OBJECT_STORE_BYTES = 100 * 2**20  # tiny sweeps move only small checkpoints through Ray
RAY_ENV = {"RAY_AUTH_MODE": "disabled",  # docs/platform.md: token auth breaks `ray start --address`
           "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_pids(markers) -> list[int]:
    """Ray processes started from our temp dirs (their command lines name them) and their children;
    never this process or its ancestors (a command line that merely mentions a temp dir)."""
    own, children, parents = set(), {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        parents[int(entry)] = ppid
        if any(m in cmd for m in markers):
            own.add(int(entry))
    pid = os.getpid()
    while pid > 1:  # spare ourselves and our ancestors
        own.discard(pid)
        pid = parents.get(pid, 1)
    todo = list(own)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in own:
                own.add(child)
                todo.append(child)
    return sorted(own)


def stop_ray_processes(temp_dirs, grace_s: float = 5.0) -> None:
    """`ray stop` for our temp dirs only: `ray stop` itself would end every Ray on the machine."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ray_pids(list(temp_dirs))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline and _ray_pids(list(temp_dirs)):
            time.sleep(0.2)
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(aws_env):
    """A real two-node Ray cluster on loopback (head 127.0.0.2, worker 127.0.0.3, 1 CPU each), with
    this test process connected as its driver. Yields the head's address (host:port). Its nodes start
    with `aws_env` (moto endpoint, fake credentials), as cluster nodes carry their own S3 access."""
    import subprocess
    import sys
    from pathlib import Path

    from orchestration.services import free_port

    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **RAY_ENV}
    os.environ.update(RAY_ENV)
    port = free_port(RAY_HEAD_IP)
    address = f"{RAY_HEAD_IP}:{port}"
    common = ["--num-cpus=1", f"--object-store-memory={RAY_OBJECT_STORE_BYTES}", "--disable-usage-stats"]

    def ports(*names):  # Ray's fixed defaults (8265, 52365, ...) collide with other sessions' clusters
        return [f"--{name}={free_port()}" for name in names]
    try:
        for argv in ([ray_cli, "start", "--head", f"--node-ip-address={RAY_HEAD_IP}", f"--port={port}",
                      f"--temp-dir={RAY_TEMP_DIRS['head']}", "--include-dashboard=false", *common,
                      *ports("dashboard-port", "dashboard-agent-listen-port",
                             "metrics-export-port")],
                     [ray_cli, "start", f"--address={address}", f"--node-ip-address={RAY_WORKER_IP}",
                      f"--temp-dir={RAY_TEMP_DIRS['worker']}", *common,
                      *ports("dashboard-agent-listen-port", "metrics-export-port")]):
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[1:3])} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        import ray

        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            stop_ray_processes(RAY_TEMP_DIRS.values())
