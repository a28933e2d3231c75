"""Kernel benches: the fused step kernels and GroupNorm+SiLU against their eager twins and
torch.compile(twin). Reported as GB/s from the bytes each op must move (the floor for these
memory-bound ops) and as a fraction of the device's peak bandwidth (bench/conftest.py).

On CPU only the twin and compiled twin run, at the small sizes (the interpreter is no bench).
End-to-end sampler timing lives elsewhere.
"""

import math

import pytest
import torch

from fastsample.kernels._triton import HAS_TRITON, INTERPRETED
from fastsample.kernels.affine import (affine1_noise_, affine1_noise_ref, affine2_noise_,
                                       affine2_noise_ref)
from fastsample.kernels.group_norm import group_norm_silu_ref, group_norm_silu_triton

CUDA = torch.cuda.is_available()
IMPLS = ["triton", "triton-graph", "eager", "compile"]

# A half step of cld.md sec. 5.3 (b = 0.1) and its noise Cholesky factor.
T_STEP = (0.9824769037, -0.3274923012, 0.08187307531, 0.6549846025)
K_STEP = (0.08903, -0.30117, 0.20628)


def _skip_unless_runnable(impl: str, numel: int) -> None:
    if impl.startswith("triton") and not (CUDA and HAS_TRITON and not INTERPRETED):
        pytest.skip("the Triton kernel is benched on CUDA only")
    if not CUDA and numel > (1 << 20):
        pytest.skip("large sizes are benched on CUDA only")


_compiled = {}


def _pick(impl: str, kernel, twin):
    if impl.startswith("triton"):
        return kernel
    if impl == "eager":
        return twin
    if twin not in _compiled:
        _compiled[twin] = torch.compile(twin)
    return _compiled[twin]


GRAPH_CALLS = 20


def _graphed(step):
    """GRAPH_CALLS calls of `step` captured in one CUDA graph: replaying it measures the device
    time of the kernels without the host's per-launch cost (what the runtime Engine gets)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            step()
    return g.replay


def _try_run(run_bench, fn, nbytes, impl, dtype, shape):
    if impl == "triton-graph":
        run_bench(_graphed(fn), nbytes, impl=impl, dtype=dtype, shape=shape,
                  calls_per_fn=GRAPH_CALLS)
        return
    try:
        run_bench(fn, nbytes, impl=impl, dtype=dtype, shape=shape)
    except Exception as exc:
        if impl != "compile":
            raise
        # a compile failure is a result to record (the skip reason), not a crash
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")


STEP_SHAPES = [pytest.param((1, 3, 32, 32), id="b1"), pytest.param((16, 3, 32, 32), id="b16"),
               pytest.param((256, 3, 32, 32), id="b256"), pytest.param((1 << 26,), id="2^26")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_sscs_step(run_bench, device, impl, shape):
    numel = math.prod(shape)
    _skip_unless_runnable(impl, numel)
    dtype = torch.float32
    x, v, alpha = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    seed = torch.tensor([1], dtype=torch.int64, device=device)
    step = _pick(impl, affine2_noise_, affine2_noise_ref)
    # read x, v, alpha; write x, v
    nbytes = 5 * numel * x.element_size()
    _try_run(run_bench, lambda: step(x, v, alpha, 0.95, -0.1, T_STEP, K_STEP, seed, 0),
             nbytes, impl=impl, dtype=dtype, shape=shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_ddgan_posterior_step(run_bench, device, impl, shape):
    numel = math.prod(shape)
    _skip_unless_runnable(impl, numel)
    dtype = torch.float32
    x_t, x0 = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    seed = torch.tensor([1], dtype=torch.int64, device=device)
    step = _pick(impl, affine1_noise_, affine1_noise_ref)
    # read x_t, x0'; write x_t
    nbytes = 3 * numel * x_t.element_size()
    _try_run(run_bench, lambda: step(x_t, x0, 0.6, 0.3, 0.2, seed, 0),
             nbytes, impl=impl, dtype=dtype, shape=shape)


GN_SHAPES = [pytest.param((n, c, hw, hw), id=f"n{n}-{c}ch@{hw}")
             for n in (1, 16, 256) for c, hw in ((64, 32), (128, 16))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_norm_silu(run_bench, device, impl, dtype, shape):
    N, C = shape[:2]
    numel = math.prod(shape)
    _skip_unless_runnable(impl, numel)
    if not CUDA and N > 16:
        pytest.skip("batch 256 is benched on CUDA only")
    x = torch.randn(shape, device=device, dtype=dtype)
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    sc, sh = (torch.randn(N, C, device=device, dtype=dtype) for _ in range(2))
    gn = _pick(impl, group_norm_silu_triton, group_norm_silu_ref)
    # read x, write y (scale/shift/weight/bias are N*C + 2C values, counted too)
    nbytes = 2 * numel * x.element_size() + 2 * N * C * sc.element_size() + 2 * C * 4
    _try_run(run_bench, lambda: gn(x, 32, w, b, sc, sh), nbytes, impl=impl, dtype=dtype,
             shape=shape)
