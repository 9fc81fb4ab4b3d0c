"""The Ray cluster launcher definition, made concrete and checked before `ray up` sees it.

docker/ray-cluster.yaml holds everything about the AWS cluster except the one value only the user
knows: the image they pushed (placeholder S4MC_IMAGE). `render` substitutes it, validates the result
against Ray's own cluster schema and runs Ray's config preparation (`prepare_config`: defaults, merged
setup commands), and checks that the files the definition mounts on every node exist locally (the Ray
auth token, the env file with the tracking settings): each problem is one line naming the file or key.
`make cluster-up IMAGE=...` calls it and then `ray up`; tests/test_docker.py runs the same checks.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docker" / "ray-cluster.yaml"
PLACEHOLDER = "S4MC_IMAGE"
# registry/name[:tag][@sha256:digest]: what `docker pull` accepts (lower-case repository path).
IMAGE_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._/-][a-z0-9]+)*)*"
                      r"(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$")


class ClusterConfigError(ValueError):
    """The cluster definition or its inputs are not usable; the message names the key or file."""


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def with_image(cfg: dict[str, Any], image: str) -> dict[str, Any]:
    if not IMAGE_RE.match(image) or image == PLACEHOLDER:
        raise ClusterConfigError(f"IMAGE={image!r} is not an image reference; expected e.g. "
                                 "ghcr.io/you/s4mc:0.1.0-cuda (pushed from docker/Dockerfile, TORCH=cuda)")
    out = copy.deepcopy(cfg)
    out["docker"]["image"] = image
    return out


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray's schema check and config preparation (no cloud calls); returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        # The order of `ray up` (autoscaler/_private/commands.py): prepare, then validate the prepared
        # config (validation expects the fields that preparation fills in).
        prepared = prepare_config(copy.deepcopy(cfg))
        validate_config(prepared)
    except Exception as exc:  # jsonschema's ValidationError or Ray's ValueError: one line either way
        raise ClusterConfigError(f"cluster definition rejected by Ray: {str(exc).splitlines()[0]}") from None
    head = prepared["head_node_type"]
    if not any("--autoscaling-config" in c for c in prepared["head_start_ray_commands"]):
        raise ClusterConfigError("head_start_ray_commands: `ray start --head` lacks --autoscaling-config, so no "
                                 "worker would ever be launched")
    if prepared["available_node_types"][head]["resources"].get("GPU", 0):
        raise ClusterConfigError(f"available_node_types.{head}.resources.GPU must be 0: trials belong on workers")
    return prepared


def check_mounts(cfg: dict[str, Any], base: Path) -> None:
    """Every local file in file_mounts must exist: `ray up` would otherwise fail half-way."""
    for remote, local in (cfg.get("file_mounts") or {}).items():
        path = Path(local).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            hint = ("create it with `ray get-auth-token --generate`" if "auth_token" in remote
                    else "write KEY=value lines there (docs/cluster.md, 'Environment file')")
            raise ClusterConfigError(f"file_mounts[{remote!r}]: local file {path} does not exist; {hint}")


def render(image: str, out: Path, template: Path = TEMPLATE, base: Path = ROOT, check_files: bool = True) -> Path:
    cfg = with_image(load_template(template), image)
    validate(cfg)
    if check_files:
        check_mounts(cfg, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Rendered from {template.name} by `make cluster-up`; edit that file instead.\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--out", type=Path, default=ROOT / ".cluster" / "ray-cluster.yaml")
    args = p.parse_args(argv)
    try:
        print(render(args.image, args.out))
    except ClusterConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
