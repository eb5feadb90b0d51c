#!/usr/bin/env bash
# Training across processes on one machine: the same global batch of configs/bench/train.toml (NeVA
# stage 2, Llama-shaped ~134M decoder trained, CLIP ViT-B/32-shaped tower frozen, over the demo's
# data) as one process, and as two processes data-parallel (DP2, DP2 with ZeRO-1), tensor-parallel
# (TP2), tensor + sequence parallel (TP2+SP), context-parallel (CP2) and pipeline-parallel (PP2 with
# 1F1B over 4 micro-batches of 1, PP2 interleaved with 2 chunks per stage); and with a Mixtral-shaped
# ~100M decoder (configs/bench/models/mixtral-train-bench: 8 experts) as one process (1-moe) and
# expert-parallel (EP2). For each: tokens/s (median over the steps after the
# first two), the share of a step this rank spent blocked in collectives (metrics.jsonl
# "communication" seconds over step_seconds), the bytes each group moved per step, optimizer state and
# peak resident memory per rank; for the pipelines, the bubble stage 0 measured (its time blocked on
# the pipeline group over the rest of its step) beside Megatron's (p - 1) / (v m). Run after
# scripts/setup.sh; figures go to docs/benchmarks.md.
#   scripts/bench_parallel.sh [STEPS] [--save FILE] [--compare REF]
# The threads are shared fairly: one process gets all cores, each of two processes half of them
# (OMP_NUM_THREADS). BENCH_LAYOUTS="1 tp2" runs only those of: 1 dp2 dp2-zero tp2 tp2-sp cp2 pp2 pp2-v2
# 1-moe ep2.
# On a GPU machine, BENCH_DEVICE=cuda runs the same layouts on NCCL (one GPU per process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
steps="${1:-8}"
cores="$(nproc)"
work="$root/build/bench-parallel"
bin="$root/build/bin"
device="${BENCH_DEVICE:-cpu}"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $cores CPUs; device $device; $(date -u +%F)"
[ -f "$work/demo/data/stage2.json" ] || "$bin/neva-run" demo --prepare-only --dir "$work/demo" > /dev/null
mkdir -p "$work/runs"
common=(--set trainer.max_steps=$((steps + 2)) --set model.data.data_path="$work/demo/data/stage2.json"
        --set model.data.image_folder="$work/demo/data/images" --set model.tokenizer.model="$work/demo/model/tokenizer"
        --set model.global_batch_size=4 --set run.device="$device")
moe=(--set model.mm_cfg.llm.plugin=mixtral --set model.mm_cfg.llm.config="$root/configs/bench/models/mixtral-train-bench/config.json")
run() {  # run LAYOUT PROCESSES ARGS...
  local layout="$1" processes="$2"
  shift 2
  local dir="$work/runs/$layout"
  rm -rf "$dir"
  local launch=()
  ((processes > 1)) && launch=(--nproc-per-node "$processes")
  OMP_NUM_THREADS=$((cores / processes > 0 ? cores / processes : 1)) \
    "$bin/neva-run" "${launch[@]}" "$root/configs/bench/train.toml" "${common[@]}" \
    --set exp_manager.explicit_log_dir="$dir" "$@" > "$work/runs/$layout.out" 2>&1
}
all_layouts="1 dp2 dp2-zero tp2 tp2-sp cp2 pp2 pp2-v2 1-moe ep2"
for layout in ${BENCH_LAYOUTS:-$all_layouts}; do
  case "$layout" in
    1) run 1 1 --set model.micro_batch_size=4 ;;
    dp2) run dp2 2 --set model.micro_batch_size=2 ;;
    dp2-zero) run dp2-zero 2 --set model.micro_batch_size=2 --set model.optim.name=distributed_fused_adam ;;
    tp2) run tp2 2 --set model.micro_batch_size=4 --set model.tensor_model_parallel_size=2 ;;
    tp2-sp) run tp2-sp 2 --set model.micro_batch_size=4 --set model.tensor_model_parallel_size=2 \
              --set model.sequence_parallel=true ;;
    cp2) run cp2 2 --set model.micro_batch_size=4 --set model.context_parallel_size=2 ;;
    pp2) run pp2 2 --set model.micro_batch_size=1 --set model.pipeline_model_parallel_size=2 ;;
    pp2-v2) run pp2-v2 2 --set model.micro_batch_size=1 --set model.pipeline_model_parallel_size=2 \
              --set model.virtual_pipeline_model_parallel_size=2 ;;
    1-moe) run 1-moe 1 --set model.micro_batch_size=4 "${moe[@]}" ;;
    ep2) run ep2 2 --set model.micro_batch_size=2 --set model.expert_model_parallel_size=2 "${moe[@]}" ;;
    *) echo "unknown layout $layout (expected one of: $all_layouts)" >&2; exit 2 ;;
  esac
done
"$root/.venv/bin/python" - "$work/runs" ${BENCH_LAYOUTS:-$all_layouts} <<'PY'
import glob, json, os, re, statistics, sys
runs, layouts = sys.argv[1], sys.argv[2:]
print("| layout | tokens/s | vs 1 process | blocked in collectives | bytes per step (rank 0) | optimizer state per rank | peak RSS per rank |")
print("|---|---|---|---|---|---|---|")
base = None
for layout in layouts:
    lines = [json.loads(l) for l in open(os.path.join(runs, layout, "metrics.jsonl"))][2:]
    tps = statistics.median(l["tokens_per_second"] for l in lines)
    if layout in ("1", "1-moe"): base = tps  # each model against its own single process
    base = base or tps
    blocked = statistics.median(
        sum(op["seconds"] for group in l["communication"].values() for op in group.values()) / l["step_seconds"]
        for l in lines)
    traffic = {}
    for group, ops in lines[-1]["communication"].items():
        for op, t in ops.items():
            if t["bytes"] > 1 << 16:  # the run's own small collectives left out
                traffic[f"{group} {op}"] = t["bytes"]
    moved = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(traffic.items())) or "none"
    rss = []
    for log in sorted(glob.glob(os.path.join(runs, layout, "logs", "rank-*.log"))):
        found = re.findall(r"peak resident memory while training ([0-9.]+) MiB", open(log).read())
        if found: rss.append(float(found[-1]))
    if not rss: rss = [lines[-1]["peak_rss_mib"]]
    print(f"| {layout} | {tps:.0f} | {tps / base:.2f} | {100 * blocked:.0f}% | {moved} | "
          f"{lines[-1]['optimizer_state_mib']:.0f} MiB | {' / '.join(f'{r:.0f}' for r in rss)} MiB |")
pipelines = [l for l in layouts if l.startswith("pp")]
if pipelines:
    print()
    print("| layout | stages p | chunks v | micro-batches m | stage 0 blocked / its work (measured bubble) | (p - 1) / (v m) |")
    print("|---|---|---|---|---|---|")
for layout in pipelines:
    lines = [json.loads(l) for l in open(os.path.join(runs, layout, "metrics.jsonl"))][2:]
    p = lines[-1]["pipeline_model_parallel_size"]
    v = 2 if layout.endswith("-v2") else 1
    m = round(lines[-1]["samples"] / lines[-1]["data_parallel_size"])  # micro-batches of one sample
    waits = []
    for l in lines:
        blocked = sum(op["seconds"] for op in l["communication"].get("pipeline", {}).values())
        waits.append(blocked / (l["forward_backward_seconds"] - blocked))
    print(f"| {layout} | {p} | {v} | {m} | {100 * statistics.median(waits):.0f}% | {100 * (p - 1) / (v * m):.0f}% |")
PY
