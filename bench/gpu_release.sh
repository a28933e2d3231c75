#!/usr/bin/env bash
# One call on a lent GPU machine: train every released checkpoint side by side (make checkpoints
# with DEVICE=cuda), run the gpu-marked tests, then the end-to-end sampling bench (kernels on/off)
# against the fresh checkpoints. Everything comes back under $OUT (checkpoints as one tarball).
set -u
OUT=${OUT:-/tmp/fastsample-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
( timeout ${TRAIN_TIMEOUT:-400} python3 -m fastsample.train.release --device cuda --jobs 7 \
    --commit "${FASTSAMPLE_COMMIT:-unknown}" > "$OUT/release.log" 2>&1; echo "release rc=$?" >> "$OUT/release.log" ) &
train_pid=$!
python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
wait $train_pid
tail -12 "$OUT/release.log"
tar czf "$OUT/checkpoints.tgz" checkpoints runs/release/*/train_log.jsonl runs/release/*/stdout.log 2>/dev/null
python3 -m pytest --benchmark bench/test_sampling_speed.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/sampling_speed.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/speed.log" | tail -25
