#!/usr/bin/env bash
# The fused CPU kernel alone, on the embedded benchmark's shape: time per phase for each body (the
# AVX-512 one where the CPU has it, the portable one with the same flags, and the portable one built
# for AVX2), checked to give the same outputs bit for bit; the AVX2 build's instructions per call
# under callgrind (valgrind 3.19 cannot run AVX-512 code); and the CPU's 512-bit vector and L1
# throughput. These are the figures behind docs/performance.md, "The memory-bandwidth goal". Needs
# cc; valgrind is optional.
#   bash scripts/fused_kernel_count.sh [calls]
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${1:-300}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
src=(scripts/fused_kernel_driver.c s4mc/kernels/fused_pl.c -lm)
cc -O3 -march=native -ffp-contract=off -o "$out/native" "${src[@]}"
cc -O3 -march=native -ffp-contract=off -DS4MC_PORTABLE -o "$out/portable" "${src[@]}"
cc -O3 -march=x86-64-v3 -ffp-contract=off -g -o "$out/avx2" "${src[@]}"
native="$("$out/native" "$calls")" portable="$("$out/portable" "$calls")" avx2="$("$out/avx2" "$calls")"
echo "native   (-march=native):                 $native"
echo "portable (-march=native -DS4MC_PORTABLE):  $portable"
echo "AVX2     (-march=x86-64-v3):              $avx2"
# the drivers print a hash of every output: the three builds must agree bit for bit
if [[ "${native%% |*}" != "${portable%% |*}" || "${native%% |*}" != "${avx2%% |*}" ]]; then
  echo "error: the builds' outputs differ (${native%% |*}, ${portable%% |*}, ${avx2%% |*})" >&2
  exit 1
fi
if command -v valgrind >/dev/null; then
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$out/avx2" 1 >/dev/null 2>&1
  # awk reads to the end: grep -m1 would close the pipe early, and pipefail would end the script
  callgrind_annotate --inclusive=yes "$out/cg" | awk '/s4mc_fused_pseudo_label/ && !done { done = 1
    gsub(",", "", $1); printf "AVX2 build: %d instructions per call = %.1f per probability (8x11x64x64)\n", $1, $1 / 360448 }'
else
  echo "valgrind not found: no instruction count"
fi
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
  cc -O2 -march=native -o "$out/ports" scripts/fused_kernel_ports.c
  "$out/ports"
fi
