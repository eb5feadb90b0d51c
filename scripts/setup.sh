#!/usr/bin/env bash
# One idempotent setup for neva, then an optional action.
#
#   scripts/setup.sh            set up and build only
#   scripts/setup.sh run [ARGS] set up, build, then `neva-run demo ARGS` (the embedded default recipe)
#   scripts/setup.sh test       set up, build, then run the whole test suite (ctest)
#
# NEVA_SANITIZE=address,undefined scripts/setup.sh test builds into build-asan with neva's code under
# ASan and UBSan (LibTorch is not instrumented) and runs the suite there.
#
# Steps, each skipped when already done:
#   1. Debian packages (apt-get; as root or through sudo)
#   2. .venv with exactly the wheels of scripts/requirements.lock (every package, transitive ones
#      included, at one version and SHA-256; scripts/lock_requirements.sh makes it from the pins in
#      scripts/requirements.txt). Wheels are downloaded once into a per-user cache keyed by the lock
#      ($NEVA_CACHE, default ~/.cache/neva), so a fresh clone on a machine that already ran this
#      installs offline in about a minute.
#   3. CMake configure (Ninja, ccache, precompiled headers) into build/, and build.
# A second run with nothing changed finishes in seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
action="${1:-build}"
[ $# -gt 0 ] && shift

say() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. Debian packages ---------------------------------------------------------------------------
# Keep in sync with third_party_notes.md.
apt_packages=(
  build-essential cmake ninja-build ccache git python3-venv pkg-config
  libtomlplusplus-dev doctest-dev libboost-dev libboost-filesystem-dev
  nlohmann-json3-dev libgloo-dev libcli11-dev libpcre2-dev libsentencepiece-dev libjpeg-dev libpng-dev libssl-dev
  libprotobuf-dev protobuf-compiler libcairo2-dev fonts-dejavu-core prometheus-cpp-dev libopenblas-dev
  clang libclang-rt-14-dev
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. Python venv with pinned wheels --------------------------------------------------------------
python="${NEVA_PYTHON:-python3}"
venv="$root/.venv"
pytag="$("$python" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')"
req="$root/scripts/requirements.lock"
if [ "$pytag" != "cp311-x86_64" ]; then
  say "scripts/requirements.lock holds wheels for CPython 3.11 on x86-64 (Debian 12's python3); $python is $pytag."
  say "Use such a python (NEVA_PYTHON=...), or regenerate the lock with it: scripts/lock_requirements.sh"
  exit 2
fi
reqkey="$(sha256sum < "$req" | cut -c1-16)"
stamp="$venv/.neva-requirements-$reqkey-$pytag"
if [ ! -f "$stamp" ]; then
  # One wheelhouse per Python; pip download skips wheels already there, so changing a pin fetches
  # only what changed.
  cache="${NEVA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neva}"
  wheelhouse="$cache/wheels/$pytag"
  if [ ! -f "$wheelhouse/.complete-$reqkey" ]; then
    say "downloading pinned wheels into $wheelhouse (once per machine and pin set)"
    mkdir -p "$wheelhouse"
    "$python" -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps -r "$req" -d "$wheelhouse"
    touch "$wheelhouse/.complete-$reqkey"
  fi
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  say "installing pinned wheels into .venv from $wheelhouse"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --require-hashes --no-deps \
    --find-links "$wheelhouse" -r "$req"
  rm -f "$venv"/.neva-requirements-*
  touch "$stamp"
fi

# --- 3. Configure and build -------------------------------------------------------------------------
sanitize="${NEVA_SANITIZE:-}"
build="${NEVA_BUILD_DIR:-$root/build${sanitize:+-asan}}"
if [ ! -f "$build/build.ninja" ]; then
  # torch/share/cmake, found without importing torch (fast, and quiet about optional modules).
  torch_prefix="$("$venv/bin/python" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torch").origin).parent / "share" / "cmake")')"
  say "configuring $build"
  cmake -S "$root" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE="${NEVA_BUILD_TYPE:-Release}" \
    -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DNEVA_PYTHON="$venv/bin/python" -DNEVA_SANITIZE="$sanitize" >/dev/null
fi
cmake --build "$build" -- -j"${NEVA_JOBS:-$(nproc)}" | { grep -vE '^\[[0-9]+/[0-9]+\]' || true; }

case "$action" in
  build) ;;
  run) exec "$build/bin/neva-run" demo "$@" ;;
  test)
    if [ -n "$sanitize" ]; then  # PyTorch's ASAN CI options (LibTorch keeps process-lifetime allocations)
      # allocator_may_return_null: a huge allocation fails as it does without ASan (LibTorch throws),
      # which the tests of allocation errors check.
      export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:symbolize=1:detect_stack_use_after_return=true:strict_init_order=true:detect_odr_violation=1:detect_container_overflow=0:check_initialization_order=true:allocator_may_return_null=1}"
      export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
    fi
    # ctest runs tests side by side (and the distributed ones start several processes each) on few
    # cores: OpenMP threads that sleep at once between parallel regions leave the cores to the others
    # instead of spinning on them. neva-run alone keeps libgomp's default (a short spin; docs/benchmarks.md).
    export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
    cd "$build" && exec ctest --output-on-failure -j"${NEVA_JOBS:-$(nproc)}" "$@" ;;
  *) say "unknown action '$action' (expected: build, run, test)"; exit 2 ;;
esac
