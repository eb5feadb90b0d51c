#!/usr/bin/env bash
# Load figures for neva-run serve on loopback (scripts/bench_serve.py): TTFT and time per output token
# (p50 / p95) and tokens/s at 1, 4 and 16 concurrent streaming clients, on a tiny and a ~150M-parameter
# LLaVA (random weights, made once under build/bench-serve). Bounded: max(8, 2 x clients) requests of
# 64 tokens per level. Run after scripts/setup.sh; figures go to docs/benchmarks.md.
#   scripts/bench_serve.sh [--json FILE] [--compare REF.json] [bench_serve.py options]
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
[ -z "$compare" ] || [ -f "$compare" ] || { echo "bench_serve.sh: --compare $compare: no such file" >&2; exit 2; }
[ -n "$json" ] || json="$(mktemp --suffix=.json)"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%F)"
TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_serve.py" "$root/build/bin/neva-run" \
  "$root/build/bench-serve" --json "$json" "${args[@]}"
if [ -n "$compare" ]; then
  echo "against $compare:"
  python3 "$root/scripts/bench_compare.py" "$json" "$compare"
fi
