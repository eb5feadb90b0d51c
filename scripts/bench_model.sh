#!/usr/bin/env bash
# Side-by-side: neva vs transformers (PyTorch eager, same wheel, same threads) on the benchmark
# recipes' shapes, fp32 and bf16: the Mixtral-shaped decoder with the SigLIP so400m tower
# (configs/bench/mixtral-siglip.toml), then the CLIP ViT-L/14-336 tower alone
# (configs/bench/llama-clip336.toml). Run after scripts/setup.sh. Figures go to docs/benchmarks.md.
#   scripts/bench_model.sh [PROMPT_TOKENS] [NEW_TOKENS] [--save FILE] [--compare REF]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
prompt="${1:-256}"
new="${2:-32}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
models="$root/configs/bench/models"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; threads: $OMP_NUM_THREADS; $(date -u +%F)"
for precision in 32 bf16; do
  "$root/build/bin/neva-bench-model" "$root/configs/bench/mixtral-siglip.toml" --prompt-tokens "$prompt" \
    --new-tokens "$new" --precision "$precision"
  TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_transformers.py" \
    "$models/mixtral-bench/config.json" "$models/siglip-so400m/config.json" "$prompt" "$new" "$precision"
  "$root/build/bin/neva-bench-model" "$root/configs/bench/llama-clip336.toml" --precision "$precision" --encode-only
  TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_transformers.py" \
    - "$models/clip-vit-l-336/config.json" 0 0 "$precision"
done
