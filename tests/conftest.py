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
# 1. Environment hygiene (platform-notes.md: telemetry, Ray usage stats, EC2 metadata probing)
# =====================================================================================================
os.environ.update({
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
})
# A proxy from the developer's environment must never see requests to our loopback services.
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))


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
    the 2-core machines; platform-notes.md says ~1.5 s idle), so stores start as copies of this one."""
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
