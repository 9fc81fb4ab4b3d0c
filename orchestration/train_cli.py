"""The installed `s4mc` command: `s4mc.cli` plus s3:// resolution for data roots and weights, and
`s4mc data upload|download` (orchestration/data_cli.py) to move a data set into S3 with checksums.

s4mc/ stays free of boto3; this wrapper hands it a resolver that syncs object-store URIs into a
worker-local cache (checksummed) before training starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from s4mc.cli import main as s4mc_main


def _resolve(uri: str) -> str:
    from orchestration.storage import resolve_local

    cache = Path(os.environ.get("S4MC_CACHE", Path.home() / ".cache" / "s4mc"))
    return str(resolve_local(uri, cache))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:  # object storage: lives here, not in s4mc/ (no boto3 there)
        from orchestration.data_cli import main as data_main

        return data_main(argv[1:])
    return s4mc_main(argv, resolve=_resolve)


if __name__ == "__main__":
    sys.exit(main())
