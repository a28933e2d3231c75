"""In-place elementwise step kernels: an affine map of one or two tensors plus Philox noise.

Two generic kernels cover every sampler step (dispatch.py names them per sampler):

affine2_noise_ (CLD; reference/cld.md sec. 5), on the pair (x, v) and the net output alpha:
    v_s = k_v * v + k_alpha * alpha                         S part: Euler on v, mixed score
    x'  = T_xx * x + T_xv * v_s + D_xv * v + K11 * n0
    v'  = T_vx * x + T_vv * v_s + K21 * n0 + K22 * n1        exact linear part A
  - lone A half step:   k_v = 1, k_alpha = 0, no alpha, T = T(b), K = chol(C(b))
  - fused SSCS step:    S update, then T = T_12, K = chol(C_12) of the two composed half steps
  - final denoising:    K = 0 (no noise); D_xv carries EM's x drift on the pre-step v
  - Euler-Maruyama:     x' = x - h b Minv v uses the pre-step v, hence D_xv (see cld_em_coeffs)

affine1_noise_ (DDGAN posterior, ddgan.md sec. 1 and 4; VP-SDE EM; DDPM ancestral), one tensor:
    x' = c_x * x + c_e * e + sigma * n0

Bytes: affine2 reads x, v (and alpha) once and writes x, v once: (4 or 5) * numel * itemsize, the
floor for an in-place update; affine1 moves 3 * numel * itemsize. Arithmetic is fp32 whatever the
storage dtype; coefficients arrive as python floats (computed in float64 by the caller) and are
rounded to fp32 at launch. The noise mapping is in _triton.py.
"""

from __future__ import annotations

import math

import torch

from fastsample.kernels._triton import (FLOAT_DTYPES, HAS_TRITON, check_launchable, check_seed,
                                        register_op, wrap)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastsample.kernels._triton import normal_pair

# 1024 elements over 4 warps: 8 per thread, i.e. two 16-byte fp32 vector loads per tensor.
_BLOCK = 1024
_NUM_WARPS = 4


#-----------------------------------------------------------------------------------------------
# Argument checks shared by the twins and the kernels, so both fail the same way.

def _check_tensors(op: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_scalars(op: str, **scalars: float) -> None:
    for name, c in scalars.items():
        if not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"{op}: {name} must be a finite python float, got {c!r}")


def _unpack(op: str, T, K) -> tuple[float, ...]:
    if len(T) != 4:
        raise ValueError(f"{op}: T must be (T_xx, T_xv, T_vx, T_vv), got {len(T)} values")
    if len(K) != 3:
        raise ValueError(f"{op}: K must be (K11, K21, K22), got {len(K)} values")
    return tuple(float(c) for c in T) + tuple(float(c) for c in K)


def splitmix64(z: int) -> int:
    """SplitMix64 finaliser: neighbouring seeds land ~2^63 apart, far beyond any offset."""
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def twin_normals(seed: torch.Tensor, offset: int, n_streams: int, like: torch.Tensor):
    """Twin noise from a torch.Generator keyed by (seed, offset): same law as the kernel's
    Philox stream, different numbers. Reads the seed on the host (a sync: twins only)."""
    g = torch.Generator(device=like.device)
    # Mix the seed before adding the offset: with seed * small_prime + offset, seed s at a late
    # step (offsets reach ~1e7 in a sampling run) drew seed s+1's early-step noise.
    g.manual_seed((splitmix64(int(seed.item())) + offset) % (1 << 63))
    return torch.randn((n_streams,) + tuple(like.shape), generator=g, device=like.device,
                       dtype=torch.float32)


def _as_streams(noise, n_streams: int, like: torch.Tensor):
    """Explicit noise: a sequence of n_streams tensors (any shape with x's numel)."""
    if len(noise) < n_streams:
        raise ValueError(f"noise must hold {n_streams} tensors (one per stream), got {len(noise)}")
    out = []
    for j in range(n_streams):
        if noise[j].numel() != like.numel():
            raise ValueError(f"noise[{j}] has {noise[j].numel()} elements, x has {like.numel()}")
        out.append(noise[j].reshape(like.shape).float())
    return out


#-----------------------------------------------------------------------------------------------
# Torch twins (same signature as the public kernels, plus optional explicit noise).

