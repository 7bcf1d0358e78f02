#!/usr/bin/env bash
# The GPU run of issue 11 (dense int8/int4 path, decode attention configs, engine end to end),
# one script, every step under `timeout`, logs and JSON in $OUT (default ./gpu_out).
#
#   scripts/gpu_check_engine.sh          # on an H100 / H200: ~5-6 minutes expected (the
#                                        # caps below add up to 500 s at worst)
#   scripts/gpu_check_engine.sh --tiny   # on CPU: the same steps at tiny shapes (a dry run)
#
# Steps (a failing step is logged and the next one still runs; the exit status is the number
# of failed steps):
#   0. (--tiny only) scripts/compile_check_sm90.py: the kernels compiled for sm_90, no GPU
#   1. gpu tests: whole-engine greedy tokens triton == torch, dense kernels and GQA 48/8
#      attention at real shapes, CUDA-graph replays of the decode runner
#   2. tune the dense GEMV/GEMM and decode attention configs -> local_backend/kernels/configs/
#      (copied to $OUT/configs: commit them from there)
#   3. the engine bench with those configs -> $OUT/engine_decode.json, $OUT/benchmarks.md
# Separate from scripts/gpu_check_kernels.sh (issue 10's MoE kernels).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-python}"
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
mkdir -p "$OUT"
SUMMARY="$OUT/engine_summary.txt"
: >"$SUMMARY"
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run under timeout, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [[ $rc -ne 0 ]] && FAILED=$((FAILED + 1))
  echo "   $name: exit $rc after $((SECONDS - start))s" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
}

if [[ $TINY -eq 1 ]]; then
  # the kernels compiled for sm_90 by triton's own ptxas: what the interpreter cannot check
  step compile_sm90 240 env -u TRITON_INTERPRET "$PYTHON" scripts/compile_check_sm90.py
  export TRITON_INTERPRET=1
  step engine_tests 300 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_dense_quant.py tests/kernels/test_launch_configs.py \
    tests/kernels/test_engine_gpu.py -k "not tuner"
  step tune 300 "$PYTHON" bench/tune_kernels.py --tiny --formats int8 \
    --out "$OUT/configs" --summary "$OUT/tune.json"
  step engine_bench 300 "$PYTHON" bench/engine_decode.py --tiny --formats int4 \
    --no-write --json "$OUT/engine_decode.json"
else
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  "$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name())" >"$OUT/versions.txt" 2>&1
  step engine_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/kernels/test_engine_gpu.py tests/kernels/test_dense_quant.py \
    tests/kernels/test_launch_configs.py tests/local/test_decode_runner.py
  step tune_dense 100 "$PYTHON" bench/tune_kernels.py --kernels dense --budget-s 80 \
    --summary "$OUT/tune_dense.json"
  step tune_attention 50 "$PYTHON" bench/tune_kernels.py --kernels attention --budget-s 35 \
    --summary "$OUT/tune_attention.json"
  cp -r local_backend/kernels/configs "$OUT/configs" 2>/dev/null
  step engine_bench 200 "$PYTHON" bench/engine_decode.py --repeats 2 \
    --json "$OUT/engine_decode.json"
  cp docs/benchmarks.md "$OUT/benchmarks.md"
fi
echo "failed steps: $FAILED (logs in $OUT)" | tee -a "$SUMMARY"
exit "$FAILED"
