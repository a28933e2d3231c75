"""Building blocks shared by the U-Net, the discriminator, the MLPs and the VAE.

Time embeddings (reference/cld.md sec. 3.4 for Fourier features of log t; DDPM / DDGAN
sinusoidal features of t*1000 or of a step index), the AdaGN residual block (reference/ddgan.md
sec. 2), self-attention, and the resampling layers. Every GroupNorm + scale/shift + SiLU goes
through `fastsample.kernels.dispatch.group_norm_silu`, so the Triton kernel replaces all of them
at once.

Nothing here calls `.item()` or branches on tensor values: the forward passes must stay
traceable by torch.export, ONNX and CUDA-graph capture. Input validation is therefore on shapes
only (static at trace time); NaN checks belong to the callers outside the hot loop.
"""

from __future__ import annotations

import dataclasses

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsample.kernels.dispatch import group_norm_silu

TIME_EMBEDDINGS = ("fourier_log", "sinusoidal")


def param_count(module: nn.Module) -> int:
    """Number of trainable parameters (buffers such as Fourier frequencies excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias (init_scale 0): the block it closes starts as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_input(name: str, x: torch.Tensor, shape: tuple) -> None:
    """Shape check that names the argument; None in `shape` means any size on that axis."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {want}")


# ---------------------------------------------------------------------------------------------
# Time embeddings: raw features of t, then a 2-layer MLP to the block embedding width.