def affine2_noise_ref(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                      k_v: float, k_alpha: float, T, K, seed: torch.Tensor | None, offset: int,
                      d_xv: float = 0.0, noise=None) -> None:
    """Twin of affine2_noise_; noise = (n0, n1) feeds given normals (e.g. philox_normal)."""
    T_xx, T_xv, T_vx, T_vv, K11, K21, K22 = _unpack("affine2_noise_", T, K)
    _check_tensors("affine2_noise_", x, v=v, alpha=alpha)
    _check_scalars("affine2_noise_", k_v=k_v, k_alpha=k_alpha, d_xv=d_xv, T_xx=T_xx, T_xv=T_xv,
                   T_vx=T_vx, T_vv=T_vv, K11=K11, K21=K21, K22=K22)
    has_noise = (K11, K21, K22) != (0.0, 0.0, 0.0)
    x32, v32 = x.float(), v.float()
    # S part: Euler on v with the mixed score
    v_s = k_v * v32
    if alpha is not None:
        v_s = v_s + k_alpha * alpha.float()
    # exact linear part A
    x_new = T_xx * x32 + T_xv * v_s + d_xv * v32
    v_new = T_vx * x32 + T_vv * v_s
    if has_noise:
        if noise is None:
            check_seed("affine2_noise_", seed, x, offset)
            n0, n1 = twin_normals(seed, offset, 2, x)
        else:
            n0, n1 = _as_streams(noise, 2, x)
        x_new = x_new + K11 * n0
        v_new = v_new + K21 * n0 + K22 * n1
    x.copy_(x_new)
    v.copy_(v_new)


def affine1_noise_ref(x: torch.Tensor, e: torch.Tensor, c_x: float, c_e: float, sigma: float,
                      seed: torch.Tensor | None, offset: int, noise=None) -> None:
    """Twin of affine1_noise_; noise = (n0,) feeds given normals (e.g. philox_normal)."""
    _check_tensors("affine1_noise_", x, e=e)
    _check_scalars("affine1_noise_", c_x=c_x, c_e=c_e, sigma=sigma)
    x_new = c_x * x.float() + c_e * e.float()
    if sigma != 0.0:
        if noise is None:
            check_seed("affine1_noise_", seed, x, offset)
            (n0,) = twin_normals(seed, offset, 1, x)
        else:
            (n0,) = _as_streams(noise, 1, x)
        x_new = x_new + sigma * n0
    x.copy_(x_new)


#-----------------------------------------------------------------------------------------------
# Triton kernels.

