"""Routes each fused op to its Triton kernel (CUDA tensors) or its torch twin (elsewhere).

FASTSAMPLE_KERNELS=torch forces the twins everywhere; FASTSAMPLE_KERNELS=triton forces the
kernels (and fails clearly where they cannot run: CPU tensors need TRITON_INTERPRET=1 set before
fastsample is imported). Unset (or auto): triton on CUDA, torch otherwise.

The named step entry points below are what samplers call. All update their tensors in place, take
python-float scalars (computed by the caller in float64, reference/cld.md sec. 5.3) and never
read a tensor on the host, so a whole sampling loop can be captured in one CUDA graph. `seed` is
a one-element int64 tensor on the data's device; `offset` the Philox counter of element 0 (a
launch with noise uses counters [offset, offset + numel), see kernels/_triton.py). The twins draw
different (equally distributed) noise; pass them `noise=` from `philox_normal` for bit-level
comparisons.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from fastsample.kernels._triton import HAS_TRITON, philox_normal  # noqa: F401  (re-export)
from fastsample.kernels.affine import (affine1_noise_, affine1_noise_ref, affine2_noise_,
                                       affine2_noise_ref)
from fastsample.kernels.affine import splitmix64, twin_normals  # noqa: F401  (re-export)
from fastsample.kernels.group_norm import group_norm_silu_ref, group_norm_silu_triton

_CHOICES = ("torch", "triton", "auto")


def backend() -> str:
    choice = os.environ.get("FASTSAMPLE_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTSAMPLE_KERNELS={choice!r}; choose torch|triton (or unset)")
    return choice


def use_triton(x: torch.Tensor) -> bool:
    """The implementation a call on `x` gets: forced by FASTSAMPLE_KERNELS, else by device."""
    choice = backend()
    if choice == "auto":
        return HAS_TRITON and x.is_cuda
    return choice == "triton"


#-----------------------------------------------------------------------------------------------
# GroupNorm + scale/shift + SiLU (the U-Net's block opening).

def group_norm_silu(x: torch.Tensor, num_groups: int, weight, bias, scale=None, shift=None,
                    eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """Fused GroupNorm + affine + (1 + scale) * . + shift + SiLU; see kernels/group_norm.py."""
    triton = use_triton(x)
    if triton and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        # The kernel is an inference forward (no backward): training keeps the twin, which
        # autograd differentiates. Forcing the kernel here would silently drop gradients.
        if backend() == "triton":
            raise RuntimeError("group_norm_silu: the Triton kernel is inference-only, but a "
                               "gradient is required; unset FASTSAMPLE_KERNELS=triton to train")
        triton = False
    impl = group_norm_silu_triton if triton else group_norm_silu_ref
    return impl(x, num_groups, weight, bias, scale, shift, eps, silu)


#-----------------------------------------------------------------------------------------------
# CLD steps (reference/cld.md sec. 5), all on affine2_noise_.

def _affine2(x, v, alpha, k_v, k_alpha, T, K, seed, offset, d_xv=0.0, noise=None) -> None:
    if noise is not None:
        # Explicit normals are the twins' feature (the C++ runtime's oracle); the kernels draw
        # their own.
        affine2_noise_ref(x, v, alpha, k_v, k_alpha, T, K, seed, offset, d_xv, noise=noise)
        return
    impl = affine2_noise_ if use_triton(x) else affine2_noise_ref
    impl(x, v, alpha, k_v, k_alpha, T, K, seed, offset, d_xv)


def cld_affine_step_(x, v, alpha, k_v: float, k_alpha: float, T, K, seed, offset: int,
                     d_xv: float = 0.0, noise=None) -> None:
    """One affine2 row of a sampler plan (fastsample/samplers/plan.py) as the generic kernel:
    the named steps below are special cases of it. alpha None: no network term. noise: given
    normals (n0, n1) instead of the Philox stream (runs the torch twin)."""
    _affine2(x, v, alpha, k_v, k_alpha, T, K, seed, offset, d_xv, noise)


def sscs_step_(x, v, alpha, k_v: float, k_alpha: float, T, K, seed, offset: int) -> None:
    """Fused SSCS step (sec. 5.3): v <- k_v v + k_alpha alpha, then the exact A map
    (x, v) <- T (x, v) + K n with T = (T_xx, T_xv, T_vx, T_vv), K = (K11, K21, K22), the composed
    T_12 and chol(C_12) of the half step ending this step and the one opening the next."""
    _affine2(x, v, alpha, k_v, k_alpha, T, K, seed, offset)


def cld_linear_(x, v, T, K, seed, offset: int) -> None:
    """Lone exact A step (the first and the last SSCS half step): (x, v) <- T (x, v) + K n."""
    _affine2(x, v, None, 1.0, 0.0, T, K, seed, offset)


def cld_denoise_(x, v, T) -> None:
    """Noise-free linear map (x, v) <- T (x, v); the final denoising mean of x (sec. 5.1) is
    T = (1, -eps_s b Minv, ., .): x needs no score. For the full EM mean with the score, call
    cld_em_step_ with coefficients built with noise=False."""
    _affine2(x, v, None, 1.0, 0.0, T, (0.0, 0.0, 0.0), None, 0)


@dataclass(frozen=True)
class CLDEMCoeffs:
    """One CLD Euler–Maruyama step (sec. 5.2) as coefficients of the pre-step (x, v, alpha):
    x' = x + x_v v,   v' = v_x x + v_v v + v_alpha alpha + noise n."""
    x_v: float          # -h b Minv
    v_x: float          # h b
    v_v: float          # 1 + h b Gamma Minv - 2 Gamma b h / SigmaRef_vv (mixed score)
    v_alpha: float      # -2 Gamma b h ell
    noise: float        # sqrt(2 Gamma b h); 0 for the denoising mean step


def cld_em_coeffs(h: float, beta: float, Minv: float, Gamma: float, ell: float,
                  SigmaRef_vv: float | None = None, noise: bool = True) -> CLDEMCoeffs:
    """Expand u <- u + h drift_SDE + sqrt(h) [0, sqrt(2 Gamma b)] n with the score
    s = -v / SigmaRef_vv - ell alpha (SigmaRef_vv None: the toy config's s = -ell alpha).
    All python floats, i.e. float64."""
    for name, c in (("h", h), ("beta", beta), ("Minv", Minv), ("Gamma", Gamma), ("ell", ell)):
        if not math.isfinite(c):
            raise ValueError(f"cld_em_coeffs: {name} must be finite, got {c!r}")
    if SigmaRef_vv is not None and not SigmaRef_vv > 0:
        raise ValueError(f"cld_em_coeffs: SigmaRef_vv must be positive, got {SigmaRef_vv!r}")
    if h < 0 or beta < 0:
        raise ValueError(f"cld_em_coeffs: h and beta must be non-negative, got {h!r}, {beta!r}")
    g2 = 2.0 * Gamma * beta * h                      # g^2 h on v
    v_v = 1.0 + h * beta * Gamma * Minv
    if SigmaRef_vv is not None:
        v_v -= g2 / SigmaRef_vv
    return CLDEMCoeffs(x_v=-h * beta * Minv, v_x=h * beta, v_v=v_v, v_alpha=-g2 * ell,
                       noise=math.sqrt(g2) if noise else 0.0)


def cld_em_step_(x, v, alpha, coeffs: CLDEMCoeffs, seed, offset: int) -> None:
    """CLD Euler–Maruyama step in place. x's update uses the pre-step v (the kernel's D_xv);
    v's folds into the S part: v_s = v_v v + v_alpha alpha, v' = v_x x + v_s + noise n1."""
    if not isinstance(coeffs, CLDEMCoeffs):
        raise TypeError(f"cld_em_step_: coeffs must be a CLDEMCoeffs (see cld_em_coeffs), "
                        f"got {type(coeffs).__name__}")
    c = coeffs
    _affine2(x, v, alpha, c.v_v, c.v_alpha, (1.0, 0.0, c.v_x, 1.0), (0.0, 0.0, c.noise), seed,
             offset, d_xv=c.x_v)


#-----------------------------------------------------------------------------------------------
# One-tensor steps (DDGAN posterior, VP-SDE Euler–Maruyama, DDPM ancestral), on affine1_noise_.

def _affine1(x, e, c_x, c_e, sigma, seed, offset, noise=None) -> None:
    if noise is not None:
        affine1_noise_ref(x, e, c_x, c_e, sigma, seed, offset, noise=noise)
        return
    impl = affine1_noise_ if use_triton(x) else affine1_noise_ref
    impl(x, e, c_x, c_e, sigma, seed, offset)


def vp_em_step_(x, e, c_x: float, c_e: float, sigma: float, seed, offset: int,
                noise=None) -> None:
    """x <- c_x x + c_e e + sigma n in place (e: the net output); sigma = 0: no noise. Every
    affine1/posterior row of a sampler plan is this step. noise: given (n0,) (the torch twin)."""
    _affine1(x, e, c_x, c_e, sigma, seed, offset, noise)
