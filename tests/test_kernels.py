"""Fused kernels vs. oracles: float64 closed forms, the torch twins (fed the kernel's own Philox
normals where noise matters), Monte Carlo / KS tests of the injected noise, composition laws of
the CLD linear map (reference/cld.md sec. 5), and F.group_norm for GroupNorm+SiLU.

On CPU the kernels run under the Triton interpreter (root conftest sets TRITON_INTERPRET=1), at
small irregular sizes so every mask is exercised; the `gpu` params rerun them at real sizes.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fastsample.kernels import _triton, dispatch
from fastsample.kernels._triton import HAS_TRITON, INTERPRETED, philox_normal
from fastsample.kernels.affine import (affine1_noise_, affine1_noise_ref, affine2_noise_,
                                       affine2_noise_ref)
from fastsample.kernels.group_norm import group_norm_silu_ref, group_norm_silu_triton

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp"),  # interpreter's sigmoid
]

# (device, element counts / shapes): CPU runs through the interpreter, so keep it small.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
STEP_SIZES = {"cpu": [1000, 3 * 7 * 5], "cuda": [256 * 3 * 32 * 32, 3 * 7 * 5, 1 << 22]}
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _need_launchable(request):
    dev = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") \
        else "cpu"
    if dev == "cpu" and not INTERPRETED:
        pytest.skip("CPU kernels need TRITON_INTERPRET=1 set before fastsample is imported")


def seed_t(s, device):
    return torch.tensor([s], dtype=torch.int64, device=device)


def rand(shape, dtype, device, gen, scale=1.0, loc=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc).to(
        device=device, dtype=dtype)


# Public sanity values of cld.md sec. 5.3 (defaults Minv = 4, a = 2, h = 0.05 so b = 0.1).
MINV, A_CRIT = 4.0, 2.0
T_PUBLIC = (0.9824769037, -0.3274923012, 0.08187307531, 0.6549846025)
C_PUBLIC = (0.007926331867, -0.02681280184, 0.1360455922)


def T_of_b(b, a=A_CRIT, Minv=MINV):
    """Exact A transition T(b) = e^{-ab} [[1 + ab, -Minv b], [b, 1 - ab]] (float64)."""
    e = math.exp(-a * b)
    return (e * (1 + a * b), -e * Minv * b, e * b, e * (1 - a * b))


def chol2(C):
    C_xx, C_xv, C_vv = C
    K11 = math.sqrt(C_xx)
    K21 = C_xv / K11
    return (K11, K21, math.sqrt(C_vv - K21 * K21))


def affine2_fp64(x, v, alpha, k_v, k_alpha, T, K, d_xv=0.0, n0=None, n1=None):
    x, v = x.double(), v.double()
    v_s = k_v * v + (k_alpha * alpha.double() if alpha is not None else 0.0)
    x_new = T[0] * x + T[1] * v_s + d_xv * v
    v_new = T[2] * x + T[3] * v_s
    if n0 is not None:
        x_new = x_new + K[0] * n0.double().view_as(x)
        v_new = v_new + K[1] * n0.double().view_as(x) + K[2] * n1.double().view_as(x)
    return x_new, v_new


def maxerr(a, b):
    return (a.double() - b.double()).abs().max().item()


def lowp_atol(dtype, device, ref, base):
    """The Triton interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py,
    cast_impl), where the GPU rounds to nearest: allow one bf16 ulp there, and only there."""
    if device == "cpu" and dtype == torch.bfloat16:
        return base + torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    return base


#-----------------------------------------------------------------------------------------------
# Step kernels vs twins and float64.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_alpha", [True, False])
def test_affine2_fp32_matches_twin_fed_kernel_noise(device, with_alpha):
    gen = torch.Generator().manual_seed(0)
    T, K = T_PUBLIC, chol2(C_PUBLIC)
    for n in STEP_SIZES[device]:
        x, v, al = (rand(n, torch.float32, device, gen) for _ in range(3))
        al = al if with_alpha else None
        s, off = seed_t(11, device), 123
        xk, vk, xr, vr = x.clone(), v.clone(), x.clone(), v.clone()
        affine2_noise_(xk, vk, al, 1.3, -0.7, T, K, s, off, d_xv=0.2)
        noise = (philox_normal(n, s, off, 0), philox_normal(n, s, off, 1))
        affine2_noise_ref(xr, vr, al, 1.3, -0.7, T, K, s, off, d_xv=0.2, noise=noise)
        assert maxerr(xk, xr) < 2e-6 and maxerr(vk, vr) < 2e-6
        x64, v64 = affine2_fp64(x, v, al, 1.3, -0.7, T, K, 0.2, *noise)
        assert maxerr(xk, x64) < 1e-5 and maxerr(vk, v64) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_affine2_low_precision_three_way(device, dtype):
    """|kernel - fp64| <= 2 |twin in dtype - fp64| + atol, with and without noise."""
    gen = torch.Generator().manual_seed(1)
    T, K = T_PUBLIC, chol2(C_PUBLIC)
    n = STEP_SIZES[device][0]
    x, v, al = (rand(n, dtype, device, gen) for _ in range(3))
    s, off = seed_t(5, device), 7
    noise = (philox_normal(n, s, off, 0), philox_normal(n, s, off, 1))
    for KK, nz in ((K, noise), ((0.0, 0.0, 0.0), (None, None))):
        xk, vk, xr, vr = x.clone(), v.clone(), x.clone(), v.clone()
        affine2_noise_(xk, vk, al, 0.9, 0.4, T, KK, s, off)
        affine2_noise_ref(xr, vr, al, 0.9, 0.4, T, KK, s, off,
                          noise=None if nz[0] is None else nz)
        assert xk.dtype == dtype and vk.dtype == dtype
        x64, v64 = affine2_fp64(x, v, al, 0.9, 0.4, T, KK, 0.0, *nz)
        assert maxerr(xk, x64) <= 2 * maxerr(xr, x64) + lowp_atol(dtype, device, x64, 1e-6)
        assert maxerr(vk, v64) <= 2 * maxerr(vr, v64) + lowp_atol(dtype, device, v64, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_ddgan_posterior_step(device, dtype):
    """x_{t-1} = c0 x0' + c1 x_t + sigma n (ddgan.md sec. 1), noise from the kernel's stream 0."""
    gen = torch.Generator().manual_seed(2)
    c0, c1, sigma = 0.31, 0.87, 0.42
    for n in STEP_SIZES[device]:
        x_t, x0 = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
        s, off = seed_t(3, device), 1000
        xk, xr = x_t.clone(), x_t.clone()
        affine1_noise_(xk, x0, c1, c0, sigma, s, off)
        n0 = philox_normal(n, s, off, 0)
        affine1_noise_ref(xr, x0, c1, c0, sigma, s, off, noise=(n0,))
        ref = c0 * x0.double() + c1 * x_t.double() + sigma * n0.double()
        atol = lowp_atol(dtype, device, ref, 2e-6)
        assert maxerr(xk, ref) <= 2 * maxerr(xr, ref) + atol
        # last step: sigma = 0 is the posterior mean, no seed needed
        xm = x_t.clone()
        affine1_noise_(xm, x0, c1, c0, 0.0, None, 0)
        mean = c0 * x0.double() + c1 * x_t.double()
        xmr = x_t.clone()
        affine1_noise_ref(xmr, x0, c1, c0, 0.0, None, 0)
        assert maxerr(xm, mean) <= 2 * maxerr(xmr, mean) + atol


#-----------------------------------------------------------------------------------------------
# Noise: law, determinism, and the documented counter mapping.

@pytest.mark.parametrize("device", DEVICES)
def test_injected_noise_is_standard_normal_with_chol_covariance(device):
    n = 4000 if device == "cpu" else 1 << 20
    z = torch.zeros(n, device=device)
    s = seed_t(2024, device)
    x, v = z.clone(), z.clone()
    # T = 0 and K = I expose the raw streams
    affine2_noise_(x, v, None, 1.0, 0.0, (0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 1.0), s, 0)
    for w in (x, v):
        w = w.cpu().double().numpy()
        assert abs(w.mean()) < 5 / math.sqrt(n)
        assert abs(w.var() - 1) < 5 * math.sqrt(2 / n)
        assert stats.kstest(w, "norm").pvalue > 1e-3
    corr = np.corrcoef(x.cpu().numpy(), v.cpu().numpy())[0, 1]
    assert abs(corr) < 5 / math.sqrt(n)
    # K = chol(C): the sample covariance of (x', v') is C (cld.md sec. 5.3 public value)
    x, v = z.clone(), z.clone()
    affine2_noise_(x, v, None, 1.0, 0.0, (0.0, 0.0, 0.0, 0.0), chol2(C_PUBLIC), s, n)
    cov = np.cov(np.stack([x.cpu().double().numpy(), v.cpu().double().numpy()]))
    for got, want, var_scale in ((cov[0, 0], C_PUBLIC[0], C_PUBLIC[0]),
                                 (cov[0, 1], C_PUBLIC[1], math.sqrt(C_PUBLIC[0] * C_PUBLIC[2])),
                                 (cov[1, 1], C_PUBLIC[2], C_PUBLIC[2])):
        assert abs(got - want) < 6 * var_scale * math.sqrt(2 / n)
    # affine1's noise is the same stream 0
    e = z.clone()
    affine1_noise_(e, z, 0.0, 0.0, 1.0, s, 0)
    assert torch.equal(e, philox_normal(n, s, 0, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_deterministic_and_counter_mapping(device):
    n = 777
    s = seed_t(9, device)
    a = philox_normal(n, s, 50, 1)
    assert torch.equal(a, philox_normal(n, s, 50, 1))                # same seed/offset: bits
    assert not torch.equal(a, philox_normal(n, seed_t(10, device), 50, 1))
    assert not torch.equal(a, philox_normal(n, s, 51 + n, 1))
    assert torch.equal(a[1:], philox_normal(n - 1, s, 51, 1))        # counter = offset + i
    # int64 counters: no wrap at 2^32
    assert not torch.equal(philox_normal(n, s, 1 << 32, 0), philox_normal(n, s, 0, 0))
    # the kernel's step noise is exactly these streams
    x, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    affine2_noise_(x, v, None, 1.0, 0.0, (0.0,) * 4, (1.0, 0.0, 1.0), s, 50)
    assert torch.equal(v, a) and torch.equal(x, philox_normal(n, s, 50, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_philox_mapping_equals_tl_randn4x(device):
    """The documented equivalence with triton's own randn4x (independent code path)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _randn4x_ref(Out0, Out1, Seed, offset, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        n0, n1, _, _ = tl.randn4x(tl.load(Seed), offset + i)
        tl.store(Out0 + i, n0, mask=i < numel)
        tl.store(Out1 + i, n1, mask=i < numel)

    n, s, off = 300, seed_t(77, device), 12345
    o0, o1 = torch.empty(n, device=device), torch.empty(n, device=device)
    _randn4x_ref[(triton.cdiv(n, 128),)](o0, o1, s, off, n, BLOCK=128)
    assert torch.equal(o0, philox_normal(n, s, off, 0))
    assert torch.equal(o1, philox_normal(n, s, off, 1))


