#!/bin/sh
# Entry point of the s4mc image. Service names start the stack's long-running processes with the very
# command lines the loopback tests run (orchestration/services.py builds them from flags and the
# environment: RAY_*, MLFLOW_*, S3_*); anything else runs as given (`make sweep`, `bash`, the Ray
# cluster launcher's own commands).
set -eu
case "${1:-}" in
  ray-head|ray-worker|mlflow-server|s3-server)
    exec python -m orchestration.services "$@" ;;
  "")
    echo "usage: ray-head | ray-worker | mlflow-server | s3-server | <command> (see docker/compose.yaml)" >&2
    exit 2 ;;
  *)
    exec "$@" ;;
esac
