"""Shared bench fixtures: the device, its peak memory bandwidth, and one timing helper that
every bench uses so that all results carry the same extra_info (device, dtype, shape, bytes,
GB/s, fraction of peak, implementation)."""

from __future__ import annotations

import pytest
import torch

# Peak DRAM bandwidth in bytes/s, keyed by a substring of torch.cuda.get_device_name(), most
# specific first (vendor datasheets). Unknown devices and CPUs get None.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),            # SXM / HBM3 (PyTorch reports "NVIDIA H100 80GB HBM3")
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
)

# Launches per timed round: amortises the one synchronize each round needs.
LAUNCHES_PER_ROUND = 20


def peak_bandwidth(name: str) -> float | None:
    for key, peak in PEAK_BANDWIDTH:
        if key in name:
            return peak
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()})"


@pytest.fixture
def run_bench(benchmark, device, device_name):
    """run_bench(fn, bytes_moved, impl, dtype, shape): times LAUNCHES_PER_ROUND calls of fn per
    round (synchronised inside the timed callable on CUDA) and records the per-call numbers."""
    def run(fn, bytes_moved: int, impl: str, dtype: torch.dtype, shape, rounds: int | None = None,
            calls_per_fn: int = 1):
        rounds = rounds or (20 if device.type == "cuda" else 5)
        def loop():
            for _ in range(LAUNCHES_PER_ROUND):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        # warm-up and compilation stay outside the timed rounds
        loop()
        benchmark.pedantic(loop, warmup_rounds=3, rounds=rounds, iterations=1)
        # calls_per_fn > 1: fn replays a CUDA graph holding that many calls
        seconds = benchmark.stats.stats.median / LAUNCHES_PER_ROUND / calls_per_fn
        gbps = bytes_moved / seconds / 1e9
        peak = peak_bandwidth(device_name) if device.type == "cuda" else None
        benchmark.extra_info.update(
            device=device_name, impl=impl, dtype=str(dtype).replace("torch.", ""),
            shape=list(shape), bytes_moved=int(bytes_moved), us_per_call=seconds * 1e6,
            achieved_GBps=gbps, fraction_of_peak=(gbps * 1e9 / peak) if peak else None,
            launches_per_round=LAUNCHES_PER_ROUND * calls_per_fn)
    return run
