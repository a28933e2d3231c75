"""LSGM's VAE for 8x8 digits (reference/lsgm.md sec. 1 and 7): one latent group of
latent_ch x latent_res x latent_res, GroupNorm only (no BatchNorm, so ONNX/AOT export stays
clean and batch statistics never leak between samples).

Decoder likelihood: a categorical over the K = 17 grey levels of the digits per pixel (chosen over
a discretised logistic: the digits have exactly 17 values 0..16, a categorical puts no mass
between them, its log-likelihood is exact, and it can be multimodal per pixel, e.g. "ink or
background"). Data x lives in [0, 1]; level k stands for the intensity k / (K - 1).

Decoder logits are (N, C*K, H, W) with channel index c*K + k; for the 1-channel digits that is
(N, 17, 8, 8), exactly what F.cross_entropy takes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsample.nets.layers import (AdaGroupNormSiLU, Downsample, ResBlock, Upsample, check_input,
                                    config_from_dict, zero_module)


@dataclass(frozen=True)
class VAEConfig:
    in_ch: int = 1                          # image channels
    resolution: int = 8                     # image H = W
    latent_ch: int = 4                      # latent channels (LSGM miniature: 4-8)
    latent_res: int = 4                     # latent H = W; resolution / latent_res must be 2^(len(ch_mult)-1)
    base_ch: int = 32                       # channels at full resolution
    ch_mult: tuple = (1, 2)                 # channel multiplier per resolution level, full res first
    num_res_blocks: int = 1                 # residual blocks per level
    num_groups: int = 8                     # GroupNorm groups
    num_levels: int = 17                    # K, grey levels of the categorical likelihood (digits: 0..16)

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("in_ch", "resolution", "latent_ch", "latent_res", "base_ch", "num_res_blocks",
                     "num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VAEConfig.{name} = {getattr(self, name)}; must be >= 1")
        if self.num_levels < 2:
            raise ValueError(f"VAEConfig.num_levels = {self.num_levels}; must be >= 2")
        ratio = self.resolution / self.latent_res
        n_down = len(self.ch_mult) - 1
        if ratio != 2 ** n_down:
            raise ValueError(f"VAEConfig: resolution {self.resolution} / latent_res {self.latent_res} = "
                             f"{ratio:g}, but ch_mult {self.ch_mult} gives {n_down} halvings (ratio {2 ** n_down})")
        for m in self.ch_mult:
            if (self.base_ch * m) % self.num_groups != 0:
                raise ValueError(f"VAEConfig: channels base_ch*mult = {self.base_ch * m} not divisible "
                                 f"by num_groups {self.num_groups}")

    @property
    def latent_shape(self) -> tuple:
        return (self.latent_ch, self.latent_res, self.latent_res)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VAEConfig":
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {'|'.join(VAE_PRESETS)}")
        return dataclasses.replace(VAE_PRESETS[name], **overrides)


VAE_PRESETS: dict[str, VAEConfig] = {
    "digits8": VAEConfig(),
    "img32": VAEConfig(in_ch=3, resolution=32, latent_res=8, ch_mult=(1, 2, 2), num_levels=256),
    "img64": VAEConfig(in_ch=3, resolution=64, latent_res=8, ch_mult=(1, 2, 2, 2), num_levels=256),
}


class Encoder(nn.Module):
    """x (N, C, R, R) in [0, 1] -> (mu, log_sigma), each (N, latent_ch, latent_res, latent_res).

    The output conv is zero-initialised: a fresh encoder returns q(z|x) = N(0, I), the prior of
    stage 1, so the KL term starts at 0.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if not isinstance(cfg, VAEConfig):
            raise TypeError(f"Encoder(cfg): cfg must be a VAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.base_ch, 3, padding=1)
        layers: list[nn.Module] = []
        ch = cfg.base_ch
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, cfg.base_ch * mult, 0, cfg.num_groups))
                ch = cfg.base_ch * mult
            if i < len(cfg.ch_mult) - 1:
                layers.append(Downsample(ch))
        self.body = nn.ModuleList(layers)
        self.norm_out = AdaGroupNormSiLU(ch, cfg.num_groups, 0)
        self.conv_out = zero_module(nn.Conv2d(ch, 2 * cfg.latent_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        check_input("x", x, (x.shape[0], cfg.in_ch, cfg.resolution, cfg.resolution))
        # Centre [0, 1] data: the convs see a zero-mean input.
        h = self.conv_in(2 * x - 1)
        for layer in self.body:
            h = layer(h)
        mu, log_sigma = self.conv_out(self.norm_out(h)).chunk(2, dim=1)
        return mu, log_sigma


class Decoder(nn.Module):
    """z (N, latent_ch, latent_res, latent_res) -> logits (N, C*K, R, R), channel c*K + k."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if not isinstance(cfg, VAEConfig):
            raise TypeError(f"Decoder(cfg): cfg must be a VAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        ch = cfg.base_ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_ch, ch, 3, padding=1)
        layers: list[nn.Module] = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, cfg.base_ch * mult, 0, cfg.num_groups))
                ch = cfg.base_ch * mult
            if i > 0:
                layers.append(Upsample(ch))
        self.body = nn.ModuleList(layers)
        self.norm_out = AdaGroupNormSiLU(ch, cfg.num_groups, 0)
        # Zero init: a fresh decoder predicts the uniform categorical, log p = -log K per pixel.
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.in_ch * cfg.num_levels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        check_input("z", z, (z.shape[0],) + cfg.latent_shape)
        h = self.conv_in(z)
        for layer in self.body:
            h = layer(h)
        return self.conv_out(self.norm_out(h))

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed over pixels and channels, (N,). x in [0, 1] on the K-level grid."""
        return categorical_log_prob(logits, x, self.cfg.num_levels)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return categorical_mean(logits, self.cfg.num_levels)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return categorical_sample(logits, self.cfg.num_levels, generator)


# ---------------------------------------------------------------------------------------------
# The categorical likelihood over K grey levels, on logits (N, C*K, H, W).

def _split_levels(logits: torch.Tensor, num_levels: int) -> torch.Tensor:
    if logits.dim() != 4 or logits.shape[1] % num_levels != 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (N, C*{num_levels}, H, W)")
    N, CK, H, W = logits.shape
    return logits.reshape(N, CK // num_levels, num_levels, H, W)  # (N, C, K, H, W)


def to_levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """x in [0, 1] -> level index round(x (K-1)), int64. Raises on NaN or values outside [0, 1]
    (a host sync, acceptable here: this is the training loss, not the sampling loop)."""
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; expected intensities in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"x has values in [{lo:g}, {hi:g}]; expected intensities in [0, 1]")
    return torch.round(x * (num_levels - 1)).long()


def categorical_log_prob(logits: torch.Tensor, x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """sum over (c, h, w) of log softmax(logits)[level(x)], shape (N,)."""
    lp = F.log_softmax(_split_levels(logits, num_levels).float(), dim=2)  # (N, C, K, H, W)
    if x.shape != (lp.shape[0], lp.shape[1], lp.shape[3], lp.shape[4]):
        raise ValueError(f"x has shape {tuple(x.shape)}; logits imply "
                         f"{(lp.shape[0], lp.shape[1], lp.shape[3], lp.shape[4])}")
    k = to_levels(x, num_levels)[:, :, None]  # (N, C, 1, H, W)
    return lp.gather(2, k)[:, :, 0].sum(dim=(1, 2, 3))


def categorical_mean(logits: torch.Tensor, num_levels: int) -> torch.Tensor:
    """E[intensity] = sum_k p_k k/(K-1), shape (N, C, H, W)."""
    p = F.softmax(_split_levels(logits, num_levels).float(), dim=2)
    values = torch.linspace(0.0, 1.0, num_levels, device=logits.device)
    return (p * values[None, None, :, None, None]).sum(dim=2)


def categorical_sample(logits: torch.Tensor, num_levels: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per pixel by inverse CDF with an explicit generator, intensities in [0, 1]."""
    p = F.softmax(_split_levels(logits, num_levels).float(), dim=2)  # (N, C, K, H, W)
    cdf = p.cumsum(dim=2)
    u = torch.rand(p[:, :, :1].shape, generator=generator, device=p.device)  # (N, C, 1, H, W)
    k = (cdf < u).sum(dim=2).clamp(max=num_levels - 1)  # first level whose CDF reaches u
    return k.float() / (num_levels - 1)


def bits_per_dim(nelbo_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """NELBO in nats per image -> bits per dimension."""
    return nelbo_nats / (num_dims * math.log(2.0))
