#!/usr/bin/env bash
# Decode and prefill of a ~1.1B-parameter Llama-shaped decoder (TinyLlama-1.1B's shape, random weights
# made by scripts/bench_decode.py in Hugging Face's layout) through neva, transformers and llama.cpp in
# one sitting, against this machine's memory-bandwidth bound (bytes of weights read per token / the
# triad measured by neva-bench-machine in the same run). Run after scripts/setup.sh.
#   scripts/bench_decode.sh [PROMPT_TOKENS] [NEW_TOKENS] [--save FILE] [--compare REF]
# llama.cpp is llama-cpp-python 0.3.36 built from its sdist into .bench-venv (a bench-only venv that sees
# the project's venv for torch/transformers; never a project dependency; ~7 min to build on 2 cores);
# its GGUF files (F32, BF16) come from the converter in the same sdist. BENCH_SKIP_LLAMACPP=1 skips it.
# BENCH_PAIRS=N adds, per precision, N neva / llama.cpp decode pairs run back to back (the order
# flipping each pair), each pair's ratio and their median: the table's runs are minutes apart, and this
# VM's bandwidth drifts by a third between minutes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bench_guard.sh"  # --save FILE / --compare REF (every figure's ratio)
prompt="${1:-256}"
new="${2:-32}"
threads="${OMP_NUM_THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$threads" TRANSFORMERS_VERBOSITY=error
work="$root/build/bench-decode"
llamacpp_version=0.3.36
mkdir -p "$work"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; threads: $threads; $(date -u +%F)"

[ -f "$work/model/model.safetensors" ] || "$root/.venv/bin/python" "$root/scripts/bench_decode.py" make "$work/model" >&2
cat > "$work/neva.toml" <<'EOF'
[run]
mode = "inspect"
[model.mm_cfg.llm]
plugin = "llama"
from_pretrained = "model"
EOF

