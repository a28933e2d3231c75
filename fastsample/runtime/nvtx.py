"""NVTX ranges in the "fastsample" domain, or nothing when the `nvtx` package is absent.

Ranges are host-side markers: Nsight Systems / Nsight Compute (`ncu --nvtx`) attribute the
kernels launched inside a range to it. Inside a CUDA-graph replay the whole run is one launch,
so per-step ranges exist only on the un-captured path; the replay itself gets one range.
FASTSAMPLE_NVTX=0 turns them off (they cost ~1 us each).
"""

from __future__ import annotations

import contextlib
import os

DOMAIN = "fastsample"

try:
    import nvtx as _nvtx
except ImportError:          # the nvtx wheel is optional at run time
    _nvtx = None


def available() -> bool:
    return _nvtx is not None and os.environ.get("FASTSAMPLE_NVTX", "1") != "0"


_NULL = contextlib.nullcontext()


def annotate(name: str, color: str = "blue"):
    """Context manager: an NVTX push/pop range `name` in the fastsample domain (or a no-op)."""
    if not available():
        return _NULL
    return _nvtx.annotate(name, color=color, domain=DOMAIN)
