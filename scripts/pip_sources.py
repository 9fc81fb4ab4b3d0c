"""Where `make setup` takes torch from; prints the extra pip arguments, one per line.

The CPU build of torch (`torch==X+cpu`, constraints-cpu.txt) is published on the PyTorch CPU wheel
index (PYTORCH_INDEX below), not on PyPI, whose Linux torch wheels are CUDA builds of several GB. So a
user's machine needs `--extra-index-url` to that index. A machine whose own pip sources (find-links
folders, file:// indexes from pip's config or PIP_* variables) already hold the pinned build gets no
extra index, so the install stays offline there and pip never waits on an unreachable host.
`TORCH_INDEX` overrides the choice: a URL (e.g. a CUDA index or a mirror), or `none`.
Standard library only: it runs before the project's packages exist. Used by the Makefile's setup
target; tests/test_install.py checks both cases.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

# docs/install.md: the PyTorch project's CPU-only wheel index (pip's --index-url / --extra-index-url).
PYTORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu"}
SOURCE_KEYS = ("find-links", "index-url", "extra-index-url")


def pinned_torch(constraints: Path) -> str:
    """The exact version pinned in a constraints file (`torch==2.13.0+cpu` -> '2.13.0+cpu')."""
    for line in constraints.read_text().splitlines():
        m = re.match(r"^\s*torch\s*==\s*([^\s;#]+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"error: {constraints} pins no torch version (expected a line torch==X)")


def pip_sources(python: str = sys.executable) -> list[str]:
    """find-links / index URLs from `pip config list` (files and PIP_* variables), as pip sees them."""
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    values = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] in SOURCE_KEYS:
            values += value.strip().strip("'\"").split()
    for key in SOURCE_KEYS:  # pip config list shows PIP_* variables too; read them directly as well
        values += os.environ.get("PIP_" + key.upper().replace("-", "_"), "").split()
    return list(dict.fromkeys(values))


def _local_dir(source: str) -> Path | None:
    if source.startswith("file://"):
        return Path(unquote(urlsplit(source).path))
    if "://" not in source:
        return Path(source)
    return None  # a remote source: we cannot look without the network


def has_local_wheel(version: str, sources: list[str]) -> bool:
    """Whether a local find-links folder or file:// index holds a torch wheel of exactly `version`."""
    pattern = f"torch-{version}-*.whl"
    for source in sources:
        folder = _local_dir(source)
        if folder is None or not folder.is_dir():
            continue
        if any(folder.glob(pattern)) or any((folder / "torch").glob(pattern)):
            return True
    return False


def extra_args(torch: str, constraints: Path, sources: list[str], override: str | None = None) -> list[str]:
    if override:
        return [] if override.lower() == "none" else ["--extra-index-url", override]
    index = PYTORCH_INDEX.get(torch)
    if index is None or has_local_wheel(pinned_torch(constraints), sources):
        return []
    return ["--extra-index-url", index]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("torch", choices=["cpu", "cuda"])
    p.add_argument("--constraints", type=Path, default=None)
    args = p.parse_args(argv)
    constraints = args.constraints or Path(__file__).resolve().parents[1] / f"constraints-{args.torch}.txt"
    for arg in extra_args(args.torch, constraints, pip_sources(), os.environ.get("TORCH_INDEX")):
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
