#!/usr/bin/env bash
# Trains the embedded comparison (issue: supervised, full supervision, each host with S4MC off/on),
# one run after another with 2 threads, into runs/embedded/<name>; then renders the table and curves.
# Usage: bash scripts/measure_embedded.sh [name ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
names=${*:-supervised supervised_full cutmix_seg cutmix_seg_s4mc fixmatch fixmatch_s4mc unimatch unimatch_s4mc}
for name in $names; do
  /usr/bin/time -f "$name wall %e s" .venv/bin/s4mc train --config experiments/embedded/$name.yaml \
    run.dir=runs/embedded/$name train.progress=false --no-resume
done
.venv/bin/python scripts/embedded_results.py runs/embedded docs/embedded_results
