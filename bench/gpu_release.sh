#!/usr/bin/env bash
# One call on a lent GPU machine: train the released set side by side with `make checkpoints`'
# defaults (DEVICE=cuda), and the four digits models again with a larger step budget, both
# bounded by --max-minutes; run the gpu-marked tests meanwhile. Checkpoints come back as two
# tarballs under $OUT (fp16 storage, cards with the exact command).
set -u
source "$(dirname "$0")/gpu_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
MIN=${TRAIN_MINUTES:-6}
C=${FASTSAMPLE_COMMIT:-unknown}
python3 -m fastsample.train.release --device cuda --jobs 7 --max-minutes "$MIN" --commit "$C" \
  > "$OUT/release.log" 2>&1 &
p1=$!
python3 -m fastsample.train.release --device cuda --jobs 4 --max-minutes "$MIN" --commit "$C" \
  --only ddgan:digits,cld:digits,lsgm:digits,ddpm:digits --runs runs/long --out runs/long-ckpt \
  --set ddgan:digits:train_steps=40000 --set cld:digits:train_steps=40000 \
  --set lsgm:digits:train_steps=40000 --set ddpm:digits:train_steps=40000 \
  > "$OUT/long.log" 2>&1 &
p2=$!
python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
wait $p1 $p2
tail -9 "$OUT/release.log"; tail -5 "$OUT/long.log"
tar czf "$OUT/release.tgz" checkpoints runs/release/*/train_log.jsonl runs/release/*/stdout.log 2>/dev/null
tar czf "$OUT/long.tgz" runs/long-ckpt runs/long/*/train_log.jsonl runs/long/*/stdout.log 2>/dev/null
ls -la "$OUT"
