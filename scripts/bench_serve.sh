#!/usr/bin/env bash
# Load figures for neva-run serve on loopback (scripts/bench_serve.py): TTFT and time per output token
# (p50 / p95) and tokens/s at 1, 4 and 16 concurrent streaming clients, on a tiny and a ~150M-parameter
# LLaVA (random weights, made once under build/bench-serve). Bounded: max(8, 2 x clients) requests of
# 64 tokens per level. Run after scripts/setup.sh; figures go to docs/benchmarks.md.
#   scripts/bench_serve.sh [--save FILE] [--compare REF] [bench_serve.py options, e.g. --json FILE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%F)"
TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_serve.py" "$root/build/bin/neva-run" \
  "$root/build/bench-serve" "$@"
