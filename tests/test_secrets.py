"""orchestration/secrets.py: passwords leave URIs for the environment, text is scrubbed, and Ray Tune
no longer copies AWS keys into trial runtime environments (the services-tier proof is
tests/test_cluster_stack.py, which greps every output of a real sweep)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestration import secrets
from orchestration.secrets import SecretError, scrub, secure_manifest, secure_uri, split_userinfo


@pytest.fixture
def clean_env(monkeypatch):
    # setenv first: monkeypatch then restores each variable (to absent) even though secure_uri sets it
    # through os.environ directly.
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    return monkeypatch


def test_split_userinfo():
    assert split_userinfo("http://u:p%40ss@host:5000/x") == ("http://host:5000/x", "u", "p@ss")
    assert split_userinfo("http://host:5000") == ("http://host:5000", None, None)
    assert split_userinfo("sqlite:////tmp/a.db") == ("sqlite:////tmp/a.db", None, None)


def test_tracking_password_moves_to_mlflow_variables(clean_env):
    import os

    assert secure_uri("https://alice:s3cr3t-pw@mlflow.example:443", "tracking.uri") == "https://mlflow.example:443"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t-pw"


def test_postgres_password_moves_to_pgpassword_and_keeps_the_user(clean_env):
    import os

    url = secure_uri("postgresql+psycopg2://optuna:db-pw-123@10.0.0.5:5432/optuna", "optuna_storage")
    assert url == "postgresql+psycopg2://optuna@10.0.0.5:5432/optuna" and os.environ["PGPASSWORD"] == "db-pw-123"


def test_conflicting_credentials_are_one_line_errors(clean_env):
    clean_env.setenv("PGPASSWORD", "other")
    with pytest.raises(SecretError, match="optuna_storage carries a credential that differs from .*PGPASSWORD"):
        secure_uri("postgresql://u:pw-here@h/db", "optuna_storage")
    with pytest.raises(SecretError, match="tracking.uri carries a password inside the URI"):
        secure_uri("mysql://u:pw-here@h/db", "tracking.uri")


def test_secure_manifest_and_environment(clean_env):
    from types import SimpleNamespace

    m = SimpleNamespace(tracking=SimpleNamespace(uri="http://bob:pw-1234@h:5000"),
                        optuna_storage="sqlite:////tmp/o.db")
    secure_manifest(m)
    assert m.tracking.uri == "http://h:5000" and m.optuna_storage == "sqlite:////tmp/o.db"
    clean_env.delenv("MLFLOW_TRACKING_USERNAME")
    clean_env.delenv("MLFLOW_TRACKING_PASSWORD")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://bob:pw-1234@h:5000")
    secrets.secure_environment()
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == "http://h:5000"


def test_scrub_masks_userinfo_and_environment_secrets(clean_env):
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    text = scrub("uri http://u:pw-xyz@h:1/ key very-secret-value, plain http://h:2 and user@h")
    assert "pw-xyz" not in text and "very-secret-value" not in text and "http://h:2" in text
    assert "u:***@h:1" in text


def test_ray_tune_no_longer_propagates_aws_keys(clean_env):
    ray_cc = pytest.importorskip("ray.tune.execution.class_cache")
    # Ray 2.60's default propagates the keys (the leak). Asked in a fresh process: in this one an earlier
    # test's sweep may already have narrowed the set (init_ray does).
    default = subprocess.run([sys.executable, "-c", "from ray.tune.execution import class_cache as c; "
                              "print('AWS_SECRET_ACCESS_KEY' in c.ENV_VARS_TO_PROPAGATE)"],
                             capture_output=True, text=True, timeout=120)
    assert default.stdout.strip() == "True", default.stderr[-1000:]
    clean_env.setattr(ray_cc, "ENV_VARS_TO_PROPAGATE", set(ray_cc.ENV_VARS_TO_PROPAGATE) | secrets.RAY_PROPAGATED_AWS)
    clean_env.setenv("AWS_ACCESS_KEY_ID", "AKIAPROPAGATE0001")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "propagated-secret")

    secrets.keep_credentials_out_of_ray()

    class Trainable:
        pass

    remote = ray_cc._ActorClassCache().get(Trainable)
    env_vars = remote._default_options["runtime_env"]["env_vars"]
    assert not set(env_vars) & secrets.RAY_PROPAGATED_AWS, env_vars
