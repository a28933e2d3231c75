"""Minimal-latency sampling: `Engine` (static buffers, warm-up, one CUDA graph per run, NVTX)."""

from fastsample.runtime.engine import Engine, EngineError

__all__ = ["Engine", "EngineError"]
