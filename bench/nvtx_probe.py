"""One un-captured Engine run (DDGAN-4, batch 1) for `ncu --nvtx`: every kernel it launches sits
inside the fastsample ranges "run" > "step k" > "net". Run under ncu by bench/gpu_runtime.sh:

    ncu --nvtx --nvtx-include "fastsample@run/" --clock-control none \
        --metrics gpu__time_duration.sum python bench/nvtx_probe.py
"""

import torch

from fastsample.models.registry import released_checkpoint
from fastsample.runtime import Engine

if __name__ == "__main__":
    eng = Engine.from_checkpoint(released_checkpoint("ddgan"), "posterior", batch=1,
                                 device="cuda", cuda_graph=False, noise="philox", warmup=1)
    eng.sample(0)
    torch.cuda.synchronize()
    print(f"{eng}: one sample, nfe={eng.nfe}")