#-----------------------------------------------------------------------------------------------
# Composition laws and the named entry points (through dispatch, forced to triton).

@pytest.fixture
def triton_forced(monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "triton")


@pytest.mark.parametrize("device", DEVICES)
def test_sscs_identity_linear_part_is_the_S_update(device, triton_forced):
    gen = torch.Generator().manual_seed(3)
    n = 3 * 7 * 5
    x, v, al = (rand(n, torch.float32, device, gen) for _ in range(3))
    # k_v, k_alpha of the S step (cld.md sec. 5.3) for some step
    Gamma, beta, h, SigmaRef_vv, ell = 1.0, 4.0, 0.05, 0.3, 2.2
    c = 2 * Gamma * beta * h
    k_v, k_alpha = 1 + c * (MINV - 1 / SigmaRef_vv), -c * ell
    xk, vk = x.clone(), v.clone()
    dispatch.sscs_step_(xk, vk, al, k_v, k_alpha, (1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0), None, 0)
    assert torch.equal(xk, x)
    assert maxerr(vk, k_v * v.double() + k_alpha * al.double()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_cld_linear_semigroup_and_public_values(device, triton_forced):
    """T(b) matches cld.md's public value, and A(b/2) twice == A(b) once (K = 0)."""
    assert np.allclose(T_of_b(0.1), T_PUBLIC, rtol=0, atol=1e-10)
    gen = torch.Generator().manual_seed(4)
    n = 1000
    x, v = rand(n, torch.float32, device, gen), rand(n, torch.float32, device, gen)
    x2, v2 = x.clone(), v.clone()
    for _ in range(2):
        dispatch.cld_linear_(x2, v2, T_of_b(0.05), (0.0, 0.0, 0.0), None, 0)
    x1, v1 = x.clone(), v.clone()
    dispatch.cld_linear_(x1, v1, T_of_b(0.1), (0.0, 0.0, 0.0), None, 0)
    assert maxerr(x1, x2) < 1e-5 and maxerr(v1, v2) < 1e-5
    x64, v64 = affine2_fp64(x, v, None, 1.0, 0.0, T_PUBLIC, (0, 0, 0))
    assert maxerr(x1, x64) < 1e-5 and maxerr(v1, v64) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_cld_em_step_equals_sde_drift(device, triton_forced):
    """u' = u + h drift_SDE(u) + sqrt(2 Gamma b h) [0, n], drift of cld.md sec. 4 written out."""
    gen = torch.Generator().manual_seed(5)
    n = 1000
    x, v, al = (rand(n, torch.float32, device, gen) for _ in range(3))
    h, b, Gamma, SigmaRef_vv, ell = 0.02, 4.0, 1.0, 0.4, 3.0
    s, off = seed_t(8, device), 31
    xk, vk = x.clone(), v.clone()
    coeffs = dispatch.cld_em_coeffs(h, b, MINV, Gamma, ell, SigmaRef_vv)
    dispatch.cld_em_step_(xk, vk, al, coeffs, s, off)
    X, V, AL = x.double(), v.double(), al.double()
    score = -V / SigmaRef_vv - ell * AL
    n1 = philox_normal(n, s, off, 1).double()
    x_ref = X + h * (-b * MINV * V)
    v_ref = V + h * (b * X + b * Gamma * MINV * V + 2 * Gamma * b * score) \
        + math.sqrt(2 * Gamma * b * h) * n1
    assert maxerr(xk, x_ref) < 1e-5 and maxerr(vk, v_ref) < 1e-5
    # denoising mean (noise off): x' = x - eps_s b Minv v, no seed needed
    xd, vd = x.clone(), v.clone()
    dispatch.cld_em_step_(xd, vd, al, dispatch.cld_em_coeffs(h, b, MINV, Gamma, ell,
                                                             SigmaRef_vv, noise=False), None, 0)
    assert maxerr(xd, x_ref) < 1e-5 and maxerr(vd, v_ref - math.sqrt(2 * Gamma * b * h) * n1) < 1e-5
    xn, vn = x.clone(), v.clone()
    dispatch.cld_denoise_(xn, vn, (1.0, -h * b * MINV, 0.0, 1.0))
    assert maxerr(xn, x_ref) < 1e-5 and torch.equal(vn, v)


@pytest.mark.parametrize("device", DEVICES)
def test_vp_em_step_through_dispatch(device, triton_forced):
    gen = torch.Generator().manual_seed(6)
    n = 3 * 7 * 5
    x, e = rand(n, torch.float32, device, gen), rand(n, torch.float32, device, gen)
    s = seed_t(1, device)
    xk = x.clone()
    dispatch.vp_em_step_(xk, e, 1.01, -0.05, 0.1, s, 0)
    ref = 1.01 * x.double() - 0.05 * e.double() + 0.1 * philox_normal(n, s, 0, 0).double()
    assert maxerr(xk, ref) < 1e-6


#-----------------------------------------------------------------------------------------------
# GroupNorm + scale/shift + SiLU.

GN_CASES = {
    # (shape, groups, block, split): block/split None = heuristics; small blocks force the loop
    "cpu": [((2, 6, 5, 5), 3, None, None), ((2, 6, 5, 5), 3, 16, 1), ((2, 6, 5, 5), 3, 16, 3),
            ((3, 4, 7), 2, 8, 2), ((1, 8, 3, 3), 8, None, None)],
    "cuda": [((16, 64, 32, 32), 32, None, None), ((1, 128, 16, 16), 32, None, None),
             ((1, 256, 64, 64), 32, None, None), ((4, 256, 64, 64), 8, None, None),
             ((2, 6, 5, 5), 3, 16, 3)],
}


def gn_fp64(x, G, w, b, sc, sh, eps=1e-5):
    N, C = x.shape[:2]
    h = F.group_norm(x.double(), G, None, None, eps)
    bs, ns = (1, C) + (1,) * (x.dim() - 2), (N, C) + (1,) * (x.dim() - 2)
    if w is not None:
        h = h * w.double().view(bs) + b.double().view(bs)
    if sc is not None:
        h = h * (1 + sc.double().view(ns)) + sh.double().view(ns)
    return F.silu(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("affine,modulate", [(True, True), (False, False), (True, False)])
def test_group_norm_silu_vs_fp64_three_way(device, dtype, affine, modulate):
    gen = torch.Generator().manual_seed(7)
    for shape, G, block, split in GN_CASES[device]:
        N, C = shape[:2]
        # a large common offset checks the shifted variance of the looping path
        x = rand(shape, dtype, device, gen, scale=3.0, loc=20.0)
        w = rand(C, torch.float32, device, gen) if affine else None
        b = rand(C, torch.float32, device, gen) if affine else None
        sc = rand((N, C), dtype, device, gen, 0.5) if modulate else None
        sh = rand((N, C), dtype, device, gen) if modulate else None
        yk = group_norm_silu_triton(x, G, w, b, sc, sh, block=block, split=split)
        yr = group_norm_silu_ref(x, G, w, b, sc, sh)
        ref = gn_fp64(x, G, w, b, sc, sh)
        assert yk.dtype == dtype and yk.shape == x.shape
        atol = lowp_atol(dtype, device, ref, 2e-5)
        assert maxerr(yk, ref) <= 2 * maxerr(yr, ref) + atol, (shape, G, block, split)


#-----------------------------------------------------------------------------------------------
# torch.library registration: compile, export, opcheck.

def test_ops_registered():
    for name in ("affine2_noise_", "affine1_noise_", "group_norm_silu", "philox_normal"):
        assert hasattr(torch.ops.fastsample, name)


class _Tiny(torch.nn.Module):
    def forward(self, x, e, seed):
        h = torch.ops.fastsample.group_norm_silu(x, 2, None, None, None, None, 1e-5, True,
                                                 None, None)
        out = h.clone()
        torch.ops.fastsample.affine1_noise_(out, e, seed, 0, 0.5, 0.25, 0.1)
        return out


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_and_export_carry_the_ops(device):
    gen = torch.Generator().manual_seed(8)
    x, e = (rand((2, 4, 3, 3), torch.float32, device, gen) for _ in range(2))
    s = seed_t(4, device)
    eager = _Tiny()(x, e, s)
    compiled = torch.compile(_Tiny(), backend="aot_eager", fullgraph=True)(x, e, s)
    assert torch.equal(compiled, eager)
    ep = torch.export.export(_Tiny(), (x, e, s))
    assert "fastsample.affine1_noise_" in str(ep.graph) or "fastsample::affine1" in str(ep.graph)
    assert torch.equal(ep.module()(x, e, s), eager)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_of_in_place_step(device):
    def step(x, v, alpha, seed):
        affine2_noise_(x, v, alpha, 1.1, -0.3, T_PUBLIC, chol2(C_PUBLIC), seed, 3)
        return x, v
    gen = torch.Generator().manual_seed(9)
    x, v, al = (rand(105, torch.float32, device, gen) for _ in range(3))
    s = seed_t(2, device)
    xe, ve = step(x.clone(), v.clone(), al, s)
    xc, vc = torch.compile(step, backend="aot_eager", fullgraph=True)(x.clone(), v.clone(), al, s)
    assert torch.equal(xc, xe) and torch.equal(vc, ve)


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    x, v, al = (rand(50, torch.float32, "cpu", gen) for _ in range(3))
    s = seed_t(1, "cpu")
    opcheck = torch.library.opcheck
    opcheck(torch.ops.fastsample.affine2_noise_.default,
            (x, v, al, s, 0, 1.0, 0.1, 0.9, 0.1, 0.0, 0.8, 0.0, 0.1, 0.0, 0.2))
    opcheck(torch.ops.fastsample.affine1_noise_.default, (x, al, s, 0, 0.5, 0.5, 0.1))
    opcheck(torch.ops.fastsample.group_norm_silu.default,
            (x.view(2, 5, 5), 5, None, None, None, None, 1e-5, True, None, None))
    opcheck(torch.ops.fastsample.philox_normal.default, (10, s, 0, 1))


#-----------------------------------------------------------------------------------------------
# Dispatch and bad input.

def test_dispatch_honours_env(monkeypatch):
    n = 105
    x, e, s = torch.zeros(n), torch.ones(n), seed_t(3, "cpu")
    kern, twin = x.clone(), x.clone()
    affine1_noise_(kern, e, 1.0, 1.0, 1.0, s, 0)
    affine1_noise_ref(twin, e, 1.0, 1.0, 1.0, s, 0)
    assert not torch.equal(kern, twin)           # different noise tells them apart
    for choice, want in (("triton", kern), ("torch", twin), (None, twin)):
        if choice is None:
            monkeypatch.delenv("FASTSAMPLE_KERNELS", raising=False)
        else:
            monkeypatch.setenv("FASTSAMPLE_KERNELS", choice)
        got = x.clone()
        dispatch.vp_em_step_(got, e, 1.0, 1.0, 1.0, s, 0)
        assert torch.equal(got, want), choice
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FASTSAMPLE_KERNELS"):
        dispatch.vp_em_step_(x.clone(), e, 1.0, 1.0, 1.0, s, 0)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETED", False)
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="CPU tensor.*TRITON_INTERPRET"):
        dispatch.vp_em_step_(torch.zeros(4), torch.zeros(4), 1.0, 1.0, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="CPU tensor"):
        dispatch.group_norm_silu(torch.zeros(1, 4, 2, 2), 2, None, None)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_bad_inputs(impl):
    a2 = affine2_noise_ if impl == "kernel" else affine2_noise_ref
    a1 = affine1_noise_ if impl == "kernel" else affine1_noise_ref
    gn = group_norm_silu_triton if impl == "kernel" else group_norm_silu_ref
    x, v, s = torch.zeros(10), torch.zeros(10), seed_t(0, "cpu")
    I, K = (1.0, 0.0, 0.0, 1.0), (0.1, 0.0, 0.1)
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        a2(x.double(), v.double(), None, 1.0, 0.0, I, K, s, 0)
    with pytest.raises(ValueError, match=r"v has shape \(9,\)"):
        a2(x, torch.zeros(9), None, 1.0, 0.0, I, K, s, 0)
    with pytest.raises(ValueError, match="alpha has dtype"):
        a2(x, v, torch.zeros(10, dtype=torch.float16), 1.0, 0.0, I, K, s, 0)
    with pytest.raises(ValueError, match="T must be"):
        a2(x, v, None, 1.0, 0.0, (1.0, 0.0), K, s, 0)
    with pytest.raises(ValueError, match="k_v must be a finite"):
        a2(x, v, None, float("nan"), 0.0, I, K, s, 0)
    with pytest.raises(ValueError, match="seed is None"):
        a2(x, v, None, 1.0, 0.0, I, K, None, 0)
    with pytest.raises(ValueError, match="one-element int64"):
        a1(x, v, 1.0, 1.0, 0.5, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="offset must be"):
        a1(x, v, 1.0, 1.0, 0.5, s, -1)
    with pytest.raises(ValueError, match="sigma must be a finite"):
        a1(x, v, 1.0, 1.0, float("inf"), s, 0)
    with pytest.raises(ValueError, match="channels 6 not divisible by num_groups 4"):
        gn(torch.zeros(1, 6, 2, 2), 4, None, None)
    with pytest.raises(ValueError, match="unsupported dtype torch.int32"):
        gn(torch.zeros(1, 6, 2, 2, dtype=torch.int32), 3, None, None)
    with pytest.raises(ValueError, match=r"scale has shape \(6,\), expected \(1, 6\)"):
        gn(torch.zeros(1, 6, 2, 2), 3, None, None, torch.zeros(6))
    if impl == "kernel":
        with pytest.raises(ValueError, match="contiguous"):
            a2(torch.zeros(10, 2)[:, 0], torch.zeros(10, 2)[:, 0], None, 1.0, 0.0, I, K, s, 0)


def test_cld_em_coeffs_validation():
    with pytest.raises(ValueError, match="SigmaRef_vv must be positive"):
        dispatch.cld_em_coeffs(0.1, 4.0, 4.0, 1.0, 2.0, SigmaRef_vv=0.0)
    with pytest.raises(TypeError, match="CLDEMCoeffs"):
        dispatch.cld_em_step_(torch.zeros(3), torch.zeros(3), None, (1, 2, 3), None, 0)


def test_group_norm_silu_keeps_gradients_under_auto_and_refuses_forced_triton(monkeypatch):
    """Training through the U-Net must differentiate GroupNorm: the kernel is forward-only."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "auto")
    y = dispatch.group_norm_silu(x, 2, w, None)
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    group_norm_silu_ref(ref_x, 2, ref_w, None).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(w.grad, ref_w.grad)
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        dispatch.group_norm_silu(x, 2, w, None)
    with torch.no_grad():   # inference under forced triton still runs (interpreter on CPU)
        out = dispatch.group_norm_silu(x, 2, w, None)
    assert torch.allclose(out, group_norm_silu_ref(x.detach(), 2, w.detach(), None), atol=1e-5)


def test_twin_noise_of_neighbouring_seeds_does_not_overlap_at_late_offsets():
    """Seed s at a late step must not replay seed s+1's early noise (independent runs)."""
    from fastsample.kernels.affine import twin_normals as _twin_normals
    like = torch.empty(64)
    late = _twin_normals(torch.tensor([0]), 1_000_003, 1, like)
    early = _twin_normals(torch.tensor([1]), 0, 1, like)
    assert not torch.equal(late, early)
    assert abs(float(torch.corrcoef(torch.stack([late[0], early[0]]))[0, 1])) < 0.5
