#!/usr/bin/env bash
# The embedded comparison without Ray: each config in experiments/embedded/ x seeds, one run after another
# (one thread each), into runs/embedded/<name>/seed_<s>; then the table, paired differences and plots.
# The README's figures come from `make reproduce TABLE=embedded` (the same runs, 2 at a time on Ray);
# this script is the dependency-free way to get them.
# Usage: SEEDS="0 1 2" bash scripts/measure_embedded.sh [name ...]   (default: all eight, seeds 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
names=${*:-supervised supervised_full cutmix_seg cutmix_seg_s4mc fixmatch fixmatch_s4mc unimatch unimatch_s4mc}
for name in $names; do
  for seed in ${SEEDS:-0 1 2}; do
    /usr/bin/time -f "$name seed $seed wall %e s" .venv/bin/s4mc train --no-resume \
      --config experiments/embedded/$name.yaml run.dir=runs/embedded/$name/seed_$seed train.seed=$seed \
      train.progress=false
  done
done
.venv/bin/python scripts/embedded_results.py docs/embedded_results runs/embedded
