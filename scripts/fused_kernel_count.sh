#!/usr/bin/env bash
# The fused CPU kernel alone: time per phase for the native build and an AVX2 build, and the AVX2
# build's instructions per call under callgrind (valgrind 3.19 cannot run AVX-512 code). These are the
# figures behind docs/performance.md, "The memory-bandwidth goal". Needs cc; valgrind is optional.
#   bash scripts/fused_kernel_count.sh [calls]
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${1:-300}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
src=(scripts/fused_kernel_driver.c s4mc/kernels/fused_pl.c -lm)
cc -O3 -march=native -mprefer-vector-width=512 -ffp-contract=off -o "$out/native" "${src[@]}"
cc -O3 -march=x86-64-v3 -ffp-contract=off -g -o "$out/avx2" "${src[@]}"
echo "native (-march=native, 512-bit): $("$out/native" "$calls")"
echo "AVX2   (-march=x86-64-v3):       $("$out/avx2" "$calls")"
if command -v valgrind >/dev/null; then
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$out/avx2" 1 >/dev/null 2>&1
  callgrind_annotate --inclusive=yes "$out/cg" | grep -m1 "s4mc_fused_pseudo_label" \
    | awk '{gsub(",", "", $1); printf "AVX2 build: %d instructions per call = %.1f per probability (8x11x64x64)\n", $1, $1 / 360448}'
else
  echo "valgrind not found: no instruction count"
fi
