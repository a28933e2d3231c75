#!/usr/bin/env bash
# One device call for the runtime issue (#8) and export (#6) on a lent GPU: the gpu-marked
# tests, the latency benches, and the NVTX attribution of the Engine's kernels by ncu.
# Usage (from the repo root on the device): OUT=$OUT bash bench/gpu_runtime.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; git log -1 --format=%H 2>/dev/null; } 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime.py tests/test_export.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 -m pytest --benchmark -q -p no:cacheprovider bench/test_latency_runtime.py bench/test_latency.py \
  --benchmark-json="$OUT/latency.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/latency.log" | tail -40
ncu --nvtx --nvtx-include "fastsample@run/" --clock-control none --metrics gpu__time_duration.sum \
  python3 bench/nvtx_probe.py > "$OUT/ncu_nvtx.txt" 2>&1; echo "ncu rc=$?"; head -60 "$OUT/ncu_nvtx.txt"
# Serving (issue 19): the load test on the ONNX backend (CPU floor) and on the Engine backend on
# CUDA (one CUDA graph per request size). Needs the serve extra (fastapi, uvicorn,
# prometheus-client: put their wheels in .whl/); skipped otherwise.
python3 -m pytest --benchmark -q -s -p no:cacheprovider bench/test_serving.py \
  --benchmark-json="$OUT/serving-onnx-cpu.json" 2>&1 | tee "$OUT/serving-onnx-cpu.log" | tail -70
SERVING_BACKEND=engine SERVING_DEVICE=cuda python3 -m pytest --benchmark -q -s -p no:cacheprovider \
  bench/test_serving.py --benchmark-json="$OUT/serving-engine-cuda.json" 2>&1 \
  | tee "$OUT/serving-engine-cuda.log" | tail -70
