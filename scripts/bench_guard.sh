# Sourced by scripts/bench_*.sh first thing: takes --save FILE and --compare REF out of the arguments,
# runs the rest of the script with its output also written to a file, and then keeps it (--save) or
# prints it against the reference with every moved figure's ratio (--compare; scripts/bench_guard.py).
if [ -z "${NEVA_BENCH_GUARDED:-}" ]; then
  guard_save="" guard_compare="" guard_args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --save) guard_save="$2"; shift 2 ;;
      --compare) guard_compare="$2"; shift 2 ;;
      *) guard_args+=("$1"); shift ;;
    esac
  done
  if [ -n "$guard_save$guard_compare" ]; then
    [ -z "$guard_compare" ] || [ -f "$guard_compare" ] || { echo "$(basename "$0"): --compare $guard_compare: no such file" >&2; exit 2; }
    guard_out="$(mktemp --suffix=.txt)"
    NEVA_BENCH_GUARDED=1 bash "$0" "${guard_args[@]}" | tee "$guard_out"
    guard_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    [ -z "$guard_save" ] || python3 "$guard_root/scripts/bench_guard.py" save "$guard_out" "$guard_save"
    if [ -n "$guard_compare" ]; then
      echo "against $guard_compare:"
      python3 "$guard_root/scripts/bench_guard.py" compare "$guard_out" "$guard_compare"
    fi
    exit 0
  fi
  set -- "${guard_args[@]}"
fi