if [ -z "${BENCH_SKIP_LLAMACPP:-}" ]; then
  bench_python="$root/.bench-venv/bin/python"
  if ! "$bench_python" -c "import llama_cpp" 2> /dev/null; then
    echo "building llama-cpp-python $llamacpp_version from its sdist into .bench-venv (bench only)" >&2
    python3 -m venv "$root/.bench-venv"
    site="$("$bench_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/_neva_venv.pth"
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$bench_python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$llamacpp_version" >&2
  fi
  sdist="$work/llama_cpp_python-$llamacpp_version"
  if [ ! -f "$sdist/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    "$bench_python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llamacpp_version" -d "$work" >&2
    tar -xzf "$work/llama_cpp_python-$llamacpp_version.tar.gz" -C "$work" "llama_cpp_python-$llamacpp_version/vendor/llama.cpp"
  fi
  for type in f32 bf16; do
    [ -f "$work/model-$type.gguf" ] || PYTHONPATH="$sdist/vendor/llama.cpp/gguf-py" "$bench_python" \
      "$sdist/vendor/llama.cpp/convert_hf_to_gguf.py" "$work/model" --outtype "$type" --outfile "$work/model-$type.gguf" > /dev/null 2>&1
  done
fi

# Every engine's weights start out of the page cache and are read back the same way: how a file
# entered the cache decides its folio size (a file just written in small pieces stays in 4 KiB pages;
# one read from disk comes back in 2 MiB folios on Linux 6.18's ext4), and a mapping of 2 MiB folios
# is mapped with huge pages, which decode, streaming every weight per token, runs faster on (1.85 GB
# of the F32 GGUF huge-mapped against 0.05 GB of the just-written safetensors before this).
"$root/.venv/bin/python" - "$work"/model/*.safetensors "$work"/model-*.gguf <<'PY'
import os, sys
for path in sys.argv[1:]:
    if os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
# The limits once, right before the decoders: the triad is the bound's denominator.
limits="$("$root/build/bin/neva-bench-machine")"
echo "$limits"
triad="$(echo "$limits" | awk '/memory bandwidth/ { print $(NF-1) }')"
declare -A bytes bound
for precision in 32 bf16; do
  bytes[$precision]="$("$root/.venv/bin/python" "$root/scripts/bench_decode.py" bytes "$work/model" "$precision")"
  bound[$precision]="$(awk -v b="${bytes[$precision]}" -v t="$triad" 'BEGIN { printf "%.2f", t * 1e9 / b }')"
done
echo "weights read per decoded token: fp32 ${bytes[32]} bytes, bound ${bound[32]} tokens/s; bf16 bound ${bound[bf16]} tokens/s"
decode_rate() { awk '{ for (i = 1; i <= NF; ++i) if ($i == "decode") print $(i + 3) }'; }
fraction() {  # fraction LINE PRECISION -> the line with its decode rate as a fraction of the bound
  local rate
  rate="$(echo "$1" | decode_rate)"
  awk -v line="$1" -v rate="$rate" -v bound="${bound[$2]}" 'BEGIN { printf "%s   (%.2f of the bound)\n", line, rate / bound }'
}
neva_line() {  # neva_line PRECISION [--batch N] -> neva-bench-model's report
  "$root/build/bin/neva-bench-model" neva.toml --prompt-tokens "$prompt" --new-tokens "$new" --precision "$@"
}
llamacpp_line() {  # llamacpp_line PRECISION -> llama.cpp's line, from the GGUF of that precision
  "$root/.bench-venv/bin/python" "$root/scripts/bench_decode.py" llamacpp \
    "$work/model-$([ "$1" = bf16 ] && echo bf16 || echo f32).gguf" "$prompt" "$new" "$threads"
}
cd "$work"
for precision in 32 bf16; do
  # fp32 twice: as shipped (OpenBLAS linears in LibTorch's pool) and as before (MKL, spinning wait).
  for run in shipped before; do
    if [ "$precision" = bf16 ] && [ "$run" = before ]; then continue; fi  # bf16 products are oneDNN's either way
    if [ "$run" = before ]; then
      out="$(NEVA_CPU_BLAS=aten OMP_WAIT_POLICY=active neva_line "$precision")"
      label="neva (MKL, spinning)"
    else
      out="$(neva_line "$precision")"
      label="neva"
    fi
    fraction "$(echo "$out" | grep decode | sed "s/^neva  /$label/")" "$precision"
    if [ "$run" = shipped ]; then echo "$out" | grep -E "first token|linear layers" | sed "s/^neva  /$label/"; fi
  done
  neva_line "$precision" --batch 8 | grep decode | sed 's/^neva  /neva (batch 8)/'
  fraction "$("$root/.venv/bin/python" "$root/scripts/bench_decode.py" hf "$work/model" "$prompt" "$new" 1 "$precision")" "$precision"
  [ -n "${BENCH_SKIP_LLAMACPP:-}" ] || fraction "$(llamacpp_line "$precision")" "$precision"
done
# Alternating pairs (BENCH_PAIRS): the decode ratio that the VM's drift does not decide.
if [ "${BENCH_PAIRS:-0}" -gt 0 ] && [ -z "${BENCH_SKIP_LLAMACPP:-}" ]; then
  for precision in 32 bf16; do
    pairs=()
    for ((r = 1; r <= BENCH_PAIRS; r++)); do
      if ((r % 2)); then
        a="$(neva_line "$precision" | decode_rate)"; b="$(llamacpp_line "$precision" | decode_rate)"
      else
        b="$(llamacpp_line "$precision" | decode_rate)"; a="$(neva_line "$precision" | decode_rate)"
      fi
      pairs+=("$a/$b")
    done
    "$root/.venv/bin/python" - "$precision" "${pairs[@]}" <<'PY'
import statistics, sys
precision, pairs = sys.argv[1], [tuple(map(float, p.split("/"))) for p in sys.argv[2:]]
ratios = [a / b for a, b in pairs]
shown = ", ".join(f"{a:.2f}/{b:.2f}={a / b:.2f}x" for a, b in pairs)
print(f"pairs {precision:<4} decode neva/llama.cpp: {shown}; median {statistics.median(ratios):.2f}x")
PY
  done
fi