if HAS_TRITON:
    @triton.jit
    def _affine2_noise_kernel(
        X, V,                   # (numel,) state, updated in place
        Alpha,                  # (numel,) net output; unused unless HAS_ALPHA
        Seed,                   # (1,) int64 Philox key; unused unless HAS_NOISE
        offset,                 # Philox counter of element 0
        numel,
        k_v, k_alpha,           # S update of v
        t_xx, t_xv, t_vx, t_vv, # linear map on (x, v_s)
        d_xv,                   # extra x coefficient on the pre-step v (Euler-Maruyama)
        k11, k21, k22,          # Cholesky factor of the noise covariance
        HAS_ALPHA: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + i, mask=mask, other=0.0).to(tl.float32)
        # S part
        v_s = k_v * v
        if HAS_ALPHA:
            v_s += k_alpha * tl.load(Alpha + i, mask=mask, other=0.0).to(tl.float32)
        # A part
        x_new = t_xx * x + t_xv * v_s + d_xv * v
        v_new = t_vx * x + t_vv * v_s
        if HAS_NOISE:
            n0, n1 = normal_pair(tl.load(Seed), offset + i)
            x_new += k11 * n0
            v_new += k21 * n0 + k22 * n1
        tl.store(X + i, x_new.to(X.dtype.element_ty), mask=mask)
        tl.store(V + i, v_new.to(V.dtype.element_ty), mask=mask)

    @triton.jit
    def _affine1_noise_kernel(
        X,                      # (numel,) state, updated in place
        E,                      # (numel,) net output
        Seed, offset, numel,
        c_x, c_e, sigma,
        HAS_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(E + i, mask=mask, other=0.0).to(tl.float32)
        x_new = c_x * x + c_e * e
        if HAS_NOISE:
            n0, _ = normal_pair(tl.load(Seed), offset + i)
            x_new += sigma * n0
        tl.store(X + i, x_new.to(X.dtype.element_ty), mask=mask)


#-----------------------------------------------------------------------------------------------
# Launchers, registered as fastsample:: ops (no return value, so the fake impl does nothing).

def _no_output(*args, **kwargs) -> None:
    return None


@register_op("affine2_noise_", mutates_args=("x", "v"), fake=_no_output)
def _affine2_noise_op(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                      seed: torch.Tensor | None, offset: int, k_v: float, k_alpha: float,
                      t_xx: float, t_xv: float, t_vx: float, t_vv: float, d_xv: float,
                      k11: float, k21: float, k22: float) -> None:
    has_noise = (k11, k21, k22) != (0.0, 0.0, 0.0)
    numel = x.numel()
    if numel == 0:
        return
    wrap(_affine2_noise_kernel)[(triton.cdiv(numel, _BLOCK),)](
        x, v, alpha if alpha is not None else x, seed if has_noise else x, offset, numel,
        k_v, k_alpha, t_xx, t_xv, t_vx, t_vv, d_xv, k11, k21, k22,
        HAS_ALPHA=alpha is not None, HAS_NOISE=has_noise, BLOCK=_BLOCK, num_warps=_NUM_WARPS)


@register_op("affine1_noise_", mutates_args=("x",), fake=_no_output)
def _affine1_noise_op(x: torch.Tensor, e: torch.Tensor, seed: torch.Tensor | None, offset: int,
                      c_x: float, c_e: float, sigma: float) -> None:
    numel = x.numel()
    if numel == 0:
        return
    wrap(_affine1_noise_kernel)[(triton.cdiv(numel, _BLOCK),)](
        x, e, seed if sigma != 0.0 else x, offset, numel, c_x, c_e, sigma,
        HAS_NOISE=sigma != 0.0, BLOCK=_BLOCK, num_warps=_NUM_WARPS)


#-----------------------------------------------------------------------------------------------
# Public kernels (what dispatch.py routes to on CUDA).

def affine2_noise_(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                   k_v: float, k_alpha: float, T, K, seed: torch.Tensor | None, offset: int,
                   d_xv: float = 0.0) -> None:
    """Fused CLD update of (x, v) in place. x, v, alpha: same shape, dtype, device, contiguous;
    T = (T_xx, T_xv, T_vx, T_vv), K = (K11, K21, K22); K = 0 turns the noise (and seed) off."""
    T_xx, T_xv, T_vx, T_vv, K11, K21, K22 = _unpack("affine2_noise_", T, K)
    _check_tensors("affine2_noise_", x, v=v, alpha=alpha)
    _check_scalars("affine2_noise_", k_v=k_v, k_alpha=k_alpha, d_xv=d_xv, T_xx=T_xx, T_xv=T_xv,
                   T_vx=T_vx, T_vv=T_vv, K11=K11, K21=K21, K22=K22)
    check_launchable("affine2_noise_", x, v, alpha)
    if (K11, K21, K22) != (0.0, 0.0, 0.0):
        check_seed("affine2_noise_", seed, x, offset)
    _affine2_noise_op(x, v, alpha, seed, int(offset), float(k_v),
                                        float(k_alpha), T_xx, T_xv, T_vx, T_vv, float(d_xv),
                                        K11, K21, K22)


def affine1_noise_(x: torch.Tensor, e: torch.Tensor, c_x: float, c_e: float, sigma: float,
                   seed: torch.Tensor | None, offset: int) -> None:
    """x <- c_x x + c_e e + sigma n0 in place; sigma = 0 turns the noise (and seed) off."""
    _check_tensors("affine1_noise_", x, e=e)
    _check_scalars("affine1_noise_", c_x=c_x, c_e=c_e, sigma=sigma)
    check_launchable("affine1_noise_", x, e)
    if sigma != 0.0:
        check_seed("affine1_noise_", seed, x, offset)
    _affine1_noise_op(x, e, seed, int(offset), float(c_x), float(c_e),
                                        float(sigma))
