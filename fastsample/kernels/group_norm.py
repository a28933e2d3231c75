"""GroupNorm + affine + per-(sample, channel) scale/shift + SiLU, inference forward.

    y = silu( (GN(x) * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c] )

scale/shift carry the time embedding (and, for DDGAN's generator, AdaGN's z embedding).
Statistics are computed in float32 whatever the input dtype; the output has the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, scale: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None, eps: float = 1e-5,
                        silu: bool = True) -> torch.Tensor:
    """Torch twin. x: (N, C, *spatial); weight, bias: (C,); scale, shift: (N, C) or None."""
    N, C = x.shape[:2]
    if C % num_groups != 0:
        raise ValueError(f"group_norm_silu: channels {C} not divisible by num_groups {num_groups}")
    h = F.group_norm(x.float(), num_groups, None, None, eps)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        h = h * weight.float().view(bshape)
    if bias is not None:
        h = h + bias.float().view(bshape)
    nshape = (N, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.float().view(nshape))
    if shift is not None:
        h = h + shift.float().view(nshape)
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)
