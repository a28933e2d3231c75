"""Triton plumbing shared by every fused op: the optional import, op registration, launch checks,
and the in-kernel Philox normals (plus `philox_normal`, which hands the same normals to a twin).

Noise mapping (the one contract every noisy kernel and `philox_normal` follow):

    counter(i) = offset + i                     (int64; i = flat element index, 0..numel-1)
    r0, r1, _, _ = Philox4x32-10(key = seed, counter = (lo32(counter), hi32(counter), 0, 0))
    n0, n1 = Box-Muller(uniform(r0), uniform(r1))   ->  stream 0 is n0, stream 1 is n1

This is exactly `tl.randn4x(seed, offset + i)[:2]` of triton >= 3.x where int64 offsets feed the
high counter word; we spell it out with `tl.philox` so the mapping cannot drift with the Triton
version (an int64 offset never wraps at 2^32). A step touching `numel` elements consumes the
counters [offset, offset + numel), so a sampler advances `offset` by `numel` per noisy launch.
`seed` is a one-element int64 tensor on the device so that a captured CUDA graph can be replayed
with a new seed by writing into it; `offset` is a python int, a per-step constant.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a linux-only dependency
    triton = None
    tl = None
    HAS_TRITON = False

# Kernels are decorated at import time; under TRITON_INTERPRET=1 they become interpreted
# functions that run on CPU tensors, which torch's tracing wrappers cannot see through.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#-----------------------------------------------------------------------------------------------
# Registration with torch.library.

_DIRECT = threading.local()


def _direct_ok(args) -> bool:
    """True when nothing is tracing this call: then the raw kernel can be launched directly.

    Going through the registered op costs the dispatcher plus wrap_triton's higher-order op:
    ~60-80 us per call on the H100 host we measured, several times the kernel itself at sampler
    sizes. Under torch.compile / torch.export / make_fx (dynamo, a dispatch mode, or fake and
    functional tensor subclasses) the op path is kept, so those can still carry the kernel."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(a) in (torch.Tensor, torch.nn.Parameter)
               for a in args if isinstance(a, torch.Tensor))


def register_op(name: str, mutates_args, fake):
    """Register `fn` as fastsample::<name>: a triton_op (traceable by compile/export/AOTInductor)
    on real Triton; under the interpreter an opaque custom_op, because torch's wrap_triton hands
    interpreted kernels back unwrapped and they cannot run on fake/functional tensors.

    Returns a callable that launches `fn` with the raw kernels when nothing traces the call
    (see _direct_ok) and calls the registered op otherwise; `.op` is the op itself."""
    def dec(fn):
        qualname = f"fastsample::{name}"
        if HAS_TRITON and not INTERPRETED:
            op = torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
        # triton_op traces fn itself as its fake impl; an explicit one is cheaper and works
        # for the interpreter too.
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            if not _direct_ok(args):
                return op(*args)
            _DIRECT.on = True
            try:
                return fn(*args)
            finally:
                _DIRECT.on = False

        call.op = op
        return call
    return dec


def wrap(kernel):
    """wrap_triton where tracing can use it (it returns interpreted kernels unchanged); the
    raw kernel on the direct eager path."""
    if getattr(_DIRECT, "on", False):
        return kernel
    return torch.library.wrap_triton(kernel)


#-----------------------------------------------------------------------------------------------
# Launch checks shared by the launchers (the twins share the shape/dtype checks, not these).

def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; set FASTSAMPLE_KERNELS=torch")
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError(
                f"{op}: the Triton kernel got a CPU tensor; use CUDA tensors, or "
                f"FASTSAMPLE_KERNELS=torch, or set TRITON_INTERPRET=1 before importing fastsample")
        if not t.is_contiguous():
            raise ValueError(f"{op}: tensors must be contiguous, got strides {t.stride()}")


def check_seed(op: str, seed: torch.Tensor | None, like: torch.Tensor, offset: int) -> None:
    if seed is None:
        raise ValueError(f"{op}: noise is on (a nonzero noise coefficient) but seed is None")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"{op}: seed must be a one-element int64 tensor, got "
                         f"{getattr(seed, 'dtype', type(seed))} with "
                         f"{getattr(seed, 'numel', lambda: '?')()} elements")
    if seed.device != like.device:
        raise ValueError(f"{op}: seed is on {seed.device} but the data is on {like.device}; "
                         f"keep the seed on the device (CUDA graphs replay it from there)")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{op}: offset must be a non-negative python int, got {offset!r}")


#-----------------------------------------------------------------------------------------------
# In-kernel Philox normals and the standalone stream generator.

if HAS_TRITON:
    @triton.jit
    def normal_pair(seed, counter):
        """Two independent N(0,1) blocks for int64 `counter` (see the module docstring)."""
        c0 = counter.to(tl.uint32)
        c1 = (counter >> 32).to(tl.uint32)
        zero = c0 * 0
        r0, r1, _, _ = tl.philox(seed, c0, c1, zero, zero)
        return tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0),
                                         tl.uint_to_uniform_float(r1))

    @triton.jit
    def _philox_normal_kernel(
        Out,                    # (numel,) float32 output
        Seed,                   # (1,) int64 seed on the device
        offset,                 # first Philox counter
        numel,
        STREAM: tl.constexpr,   # 0 -> n0, 1 -> n1
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        n0, n1 = normal_pair(tl.load(Seed), offset + i)
        if STREAM == 0:
            n = n0
        else:
            n = n1
        tl.store(Out + i, n, mask=mask)


def _philox_normal_fake(numel: int, seed: torch.Tensor, offset: int, stream: int) -> torch.Tensor:
    return seed.new_empty((numel,), dtype=torch.float32)


@register_op("philox_normal", mutates_args=(), fake=_philox_normal_fake)
def philox_normal(numel: int, seed: torch.Tensor, offset: int, stream: int) -> torch.Tensor:
    """The normals that a fused kernel launched with (seed, offset) injects as noise `stream`
    (0 or 1), as a float32 vector of `numel` on seed's device; feed them to a twin's `noise=`."""
    if stream not in (0, 1):
        raise ValueError(f"philox_normal: stream must be 0 or 1, got {stream!r}")
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"philox_normal: numel must be a non-negative int, got {numel!r}")
    check_seed("philox_normal", seed, seed, offset)
    check_launchable("philox_normal", seed)
    out = torch.empty(numel, dtype=torch.float32, device=seed.device)
    if numel:
        BLOCK = 1024
        wrap(_philox_normal_kernel)[(triton.cdiv(numel, BLOCK),)](
            out, seed, offset, numel, STREAM=stream, BLOCK=BLOCK)
    return out
