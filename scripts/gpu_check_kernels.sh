#!/usr/bin/env bash
# The GPU checks of the kernels, one step per function, each under `timeout`, every log and
# JSON under $OUT (default ./gpu_out). Run from anywhere; works in the repository root.
#
#   scripts/gpu_check_kernels.sh                       # every default step, on a CUDA GPU
#   scripts/gpu_check_kernels.sh --steps env,tests,tune
#   scripts/gpu_check_kernels.sh --steps bench         # a second call (see Time below)
#   scripts/gpu_check_kernels.sh --tiny                # CPU interpreter, tiny shapes (minutes)
#
# Steps (DEFAULT_STEPS; add one by defining step_<name> and listing it there):
#   env    GPU, driver, torch and triton versions                      -> env.txt
#   tests  pytest -m gpu over tests/kernels (tiny: the packed CPU tests) -> pytest_gpu.{log,xml}
#   tune   scripts/tune_moe.py: the launch-config sweep, JSON per device and shape
#                                                    -> configs/*.json, tune.log, tune_log.json
#          (on a GPU also written to local_backend/kernels/configs/, where the kernels read
#          them; commit $OUT/configs/*.json there after the run)
#   bench  bench/moe_kernels.py: MoE layer at M = 1 ... 4096, bf16 / int8 / int4, fused vs
#          torch, share of peak HBM bandwidth            -> moe_kernels.json, bench.log,
#          benchmarks.md (the docs file with the new section; copy it to docs/ after the run)
#   summary  (always last) each step's exit status       -> steps.json
#
# Time (GPU defaults, seconds; each overridable by the environment variable named):
#   tests TESTS_TIMEOUT=200, tune TUNE_BUDGET_S=240 inside TUNE_TIMEOUT=330,
#   bench BENCH_TIMEOUT=240 (BENCH_ARGS="--no-layer --budget-ms 400").
# One command on the lent machine may run 600 s: run "--steps env,tests,tune" (<= ~9 min)
# and "--steps bench" (<= 4 min) as two calls, and between them copy the first call's
# $OUT/configs/*.json into local_backend/kernels/configs/ of the working tree (each call starts
# with an empty $OUT; the bench reads the packaged configs and those in $OUT/configs).
# A step that fails or times out is recorded and the next one still runs.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
TINY=0
DEFAULT_STEPS="env,tests,tune,bench"
STEPS="$DEFAULT_STEPS"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --steps) STEPS="$2"; shift ;;
    --steps=*) STEPS="${1#--steps=}" ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then :
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
else PYTHON="$(command -v python3 || command -v python)"; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: steps change directory
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
declare -A STATUS=()

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run.log"; }

# run NAME TIMEOUT_S CMD...: the command under `timeout`, its output in $OUT/NAME.log
run() {
  local name="$1" limit="$2"; shift 2
  log "$name: $* (timeout ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (timed out)')"
  return $rc
}

step_env() {
  {
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
    "$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", p.total_memory / 2**30)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

step_tests() {
  if [ "$TINY" = 1 ]; then
    run pytest_gpu "${TESTS_TIMEOUT:-300}" "$PYTHON" -m pytest -q -p no:cacheprovider \
      --junitxml="$OUT/pytest_gpu.xml" tests/kernels/test_packed_layout.py \
      tests/kernels/test_packed_moe.py
  else
    run pytest_gpu "${TESTS_TIMEOUT:-200}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
      --junitxml="$OUT/pytest_gpu.xml" tests/kernels
  fi
}

step_tune() {
  mkdir -p "$OUT/configs"
  if [ "$TINY" = 1 ]; then
    run tune "${TUNE_TIMEOUT:-300}" "$PYTHON" scripts/tune_moe.py --tiny \
      --out-dir "$OUT/configs" --log "$OUT/tune_log.json"
  else
    run tune "${TUNE_TIMEOUT:-330}" "$PYTHON" scripts/tune_moe.py \
      --budget-s "${TUNE_BUDGET_S:-240}" --out-dir local_backend/kernels/configs \
      --log "$OUT/tune_log.json"
    local rc=$?
    cp local_backend/kernels/configs/*.json "$OUT/configs/" 2>/dev/null
    return $rc
  fi
}

step_bench() {
  if [ "$TINY" = 1 ]; then
    (cd bench && run bench "${BENCH_TIMEOUT:-300}" "$PYTHON" moe_kernels.py --tiny --no-doc \
      --no-layer --out "$OUT" --configs "$OUT/configs")
  else
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    (cd bench && run bench "${BENCH_TIMEOUT:-240}" "$PYTHON" moe_kernels.py --out "$OUT" \
      --configs "$OUT/configs" ${BENCH_ARGS:---no-layer --budget-ms 400})
    local rc=$?
    cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
    return $rc
  fi
}

step_summary() {
  local first=1
  {
    echo "{"
    echo "  \"tiny\": $TINY,"
    echo "  \"steps\": {"
    for name in "${!STATUS[@]}"; do
      [ $first = 1 ] || echo ","
      first=0
      printf '    "%s": %s' "$name" "${STATUS[$name]}"
    done
    echo ""
    echo "  }"
    echo "}"
  } > "$OUT/steps.json"
  cat "$OUT/steps.json"
}

log "gpu_check_kernels: steps=$STEPS tiny=$TINY out=$OUT python=$PYTHON"
failed=0
IFS=',' read -r -a wanted <<< "$STEPS"
for name in "${wanted[@]}"; do
  if ! declare -F "step_$name" >/dev/null; then
    log "unknown step: $name"
    STATUS[$name]=127
    failed=1
    continue
  fi
  "step_$name"
  rc=$?
  STATUS[$name]=$rc
  [ $rc -eq 0 ] || failed=1
done
step_summary
exit $failed