def minibatch_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """h (N, ...) -> (N,): per row, the std over its group of `group` consecutive rows, averaged
    over the features. Groups are consecutive so that a [real; fake] batch with halves divisible
    by the group never mixes the two; a batch not divisible by it uses groups of 1 (0 then)."""
    N = h.shape[0]
    G = min(group, N)
    G = G if N % G == 0 else 1
    s = (h.reshape(N // G, G, -1).var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1)
    return s.repeat_interleave(G)


class GaussianFourierFeatures(nn.Module):
    """[sin(2 pi W log t), cos(2 pi W log t)], W ~ N(0, scale^2) fixed (CLD / NCSN++, scale 16).

    log t, not t: CLD's t lives in [eps, 1] with eps ~ 1e-5, and the interesting structure is at
    small t, which log spreads out. W is a buffer drawn from a fixed seed so that two nets built
    from one config agree before loading weights (and the buffer is saved with the weights anyway).
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"GaussianFourierFeatures: dim {dim} must be even")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Autocast off and float32: log t of small t loses everything in half precision.
        with torch.autocast(device_type=t.device.type, enabled=False):
            proj = 2 * math.pi * torch.log(t.float())[:, None] * self.W.float()[None, :]  # (N, dim/2)
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)  # (N, dim)


class SinusoidalFeatures(nn.Module):
    """Transformer-style features of time_scale * t (DDPM: t*1000 for t in [0, 1], or a step index)."""

    def __init__(self, dim: int, time_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"SinusoidalFeatures: dim {dim} must be even")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)
        self.time_scale = float(time_scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            arg = (t.float() * self.time_scale)[:, None] * self.freqs.float()[None, :]  # (N, dim/2)
            return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)  # (N, dim)


def check_fourier_fields(owner: str, count_name: str, count, scale_name: str, scale) -> None:
    """A config's random-Fourier-feature fields: a count (int >= 0, 0 = off) and a frequency
    std (positive, finite); one clear ValueError naming the field."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{owner}.{count_name} = {count!r}; must be an int >= 0")
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise ValueError(f"{owner}.{scale_name} = {scale!r}; must be a positive finite number")


class InputFourierFeatures(nn.Module):
    """x (N, d) -> [x, sin(2 pi x B), cos(2 pi x B)] (N, d + 2m), B (d, m) ~ N(0, scale^2) fixed.

    Random Fourier features of the input (Tancik et al. 2020): an MLP on raw coordinates learns
    high frequencies slowly (spectral bias), and a score or critic on sharp 2D modes (grid25:
    std 0.0177 against a spread of ~1) needs exactly those. x itself is kept so the low
    frequencies stay linear. B is rebuilt from its seed, not saved: the released checkpoints store
    fp16, and a rounded B would shift every phase the net was trained on. Computed in float32:
    2 pi x B reaches ~50, where fp16 keeps 2 decimals.
    """

    def __init__(self, in_dim: int, m: int, scale: float, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(in_dim, m, generator=g) * scale, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.B.shape[0] + 2 * self.B.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            proj = 2 * math.pi * (x.float() @ self.B.float())
            feats = torch.cat([torch.sin(proj), torch.cos(proj)], dim=1).to(x.dtype)
        return torch.cat([x, feats], dim=1)


class PixelFourierFeatures(nn.Module):
    """x (N, C, H, W) -> [sin(2 pi x b), cos(2 pi x b)] (N, 2 m C, H, W), b (m,) ~ N(0, scale^2)
    fixed, the same frequencies at every pixel (a 1x1 lift of each value).

    InputFourierFeatures for an image critic: a conv net on raw pixel values is as smooth in
    each value as an MLP on raw coordinates, and the digits DDGAN's D did not see a background
    spread 3x the data's (0.06 vs 0.017 in [0, 1]) that lit a quarter of the border pixels.
    b is rebuilt from its seed, not saved, for the reason given there."""

    def __init__(self, m: int, scale: float, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("b", torch.randn(m, generator=g) * scale, persistent=False)

    def channels(self, in_ch: int) -> int:
        return 2 * self.b.shape[0] * in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            proj = 2 * math.pi * x.float()[:, :, None] * self.b.float()[None, None, :, None, None]
            feats = torch.cat([torch.sin(proj), torch.cos(proj)], dim=2)   # (N, C, 2m, H, W)
        return feats.reshape(N, C * 2 * self.b.shape[0], H, W).to(x.dtype)


class PixelLevelFeatures(nn.Module):
    """x (N, C, H, W) in model space [-1, 1] -> tanh((x - c_k) / w) (N, (L - 1) C, H, W), c_k the
    L - 1 boundaries between L equal grey-level bins of [-1, 1], w = `width` bin widths.

    The non-periodic twin of PixelFourierFeatures: each channel says on which side of one
    quantisation threshold a value sits, so a critic sees a value cross a grey level without the
    aliasing of sin / cos (x and x + 1/b look alike to those, and a generator collapsed onto
    such a blind spot)."""

    def __init__(self, levels: int, width: float):
        super().__init__()
        k = torch.arange(1, levels, dtype=torch.float64)
        self.register_buffer("c", (-1.0 + 2.0 * k / levels).float(), persistent=False)
        self.w = width * 2.0 / levels

    def channels(self, in_ch: int) -> int:
        return self.c.shape[0] * in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = torch.tanh((x.float()[:, :, None] - self.c[None, None, :, None, None]) / self.w)
        return f.reshape(N, C * self.c.shape[0], H, W).to(x.dtype)


def time_features(kind: str, dim: int, fourier_scale: float, time_scale: float) -> nn.Module:
    if kind == "fourier_log":
        return GaussianFourierFeatures(dim, fourier_scale)
    if kind == "sinusoidal":
        return SinusoidalFeatures(dim, time_scale)
    raise ValueError(f"time_embedding {kind!r}; choose one of {'|'.join(TIME_EMBEDDINGS)}")


class TimeEmbedding(nn.Module):
    """t (N,) -> features (N, feat_dim) -> Linear, SiLU, Linear -> (N, emb_dim)."""

    def __init__(self, kind: str, feat_dim: int, emb_dim: int, fourier_scale: float = 16.0,
                 time_scale: float = 1000.0):
        super().__init__()
        self.features = time_features(kind, feat_dim, fourier_scale, time_scale)
        self.mlp = nn.Sequential(nn.Linear(feat_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Features stay float32 (see above); the MLP runs in the net's dtype (fp16/bf16 engines).
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class MappingMLP(nn.Module):
    """DDGAN's z mapping network: z (N, z_dim) -> (N, emb_dim). z is rescaled to unit RMS first
    (StyleGAN-style pixel norm) so the embedding's scale does not depend on z_dim."""

    def __init__(self, z_dim: int, emb_dim: int, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        d = z_dim
        for _ in range(num_layers):
            layers += [nn.Linear(d, emb_dim), nn.SiLU()]
            d = emb_dim
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.net(z)


# ---------------------------------------------------------------------------------------------
# GroupNorm with an optional per-sample scale/shift from an embedding (AdaGN).

class AdaGroupNormSiLU(nn.Module):
    """y = silu((GN(x) * weight + bias) * (1 + scale) + shift), (scale, shift) = Linear(emb).

    emb_dim = 0 gives a plain GroupNorm + SiLU (VAE, output head). The routing through dispatch is
    the point of this class: the fused Triton kernel lands behind that one call.
    """

    def __init__(self, ch: int, num_groups: int, emb_dim: int = 0, silu: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if ch % num_groups != 0:
            raise ValueError(f"channels {ch} not divisible by num_groups {num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.silu = silu
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.emb_proj = nn.Linear(emb_dim, 2 * ch) if emb_dim > 0 else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        scale = shift = None
        if self.emb_proj is not None:
            scale, shift = self.emb_proj(emb).chunk(2, dim=1)  # (N, C) each
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, scale, shift,
                               self.eps, silu=self.silu)


# ---------------------------------------------------------------------------------------------
# Residual block, attention, resampling.

class ResBlock(nn.Module):
    """AdaGN-SiLU, conv3x3, AdaGN-SiLU, dropout, conv3x3 (zero init), plus a (1x1 if needed) skip.

    With skip_rescale the sum is divided by sqrt(2) (NCSN++), keeping activations' variance
    roughly constant with depth.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int,
                 dropout: float = 0.0, skip_rescale: bool = True):
        super().__init__()
        self.norm1 = AdaGroupNormSiLU(in_ch, num_groups, emb_dim)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = AdaGroupNormSiLU(out_ch, num_groups, emb_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.skip_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x, emb))
        h = self.conv2(self.dropout(self.norm2(h, emb)))
        return (self.skip(x) + h) * self.skip_scale


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, output projection zero-init."""

    def __init__(self, ch: int, num_groups: int, skip_rescale: bool = True):
        super().__init__()
        self.norm = AdaGroupNormSiLU(ch, num_groups, 0, silu=False)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))
        self.skip_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(N, 3, C, H * W).unbind(1)  # (N, C, HW) each
        # SDPA wants (N, heads, L, d); one head of width C.
        h = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])  # (N, 1, HW, C)
        h = h[:, 0].transpose(1, 2).reshape(N, C, H, W)
        return (x + self.proj(h)) * self.skip_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv (no FIR filter: at 8x8 the aliasing it fixes is immaterial)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def config_from_dict(cls, d: dict):
    """Rebuild a frozen config dataclass from its JSON dict (lists back to tuples); unknown keys
    raise, naming the allowed ones. Shared by every config that a checkpoint card carries."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; allowed {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
