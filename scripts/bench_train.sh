#!/usr/bin/env bash
# Training throughput, neva vs transformers + PyTorch eager (same wheel, same threads), on the same
# NeVA stage-2 step: configs/bench/train.toml (Llama-shaped ~134M decoder trained, CLIP ViT-B/32-shaped
# tower frozen) over the demo's data: fp32, bf16 mixed, and neva's bf16-O2 beside transformers' bf16 autocast
# (it has no O2). MFU is model FLOPs/s over this machine's
# measured matmul peak (neva-bench-matmul, best shape per dtype). Run after scripts/setup.sh; figures
# go to docs/benchmarks.md.
#   scripts/bench_train.sh [STEPS]
# BENCH_MODES="32" runs only those modes (of 32, bf16-mixed, bf16-O2); BENCH_PROFILE=1 also traces steps 3-4 of each run with PyTorch's profiler (neva: trainer.profile;
# transformers: torch.profiler) and prints both sides' operators by self time (scripts/profile_summary.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
steps="${1:-10}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
work="$root/build/bench-train"
bin="$root/build/bin"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; threads: $OMP_NUM_THREADS; $(date -u +%F)"
[ -f "$work/demo/data/stage2.json" ] || "$bin/neva-run" demo --prepare-only --dir "$work/demo" > /dev/null
peaks="$("$bin/neva-bench-matmul" | awk '/GFLOP\/s$/ { v = $(NF-1); if ($(NF-2) == "fp32" && v > f) f = v; if ($(NF-2) == "bf16" && v > b) b = v } END { print f, b }')"
read -r peak32 peak16 <<< "$peaks"
echo "matmul peak (neva-bench-matmul): fp32 $peak32 GFLOP/s, bf16 $peak16 GFLOP/s"
models="$root/configs/bench/models"
for mode in ${BENCH_MODES:-32 bf16-mixed bf16-O2}; do
  precision="${mode%-O2}"
  o2=$([ "$mode" = bf16-O2 ] && echo true || echo false)
  rm -rf "$work/runs/neva-$mode"
  "$bin/neva-run" "$root/configs/bench/train.toml" --set trainer.precision="$precision" --set model.megatron_amp_O2=$o2 \
    --set trainer.max_steps=$((steps + 2)) --set model.data.data_path="$work/demo/data/stage2.json" \
    --set model.data.image_folder="$work/demo/data/images" --set model.tokenizer.model="$work/demo/model/tokenizer" \
    --set exp_manager.explicit_log_dir="$work/runs/neva-$mode" \
    --set trainer.profile="$([ -n "${BENCH_PROFILE:-}" ] && echo true || echo false)" \
    --set trainer.profile_step_start=3 --set trainer.profile_step_end=5 > /dev/null
  # transformers has no O2 (bf16 weights with fp32 main weights): its row for bf16-O2 is bf16 autocast.
  hf_precision=$([ "$mode" = 32 ] && echo 32 || echo bf16-mixed)
  [ "$mode" = bf16-O2 ] || hf="$(BENCH_TRACE="${BENCH_PROFILE:+$work/runs/transformers-$mode.json}" TRANSFORMERS_VERBOSITY=error "$root/.venv/bin/python" "$root/scripts/bench_train_transformers.py" \
    "$models/llama-train-bench/config.json" "$models/clip-train-bench/config.json" "$work/demo" "$hf_precision" "$steps")"
  peak=$([ "$precision" = 32 ] && echo "$peak32" || echo "$peak16")
  "$root/.venv/bin/python" - "$work/runs/neva-$mode/metrics.jsonl" "$hf" "$peak" "$mode" <<'PY'
import json, sys
metrics = [json.loads(line) for line in open(sys.argv[1])][2:]  # warm-up steps excluded
hf, peak, precision = json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
neva = sum(m["tokens"] for m in metrics) / sum(m["step_seconds"] for m in metrics)
mean = lambda key: sum(m[key] for m in metrics) / len(metrics)
# Model FLOPs: what the step needs, i.e. the LM head only where a labelled token follows (the
# labelled share is the same data for both); transformers computes it everywhere, beyond the model FLOPs.
labelled = sum(m["labelled_tokens"] for m in metrics) / sum(m["tokens"] for m in metrics)
flops = hf["flops_per_token"] - (1 - labelled) * hf["lm_head_flops_per_token"]
mfu = lambda rate: 100 * rate * flops / (peak * 1e9)
print(f"{precision:<10} neva {neva:7.1f} tokens/s (MFU {mfu(neva):4.1f}%)   transformers {hf['tokens_per_second']:7.1f} "
      f"tokens/s (MFU {mfu(hf['tokens_per_second']):4.1f}%)   neva/transformers {neva / hf['tokens_per_second']:.2f}x   "
      f"[{flops / 1e9:.3f} model GFLOP/token, {100 * labelled:.0f}% of tokens labelled, mean length {hf['mean_length']:.0f}]")
print(f"{'':<10} seconds per step: forward+backward neva {mean('forward_backward_seconds'):.3f} / transformers "
      f"{hf['forward_backward_seconds']:.3f}, clip+optimizer neva {mean('optimizer_seconds'):.3f} / transformers "
      f"{hf['optimizer_seconds']:.3f}, data wait neva {mean('data_wait_seconds'):.3f}")
PY
  if [ -n "${BENCH_PROFILE:-}" ]; then
    "$root/.venv/bin/python" "$root/scripts/profile_summary.py" "$work/runs/neva-$mode/profile.json" 18
    [ "$mode" = bf16-O2 ] || "$root/.venv/bin/python" "$root/scripts/profile_summary.py" "$work/runs/transformers-$mode.json" 18
  fi
done
