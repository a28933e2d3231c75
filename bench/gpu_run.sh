#!/usr/bin/env bash
# One call on a lent GPU machine: environment, gpu-marked tests, kernel benches.
# Usage (device tool): bash bench/gpu_run.sh   — writes logs + JSON under $OUT.
set -u
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  date -u
} 2>&1 | tee "$OUT/env.txt"
# The measured copy ceiling (bytes read + written) that the kernel GB/s are compared against too.
python3 - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import torch
x = torch.empty(1 << 28, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(True), torch.cuda.Event(True)
torch.cuda.synchronize(); s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
t = s.elapsed_time(e) / 20 / 1e3
print(f"measured device copy: {2 * x.numel() * 4 / t / 1e12:.3f} TB/s (read+write)")
PY
python3 -m pytest ${GPU_TESTS:-tests/test_kernels.py tests/test_nets.py} -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
python3 -m pytest --benchmark ${GPU_BENCH:-bench/test_kernels.py} -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,rounds 2>&1 | tee "$OUT/bench.log" | tail -80
