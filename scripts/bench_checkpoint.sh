#!/usr/bin/env bash
# Distributed checkpoints: the save and load throughput of neva's format against this disk's own
# write and cold-read speed, and a load's peak memory against the bytes it reads
# (build/bin/neva-bench-checkpoint, one rank's state of MIB MiB); then what checkpointing costs a
# training run: configs/bench/train.toml (NeVA stage 2, ~134M Llama-shaped decoder trained: ~1.6 GB of
# weights and AdamW moments per checkpoint) for STEPS steps with no checkpoint but the last, with a
# checkpoint every 2 steps written synchronously, and the same with async_save (the state copied at the
# step, a thread writing while training goes on); then the export's memory on rank 0 under one process,
# TP2 and PP2. Run after scripts/setup.sh; figures go to
# docs/benchmarks.md.
#   scripts/bench_checkpoint.sh [MIB] [STEPS] [--save FILE] [--compare REF]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
mib="${1:-1024}"
steps="${2:-10}"
work="$root/build/bench-checkpoint"
bin="$root/build/bin"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%F); disk of $work: $(df -h "$root/build" | tail -1 | awk '{print $1}')"
mkdir -p "$work"
"$bin/neva-bench-checkpoint" --mib "$mib" --dir "$work/io"
[ -f "$work/demo/data/stage2.json" ] || "$bin/neva-run" demo --prepare-only --dir "$work/demo" > /dev/null
common=(--set trainer.max_steps="$steps" --set model.data.data_path="$work/demo/data/stage2.json"
        --set model.data.image_folder="$work/demo/data/images" --set model.tokenizer.model="$work/demo/model/tokenizer"
        --set model.global_batch_size=4 --set model.micro_batch_size=4 --set exp_manager.export_hf=false)
run() {  # run NAME ARGS...: prints the wall time of the training loop (first step to the last commit)
  local name="$1"
  shift
  rm -rf "$work/runs/$name"
  local start end
  start=$(date +%s.%N)
  "$bin/neva-run" "$root/configs/bench/train.toml" "${common[@]}" --set exp_manager.explicit_log_dir="$work/runs/$name" "$@" \
    > "$work/$name.out" 2>&1
  end=$(date +%s.%N)
  python3 - "$work/runs/$name/metrics.jsonl" "$name" "$start" "$end" <<'PY'
import json, sys, statistics
rows = [json.loads(line) for line in open(sys.argv[1])]
seconds = [r["step_seconds"] for r in rows]
wall = float(sys.argv[4]) - float(sys.argv[3])
print(f"{sys.argv[2]:>6}: {len(rows)} steps, step time median {statistics.median(seconds):.2f} s, sum {sum(seconds):.1f} s; "
      f"whole run {wall:.1f} s")
PY
}
run none
run sync --set exp_manager.checkpoint_callback_params.every_n_train_steps=2
run async --set exp_manager.checkpoint_callback_params.every_n_train_steps=2 \
          --set exp_manager.checkpoint_callback_params.async_save=true
du -sh "$work"/runs/sync/checkpoints/step-* 2>/dev/null | tail -1 || true
# The Hugging Face export streamed to rank 0 a tensor at a time: its peak memory on top of the rank's
# model, one process and TP2 / PP2 (one step each).
for layout in "1 " "2 --set model.tensor_model_parallel_size=2" "2 --set model.pipeline_model_parallel_size=2"; do
  set -- $layout
  ranks="$1"
  shift
  rm -rf "$work/runs/export"
  "$bin/neva-run" --nproc-per-node "$ranks" "$root/configs/bench/train.toml" "${common[@]}" --set trainer.max_steps=1 \
    --set exp_manager.export_hf=true --set exp_manager.explicit_log_dir="$work/runs/export" "$@" 2>&1 |
    sed -n "s|^train: exported .*(|export, $ranks rank(s) $*: (|p"
done
rm -rf "$work/runs"
