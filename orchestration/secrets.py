"""Credentials reach the code through the environment only, never params, tags, logs, files or Ray.

A sweep writes its manifest, summary and results into the sweep folder and into MLflow, prints to the
console and ships configuration to Ray workers. A password embedded in a URI (`http://user:PW@host`
for an MLflow server behind basic auth, `postgresql://user:PW@host/db` for the Optuna study) would ride
along into all of them. `secure_environment` and `secure_manifest` therefore take the password out of
such URIs as soon as they are read and hand it to the client library through its own environment
variable (MLflow: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; libpq: PGPASSWORD), so every
later copy of the URI is clean by construction. `scrub` is the second line of defence for free text
(console lines). `keep_credentials_out_of_ray` stops Ray Tune from copying the driver's AWS keys
into every trial actor's runtime environment (Ray logs runtime environments in clear under its temp
dir); workers use their own credential chain (instance role, web identity, their node's env).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from s4mc.config import ConfigError

MASK = "***"
# Environment variables whose values are secrets wherever they appear.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "RAY_AUTH_TOKEN")
# Ray Tune's class_cache.ENV_VARS_TO_PROPAGATE (ray 2.60) copies these from the driver into each
# trainable's runtime_env, which runtime_env_agent.log then prints.
RAY_PROPAGATED_AWS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
# Short values (e.g. "1") would mask unrelated text; real keys and passwords are longer.
MIN_SECRET_LEN = 4
_USERINFO = re.compile(r"(?<=://)([^/@\s:]*)(:[^/@\s]*)?@")


class SecretError(ConfigError):
    """A credential is given in two places that disagree."""


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """`scheme://user:pw@host/x` -> ("scheme://user@host/x" or without user, user, pw); others unchanged."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if sep else None


def _export(name: str, value: str, where: str) -> None:
    current = os.environ.get(name)
    if current is not None and current != value:
        raise SecretError(f"{where} carries a credential that differs from the environment's {name}; "
                          f"give it in one place only (the environment)")
    os.environ[name] = value


def secure_uri(uri: str | None, where: str) -> str | None:
    """Moves a password out of `uri` into the environment variable its client reads; returns the clean URI."""
    if not uri or "://" not in uri:
        return uri
    clean, user, password = split_userinfo(uri)
    if user is None and password is None:
        return uri
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        # MLflow's REST client sends basic auth from these (mlflow.environment_variables).
        if user:
            _export("MLFLOW_TRACKING_USERNAME", user, where)
        if password is not None:
            _export("MLFLOW_TRACKING_PASSWORD", password, where)
        return clean
    if scheme.startswith("postgres"):
        # libpq falls back to PGPASSWORD when the connection string has none; the user name is not secret.
        if password is not None:
            _export("PGPASSWORD", password, where)
        host = urlsplit(clean)
        return urlunsplit(host._replace(netloc=f"{user}@{host.netloc}")) if user else clean
    if password is not None:
        raise SecretError(f"{where} carries a password inside the URI ({scheme}://...); pass it through the "
                          "client's environment variable or credentials file instead")
    return uri


def secure_environment() -> None:
    """MLFLOW_TRACKING_URI with user:password@ -> clean URI + MLFLOW_TRACKING_USERNAME/PASSWORD."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = secure_uri(uri, "env MLFLOW_TRACKING_URI")


def secure_manifest(m: Any) -> Any:
    """Cleans a loaded sweep manifest (or paper table) in place: tracking.uri and optuna_storage."""
    tracking = getattr(m, "tracking", None)
    if tracking is not None and getattr(tracking, "uri", None):
        tracking.uri = secure_uri(tracking.uri, "tracking.uri")
    if getattr(m, "optuna_storage", None):
        m.optuna_storage = secure_uri(m.optuna_storage, "optuna_storage")
    return m


def secret_values() -> list[str]:
    """The secret values currently in the environment, longest first (so no prefix is masked first)."""
    values = {os.environ[name] for name in SECRET_ENV if len(os.environ.get(name, "")) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def scrub(text: str) -> str:
    """Masks user:password@ in URIs and every secret value from the environment."""
    text = _USERINFO.sub(lambda mt: f"{mt.group(1)}:{MASK}@" if mt.group(2) else mt.group(0), text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def scrubbed(echo: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a print-like function so that what it prints is scrubbed."""
    def _echo(*args: Any, **kwargs: Any) -> Any:
        return echo(*(scrub(str(a)) for a in args), **kwargs)
    return _echo


def keep_credentials_out_of_ray() -> None:
    """Stops Ray Tune from copying AWS keys into trial runtime environments (and so into Ray's logs).

    Ray 2.60 has no setting for this: the set lives in ray.tune.execution.class_cache and is read each
    time a trainable class is registered, so it is narrowed here, before any Tuner exists.
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # no Ray: nothing to protect
        return
    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - RAY_PROPAGATED_AWS
