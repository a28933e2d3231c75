#!/usr/bin/env bash
# Last call of a lease: end-to-end sampling speed with kernels on/off against the committed
# checkpoints, then the four digits models trained with a large step budget bounded by
# --max-minutes (one CPU thread per process: the first run with 11 processes x 16 threads
# oversubscribed the host and ran at CPU speed).
set -u
source "$(dirname "$0")/gpu_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; } 2>&1 | tee "$OUT/env.txt"
python3 -m pytest --benchmark bench/test_sampling_speed.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/sampling_speed.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/speed.log" | tail -14
export OMP_NUM_THREADS=1
python3 -m fastsample.train.release --device cuda --jobs 4 --max-minutes "${TRAIN_MINUTES:-6}" \
  --commit "${FASTSAMPLE_COMMIT:-unknown}" --only ddgan:digits,cld:digits,lsgm:digits,ddpm:digits \
  --runs runs/long --out runs/long-ckpt \
  --set ddgan:digits:train_steps=30000 --set cld:digits:train_steps=30000 \
  --set lsgm:digits:train_steps=30000 --set ddpm:digits:train_steps=30000 > "$OUT/long.log" 2>&1
cat "$OUT/long.log" | cut -c1-400
tar czf "$OUT/long.tgz" runs/long-ckpt runs/long/*/train_log.jsonl runs/long/*/stdout.log 2>/dev/null
