#!/usr/bin/env bash
# Fuzzes every parser a user's file reaches, with libFuzzer (clang) under ASan + UBSan.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target (default: all) for SECONDS (default 60)
#   scripts/fuzz.sh --prepare               build the targets and their seed corpora only
#
# Needs `bash scripts/setup.sh` first (the venv, and build/bin/neva-run, which writes the demo's
# files the seeds and assets come from). Targets (tests/fuzz/fuzz_<name>.cpp): safetensors recipe
# set_overrides hf_config tokenizer_json tokenizer_config sentencepiece llava_records image
# conversation.
#
# Environment: NEVA_FUZZ_BUILD_DIR (default build-fuzz) for the clang build and its work/ folder
# (corpora grow there across runs; crashes land in work/crashes/<target>/), NEVA_BUILD_DIR (default
# build) for the main build. Prints one line per target: seconds, executions, corpus size, result.
# Exit status 1 when a target found a crash (its input is in work/crashes/<target>/).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_build="${NEVA_FUZZ_BUILD_DIR:-$root/build-fuzz}"
main_build="${NEVA_BUILD_DIR:-$root/build}"
venv_python="$root/.venv/bin/python"
all_targets=(safetensors recipe set_overrides hf_config tokenizer_json tokenizer_config sentencepiece llava_records
             image conversation)

say() { printf '[fuzz] %s\n' "$*" >&2; }

prepare_only=0
seconds=60
if [ "${1:-}" = "--prepare" ]; then
  prepare_only=1
  shift
elif [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

[ -x "$venv_python" ] || { say "no .venv: run 'bash scripts/setup.sh' first"; exit 2; }
[ -x "$main_build/bin/neva-run" ] || { say "no $main_build/bin/neva-run: run 'bash scripts/setup.sh' first"; exit 2; }
command -v clang++ >/dev/null || { say "clang++ is missing (Debian: clang, libclang-rt-14-dev)"; exit 2; }

# --- the clang build (NEVA_FUZZ=ON: core, registry, plugins and tests/fuzz only) -------------------
if [ ! -f "$fuzz_build/build.ninja" ]; then
  torch_prefix="$("$venv_python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torch").origin).parent / "share" / "cmake")')"
  say "configuring $fuzz_build (clang, ASan + UBSan, libFuzzer)"
  cmake -S "$root" -B "$fuzz_build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
    -DNEVA_FUZZ=ON -DCMAKE_PREFIX_PATH="$torch_prefix" >/dev/null
fi
cmake --build "$fuzz_build" -- -j"${NEVA_JOBS:-$(nproc)}" | { grep -vE '^\[[0-9]+/[0-9]+\]' || true; }

# --- assets and seed corpora, made once -------------------------------------------------------------
work="$fuzz_build/work"
if [ ! -f "$work/.prepared" ]; then
  say "preparing assets and seed corpora in $work"
  rm -rf "$work/assets" "$work/seeds" "$work/demo"
  mkdir -p "$work/assets" "$work/seeds"
  env -u NEVA_PLUGIN_PATH "$main_build/bin/neva-run" demo --prepare-only --dir "$work/demo" >/dev/null
  cp -r "$work/demo/model/tokenizer" "$work/assets/tokenizer"
  ln -s "$work/demo/data/images" "$work/assets/images"
  "$venv_python" "$root/tests/fuzz/make_seeds.py" "$root" "$work" "$main_build"
  touch "$work/.prepared"
fi
[ "$prepare_only" = 1 ] && exit 0

# --- fuzz -----------------------------------------------------------------------------------------
# PyTorch's ASAN CI options (detect_leaks off: LibTorch keeps process-lifetime allocations).
export ASAN_OPTIONS="detect_leaks=0:symbolize=1:detect_stack_use_after_return=true:strict_init_order=true:detect_odr_violation=1:detect_container_overflow=0:check_initialization_order=true:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export NEVA_FUZZ_ASSETS="$work/assets"
export OMP_NUM_THREADS=1
failed=0
printf '%-18s %8s %12s %10s %8s  %s\n' target seconds executions exec/s corpus result
for target in "${targets[@]}"; do
  binary="$fuzz_build/bin/neva_fuzz_$target"
  [ -x "$binary" ] || { say "unknown target '$target' (known: ${all_targets[*]})"; exit 2; }
  corpus="$work/corpus/$target"
  crashes="$work/crashes/$target"
  mkdir -p "$corpus" "$crashes"
  log="$work/$target.log"
  set +e
  "$binary" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=6144 -malloc_limit_mb=4096 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$crashes/" "$corpus" "$work/seeds/$target" >"$log" 2>&1
  status=$?
  set -e
  executions=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  runtime=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    result=ok
  else
    result="CRASH (exit $status; input in $crashes/, log $log)"
    failed=1
  fi
  printf '%-18s %8s %12s %10s %8s  %s\n' "$target" "$seconds" "$executions" "$runtime" "$files" "$result"
  if [ "$status" -ne 0 ]; then grep -E 'ERROR|SUMMARY|runtime error|==[0-9]+==' "$log" | head -5 >&2 || true; fi
done
exit "$failed"
