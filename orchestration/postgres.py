"""A throw-away PostgreSQL server on loopback: the database behind MLflow and the Optuna study in tests.

On a cluster, MLflow's backend store and the Optuna study live in one PostgreSQL server (docker/
compose.yaml runs the official image). The services test tier runs the same stack on 127.0.0.1 with
Debian's server binaries (package postgresql; .ci/run installs it when missing): `start_postgres`
runs initdb in a fresh temporary directory, starts `postgres` listening on 127.0.0.1 only (no Unix
socket, so nothing outside the data directory is touched), creates one role with a password
(scram-sha-256) and the databases asked for, and stops the server and removes the directory on exit.
PostgreSQL refuses to run as root, so under root the server runs as the `postgres` (or `nobody`)
account and the directory is made theirs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestration.services import LOOPBACK, STOP_GRACE_S, Service, free_port

# docs/cluster.md: initdb + start + CREATE DATABASE took 1.6 s here; generous for a loaded CI runner.
START_TIMEOUT_S = 60.0
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout for its server packages
SERVICE_ACCOUNTS = ("postgres", "nobody")  # who runs the server when we are root


class PostgresError(RuntimeError):
    """The server cannot be found or started; the message says which binary or step failed."""


def pg_bin_dir() -> Path:
    """The directory holding initdb and postgres: PG_BIN, Debian's newest version, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")] + sorted(glob.glob(PG_BIN_GLOB), reverse=True)
    which = shutil.which("initdb")
    candidates += [str(Path(which).parent)] if which else []
    for cand in filter(None, candidates):
        if (Path(cand) / "initdb").is_file() and (Path(cand) / "postgres").is_file():
            return Path(cand)
    raise PostgresError(f"no PostgreSQL server binaries (initdb, postgres) in PG_BIN, {PG_BIN_GLOB} or PATH; "
                        "install Debian's package: apt-get install postgresql")


@dataclass
class Postgres:
    """A running server: `.url(db)` gives a SQLAlchemy URL without the password (libpq reads PGPASSWORD)."""

    service: Service
    host: str
    port: int
    user: str
    password: str
    data_dir: Path

    def url(self, database: str, driver: str = "postgresql+psycopg2", with_password: bool = False) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"{driver}://{auth}@{self.host}:{self.port}/{database}"


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    for name in SERVICE_ACCOUNTS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise PostgresError("running as root and no 'postgres' or 'nobody' account exists to run the server")


def _popen_kwargs(ids: tuple[int, int] | None) -> dict:
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _initdb(bin_dir: Path, data: Path, user: str, password: str, ids: tuple[int, int] | None) -> None:
    pwfile = data.parent / "pwfile"
    pwfile.write_text(password + "\n")
    if ids:
        os.chown(data.parent, *ids)
        os.chown(pwfile, *ids)
    cmd = [str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--pwfile", str(pwfile), "--auth=scram-sha-256",
           "--encoding=UTF8", "--locale=C.UTF-8" if _has_c_utf8() else "--no-locale"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
                          **_popen_kwargs(ids))
    pwfile.unlink()
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PostgresError(f"initdb -D {data} failed with code {done.returncode}: {last}")


def _has_c_utf8() -> bool:
    return Path("/usr/lib/locale/C.utf8").exists() or Path("/usr/lib/locale/C.UTF-8").exists()


def _create_databases(pg: Postgres, databases: tuple[str, ...]) -> None:
    import psycopg2

    conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for name in databases:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def start_postgres(databases: tuple[str, ...] = ("mlflow", "optuna"), user: str = "s4mc", port: int = 0,
                   host: str = LOOPBACK, timeout: float = START_TIMEOUT_S) -> Postgres:
    """initdb + postgres on host:port in a new temporary directory, with `databases` created."""
    bin_dir = pg_bin_dir()
    ids = _run_as()
    root = Path(tempfile.mkdtemp(prefix="s4mc-pg-"))
    data = root / "data"
    password = secrets.token_urlsafe(18)
    port = port or free_port(host)
    try:
        _initdb(bin_dir, data, user, password, ids)
        log = root / "postgres.log"
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
        if ids:
            os.fchown(log_fd, *ids)
        # -k '': no Unix socket; -h: TCP on loopback only. fsync off: a test database need not survive a
        # power cut, and it makes MLflow's migrations several times faster on slow disks.
        argv = [str(bin_dir / "postgres"), "-D", str(data), "-h", host, "-p", str(port), "-k", "",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        proc = subprocess.Popen(argv, stdout=log_fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **_popen_kwargs(ids))
        os.close(log_fd)
        pg = Postgres(Service("postgres", proc, f"postgresql://{host}:{port}", log), host, port, user, password,
                      data)
        _wait(pg, timeout)
        _create_databases(pg, databases)
        return pg
    except BaseException:
        with contextlib.suppress(NameError):
            pg.service.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


def _wait(pg: Postgres, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pg.service.alive:
            raise PostgresError(f"postgres exited with code {pg.service.proc.returncode}; log "
                                f"{pg.service.log_path}:\n{pg.service.log_tail()}")
        if _accepts(pg.host, pg.port):
            return
        time.sleep(0.2)
    raise PostgresError(f"postgres did not accept connections on {pg.host}:{pg.port} within {timeout:.0f} s")


def stop_postgres(pg: Postgres) -> None:
    """SIGINT is PostgreSQL's "fast" shutdown (SIGTERM, "smart", would wait for every client to leave);
    Service.stop then makes sure the whole process group is gone."""
    if pg.service.alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pg.service.proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            pg.service.proc.wait(timeout=STOP_GRACE_S)
    pg.service.stop()
    shutil.rmtree(pg.data_dir.parent, ignore_errors=True)


@contextlib.contextmanager
def postgres(databases: tuple[str, ...] = ("mlflow", "optuna"), **kwargs) -> Iterator[Postgres]:
    pg = start_postgres(databases, **kwargs)
    try:
        yield pg
    finally:
        stop_postgres(pg)
