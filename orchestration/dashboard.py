"""`make dashboard`: optuna-dashboard over a sweep's Optuna study storage, bound to 127.0.0.1.

The storage is the manifest's `optuna_storage` (default sqlite:///<project>/sweeps/<name>/optuna.db,
orchestration/manifest.py), the same study the sweep's searcher writes, so the dashboard shows a
running sweep live (history, intermediate values, parallel coordinates, importances per trial state).
Loopback only: the dashboard has no authentication, and a study holds the project's configurations.
`python -m orchestration.dashboard --manifest M [--port 8080]` runs it in the foreground (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from s4mc.config import ConfigError

HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # optuna-dashboard's own default port


def dashboard_command(manifest_path: str, port: int = DEFAULT_PORT, overrides: tuple[str, ...] = ()) -> list[str]:
    """The optuna-dashboard command line for the manifest's study storage; ConfigError when it is unusable."""
    from orchestration.manifest import load_manifest

    m = load_manifest(manifest_path, list(overrides))
    storage = m.optuna_storage
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        raise ConfigError(f"optuna_storage {storage} does not exist yet: run the sweep first (make sweep "
                          f"MANIFEST={manifest_path})")
    if not 0 < port < 65536:
        raise ConfigError(f"--port={port} is not a TCP port (1-65535)")
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if exe is None:
        raise ConfigError("optuna-dashboard is not installed: make setup (requirements.lock pins it)")
    return [exe, "--host", HOST, "--port", str(port), storage]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.dashboard", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="sweep manifest YAML")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    p.add_argument("overrides", nargs="*", help="manifest overrides key=value")
    args = p.parse_args(argv)
    try:
        cmd = dashboard_command(args.manifest, args.port, tuple(args.overrides))
    except ConfigError as exc:
        print(f"dashboard: error: {exc}", file=sys.stderr)
        return 2
    print(f"optuna-dashboard on http://{HOST}:{args.port} over {cmd[-1]}", flush=True)
    os.execv(cmd[0], cmd)  # the dashboard replaces this process: Ctrl-C and signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
