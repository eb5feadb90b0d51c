#!/usr/bin/env bash
# Training throughput, neva vs transformers + PyTorch eager (same wheel, same threads), on the same
# NeVA stage-2 step: configs/bench/train.toml (Llama-shaped ~134M decoder trained, CLIP ViT-B/32-shaped
# tower frozen) over the demo's data: fp32, bf16 mixed, and neva's bf16-O2 beside transformers' bf16 autocast
# (it has no O2). MFU is model FLOPs/s over this machine's
# measured matmul peak (neva-bench-matmul, best shape per dtype). Run after scripts/setup.sh; figures
# go to docs/benchmarks.md.
#   scripts/bench_train.sh [STEPS] [--save FILE] [--compare REF]
# Each mode runs BENCH_REPEATS (default 3) neva/transformers pairs back to back, alternating which
# goes first; the figures are the medians and each pair's ratio is listed (a shared VM's speed drifts
# by +-25% between minutes, so one pair can mislead).
# BENCH_MODES="32" runs only those modes (of 32, bf16-mixed, bf16-O2); BENCH_PROFILE=1 also traces steps 3-4 of the first pair with PyTorch's profiler (neva: trainer.profile;
# transformers: torch.profiler) and prints both sides' operators by self time (scripts/profile_summary.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
steps="${1:-10}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
work="$root/build/bench-train"
bin="$root/build/bin"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; threads: $OMP_NUM_THREADS; $(date -u +%F)"
[ -f "$work/demo/data/stage2.json" ] || "$bin/neva-run" demo --prepare-only --dir "$work/demo" > /dev/null
# The peak: the fastest single call over the shapes (neva-bench-matmul's "best" column).
peaks="$("$bin/neva-bench-matmul" | awk '/GFLOP\/s$/ { v = $(NF-1); if ($(NF-5) == "fp32" && v > f) f = v; if ($(NF-5) == "bf16" && v > b) b = v } END { print f, b }')"
read -r peak32 peak16 <<< "$peaks"
echo "matmul peak (neva-bench-matmul): fp32 $peak32 GFLOP/s, bf16 $peak16 GFLOP/s"
models="$root/configs/bench/models"
repeats="${BENCH_REPEATS:-3}"
run_neva() {  # run_neva MODE PRECISION O2 REPEAT -> metrics in $work/runs/neva-MODE-REPEAT
  local dir="$work/runs/neva-$1-$4"
  rm -rf "$dir"
  "$bin/neva-run" "$root/configs/bench/train.toml" --set trainer.precision="$2" --set model.megatron_amp_O2="$3" \
    --set trainer.max_steps=$((steps + 2)) --set model.data.data_path="$work/demo/data/stage2.json" \
    --set model.data.image_folder="$work/demo/data/images" --set model.tokenizer.model="$work/demo/model/tokenizer" \
    --set exp_manager.explicit_log_dir="$dir" \
    --set trainer.profile="$([ -n "${BENCH_PROFILE:-}" ] && [ "$4" = 1 ] && echo true || echo false)" \
    --set trainer.profile_step_start=3 --set trainer.profile_step_end=5 > /dev/null
}
run_transformers() {  # run_transformers HF_PRECISION MODE REPEAT -> JSON in $work/runs/transformers-MODE-REPEAT.json
  BENCH_TRACE="$([ -n "${BENCH_PROFILE:-}" ] && [ "$3" = 1 ] && echo "$work/runs/transformers-$2.trace.json")" \
    TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_train_transformers.py" \
    "$models/llama-train-bench/config.json" "$models/clip-train-bench/config.json" "$work/demo" "$1" "$steps" \
    > "$work/runs/transformers-$2-$3.json"
}
mkdir -p "$work/runs"
for mode in ${BENCH_MODES:-32 bf16-mixed bf16-O2}; do
  precision="${mode%-O2}"
  o2=$([ "$mode" = bf16-O2 ] && echo true || echo false)
  # transformers has no O2 (bf16 weights with fp32 main weights): its side for bf16-O2 is bf16 autocast.
  hf_precision=$([ "$mode" = 32 ] && echo 32 || echo bf16-mixed)
  # Pairs run back to back, the order alternating, so that a VM's slow minutes fall on both sides.
  for ((r = 1; r <= repeats; r++)); do
    if ((r % 2)); then run_neva "$mode" "$precision" "$o2" "$r"; run_transformers "$hf_precision" "$mode" "$r"
    else run_transformers "$hf_precision" "$mode" "$r"; run_neva "$mode" "$precision" "$o2" "$r"; fi
  done
  peak=$([ "$precision" = 32 ] && echo "$peak32" || echo "$peak16")
  "$root/.venv/bin/python" - "$work/runs" "$mode" "$repeats" "$peak" <<'PY'
import json, statistics, sys
runs, mode, repeats, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pairs = []
for r in range(1, repeats + 1):
    metrics = [json.loads(line) for line in open(f"{runs}/neva-{mode}-{r}/metrics.jsonl")][2:]  # warm-up excluded
    hf = json.load(open(f"{runs}/transformers-{mode}-{r}.json"))
    pairs.append((metrics, hf))
rate = lambda metrics: sum(m["tokens"] for m in metrics) / sum(m["step_seconds"] for m in metrics)
neva = [rate(m) for m, _ in pairs]
hf = [h["tokens_per_second"] for _, h in pairs]
ratios = [n / h for n, h in zip(neva, hf)]
# Model FLOPs: what the step needs, i.e. the LM head, and the last layer beyond its keys and
# values, only where a labelled token follows (the labelled share is the same data for both);
# transformers computes them everywhere, beyond the model FLOPs.
metrics, first = pairs[0]
labelled = sum(m["labelled_tokens"] for m in metrics) / sum(m["tokens"] for m in metrics)
flops = first["flops_per_token"] - (1 - labelled) * (first["lm_head_flops_per_token"] +
                                                     first["last_layer_query_flops_per_token"])
mfu = lambda rate: 100 * rate * flops / (peak * 1e9)
med = statistics.median
print(f"{mode:<10} neva {med(neva):7.1f} tokens/s (MFU {mfu(med(neva)):4.1f}%)   transformers {med(hf):7.1f} "
      f"tokens/s (MFU {mfu(med(hf)):4.1f}%)   neva/transformers {med(neva) / med(hf):.2f}x (medians of {repeats} pairs)   "
      f"[{flops / 1e9:.3f} model GFLOP/token, {100 * labelled:.0f}% of tokens labelled, mean length {first['mean_length']:.0f}]")
print(f"{'':<10} pairs: " + ", ".join(f"{n:.1f}/{h:.1f}={q:.2f}x" for n, h, q in zip(neva, hf, ratios)))
mean = lambda key: statistics.mean(m[key] for metrics, _ in pairs for m in metrics)
hf_mean = lambda key: statistics.mean(h[key] for _, h in pairs)
print(f"{'':<10} seconds per step: forward+backward neva {mean('forward_backward_seconds'):.3f} / transformers "
      f"{hf_mean('forward_backward_seconds'):.3f}, clip+optimizer neva {mean('optimizer_seconds'):.3f} / transformers "
      f"{hf_mean('optimizer_seconds'):.3f}, data wait neva {mean('data_wait_seconds'):.3f}")
PY
  if [ -n "${BENCH_PROFILE:-}" ]; then
    "$root/.venv/bin/python" "$root/scripts/profile_summary.py" "$work/runs/neva-$mode-1/profile.json" 18
    [ "$mode" = bf16-O2 ] || "$root/.venv/bin/python" "$root/scripts/profile_summary.py" "$work/runs/transformers-$mode.trace.json" 18
  fi
done
