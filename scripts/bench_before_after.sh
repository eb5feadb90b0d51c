#!/usr/bin/env bash
# A refactor must not make neva slower: the training step and the inference benchmark of two builds,
# side by side in one run, alternating which goes first (a shared VM's speed drifts between minutes).
#   scripts/bench_before_after.sh BEFORE_ROOT [STEPS] [PAIRS]
# BEFORE_ROOT is a checkout of the earlier commit built with scripts/setup.sh (a git worktree:
# `git worktree add /tmp/before <commit> && (cd /tmp/before && bash scripts/setup.sh)`); this
# checkout is the "after". Training: configs/bench/train.toml over the demo's data, fp32 (and every
# BENCH_MODES entry: 32, bf16-mixed, bf16-O2), STEPS timed steps after 2 warm-up steps. Inference:
# neva-bench-model on configs/bench/mixtral-siglip.toml. Prints medians, the median of the pairs'
# ratios and every pair's ratio (after / before: above 1 is faster). BENCH_PARTS="train" or "infer" runs only that part.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
before="$(cd "${1:?usage: scripts/bench_before_after.sh BEFORE_ROOT [STEPS] [PAIRS]}" && pwd)"
steps="${2:-6}"
pairs="${3:-3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
work="$root/build/bench-before-after"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; threads: $OMP_NUM_THREADS; $(date -u +%F)"
echo "before: $(git -C "$before" log -1 --format='%h %s' | cut -c1-80)"
echo "after:  $(git -C "$root" log -1 --format='%h %s' | cut -c1-80)$(git -C "$root" diff --quiet || echo ' (+ uncommitted changes)')"
mkdir -p "$work/runs"
[ -f "$work/demo/data/stage2.json" ] || "$root/build/bin/neva-run" demo --prepare-only --dir "$work/demo" > /dev/null

train() {  # train SIDE_ROOT NAME MODE -> tokens/s over the timed steps
  local dir="$work/runs/$2-$3" precision="${3%-O2}" o2=false
  [ "$3" = bf16-O2 ] && o2=true
  rm -rf "$dir"
  "$1/build/bin/neva-run" "$root/configs/bench/train.toml" --set trainer.precision="$precision" \
    --set model.megatron_amp_O2="$o2" --set trainer.max_steps=$((steps + 2)) \
    --set model.data.data_path="$work/demo/data/stage2.json" --set model.data.image_folder="$work/demo/data/images" \
    --set model.tokenizer.model="$work/demo/model/tokenizer" --set exp_manager.explicit_log_dir="$dir" \
    --set exp_manager.export_hf=false > /dev/null 2> "$dir.log" || { cat "$dir.log" >&2; return 1; }
  "$root/.venv/bin/python" -c '
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])][2:]
tokens, seconds = sum(x["tokens"] for x in m), sum(x["step_seconds"] for x in m)
print(f"{tokens / seconds:.1f}")' "$dir/metrics.jsonl"
}
infer() {  # infer SIDE_ROOT -> "prefill decode encode" from neva-bench-model's lines
  "$1/build/bin/neva-bench-model" "$root/configs/bench/mixtral-siglip.toml" --prompt-tokens 128 --new-tokens 16 \
    --precision 32 | tr -s ' ' | "$root/.venv/bin/python" -c '
import re, sys
text = sys.stdin.read()
nums = [re.search(p, text).group(1) for p in (r"prefill[^\n]*?([0-9.]+) tokens/s", r"decode[^\n]*?([0-9.]+) tokens/s",
                                              r"encode[^\n]*?([0-9.]+) ms")]
print(" ".join(nums))'
}
summary() {  # summary LABEL "a1 a2 .." "b1 b2 .." -> medians and ratios (after / before)
  "$root/.venv/bin/python" - "$@" <<'PY'
import statistics, sys
label, after, before = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
ratios = [a / b for a, b in zip(after, before)]
pairs = ", ".join(f"{a:.1f}/{b:.1f}={q:.3f}" for a, b, q in zip(after, before, ratios))
print(f"{label:<28} after {statistics.median(after):8.1f}   before {statistics.median(before):8.1f}   "
      f"median pair ratio {statistics.median(ratios):.3f}   pairs: {pairs}")
PY
}

parts="${BENCH_PARTS:-train infer}"
[[ " $parts " == *" train "* ]] && for mode in ${BENCH_MODES:-32}; do
  a=() b=()
  for ((r = 1; r <= pairs; r++)); do
    if ((r % 2)); then a+=("$(train "$root" after "$mode")"); b+=("$(train "$before" before "$mode")")
    else b+=("$(train "$before" before "$mode")"); a+=("$(train "$root" after "$mode")"); fi
  done
  summary "train $mode, tokens/s" "${a[*]}" "${b[*]}"
done
[[ " $parts " == *" infer "* ]] || exit 0
pa=() pb=() da=() db=() ea=() eb=()
for ((r = 1; r <= pairs; r++)); do
  if ((r % 2)); then read -r p d e <<< "$(infer "$root")"; pa+=("$p"); da+=("$d"); ea+=("$e")
                     read -r p d e <<< "$(infer "$before")"; pb+=("$p"); db+=("$d"); eb+=("$e")
  else read -r p d e <<< "$(infer "$before")"; pb+=("$p"); db+=("$d"); eb+=("$e")
       read -r p d e <<< "$(infer "$root")"; pa+=("$p"); da+=("$d"); ea+=("$e"); fi
done
summary "fp32 prefill, tokens/s" "${pa[*]}" "${pb[*]}"
summary "fp32 decode, tokens/s" "${da[*]}" "${db[*]}"
summary "fp32 SigLIP encode, ms" "${ea[*]}" "${eb[*]}"
echo "(encode: milliseconds, lower is faster, so its after/before below 1 is faster)"
