#!/usr/bin/env bash
# The machine's limits, measured with the LibTorch neva uses: memory bandwidth (a STREAM-style triad
# over >= 1 GiB on all cores) and the fp32 / bf16 GEMM peak (build/bin/neva-bench-machine). The
# denominators of docs/benchmarks.md's "fraction of the limit" columns. Run after scripts/setup.sh.
#   scripts/bench_machine.sh [--save FILE] [--compare REF] [neva-bench-machine options, e.g. --json FILE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs, $(grep -o -w -E 'avx512f|avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '); $(date -u +%F)"
"$root/build/bin/neva-bench-machine" "$@"
