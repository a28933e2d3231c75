"""Quick latency percentiles for the demo and ad-hoc checks (bench/ holds the real benchmarks)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def latency_ms(fn: Callable, repeat: int = 30, warmup: int = 3) -> tuple[float, float]:
    """(p50, p90) wall milliseconds of fn() after `warmup` calls (synchronised on CUDA, so a
    GPU call is timed to its end, not to its launch)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2], times[int(0.9 * (len(times) - 1))]
