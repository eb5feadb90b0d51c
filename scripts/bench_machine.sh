#!/usr/bin/env bash
# The machine's limits, measured with the LibTorch neva uses: memory bandwidth (a STREAM-style triad
# over >= 1 GiB on all cores) and the fp32 / bf16 GEMM peak (build/bin/neva-bench-machine). The
# denominators of docs/benchmarks.md's "fraction of the limit" columns. Run after scripts/setup.sh.
#   scripts/bench_machine.sh [--json FILE] [--compare REF.json] [neva-bench-machine options]
# --compare prints each figure's ratio to a result stored earlier with --json (scripts/bench_compare.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=()
compare=""
json=""
while [ $# -gt 0 ]; do
  case "$1" in
    --compare) compare="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -z "$compare" ] || [ -f "$compare" ] || { echo "bench_machine.sh: --compare $compare: no such file" >&2; exit 2; }
[ -n "$json" ] || json="$(mktemp --suffix=.json)"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs, $(grep -o -w -E 'avx512f|avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '); $(date -u +%F)"
"$root/build/bin/neva-bench-machine" --json "$json" "${args[@]}"
if [ -n "$compare" ]; then
  echo "against $compare:"
  python3 "$root/scripts/bench_compare.py" "$json" "$compare"
fi
