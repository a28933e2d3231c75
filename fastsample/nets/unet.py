"""Small NCSN++-style U-Net (CLD, DDPM, LSGM prior, DDGAN generator) and DDGAN's image
discriminator.

References: reference/cld.md sec. 3.4 (input [x, v] on channels, output the v-part, Fourier
features of log t, init_scale 0, skip_rescale); reference/ddgan.md sec. 2 (generator with AdaGN
for z) and sec. 3 (discriminator D(x_{t-1}, x_t, t)); reference/lsgm.md sec. 7 (4x4 latent prior).
Simplifications against NCSN++: no FIR resampling, no progressive input/output, DDPM-style
skip concatenation in the decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastsample.nets.layers import (TIME_EMBEDDINGS, AdaGroupNormSiLU, AttnBlock, Downsample,
                                    MappingMLP, PixelFourierFeatures, PixelLevelFeatures,
                                    ResBlock, TimeEmbedding, Upsample, check_fourier_fields,
                                    check_input, config_from_dict, minibatch_std, zero_module)


def _check_levels(cls_name: str, resolution: int, ch_mult: tuple, base_ch: int, num_groups: int):
    if not ch_mult or any(int(m) != m or m < 1 for m in ch_mult):
        raise ValueError(f"{cls_name}: ch_mult {ch_mult} must be a non-empty tuple of positive ints")
    if resolution % 2 ** (len(ch_mult) - 1) != 0:
        raise ValueError(f"{cls_name}: resolution {resolution} not divisible by 2^{len(ch_mult) - 1} "
                         f"(one halving per ch_mult level after the first)")
    for m in ch_mult:
        if (base_ch * m) % num_groups != 0:
            raise ValueError(f"{cls_name}: channels base_ch*mult = {base_ch * m} not divisible by "
                             f"num_groups {num_groups}")


# ---------------------------------------------------------------------------------------------
# U-Net.

@dataclass(frozen=True)
class UNetConfig:
    in_ch: int = 1                          # input channels (CLD: 2C, x and v stacked)
    out_ch: int = 1                         # output channels (CLD: C, the v-part of the score)
    resolution: int = 8                     # input H = W: 4 (LSGM latent), 8 (digits), 32, 64
    base_ch: int = 32                       # channels at the first level
    ch_mult: tuple = (1, 2, 2)              # channel multiplier per level; each later level halves H
    num_res_blocks: int = 2                 # residual blocks per level (decoder: one more, for the skip)
    attn_resolutions: tuple | None = None   # resolutions with self-attention; None = lowest only, () = none
    num_groups: int = 8                     # GroupNorm groups (must divide every level's channels)
    dropout: float = 0.0                    # dropout inside residual blocks
    time_embedding: str = "fourier_log"     # "fourier_log": Fourier features of log t (CLD); "sinusoidal": of time_scale*t
    fourier_scale: float = 16.0             # std of the Fourier frequencies (CLD: 16)
    time_scale: float = 1000.0              # sinusoidal input multiplier: 1000 for t in [0, 1], 1 for a step index
    z_dim: int = 0                          # latent z size; 0 = no AdaGN from z, > 0 = DDGAN generator
    z_emb_layers: int = 3                   # depth of the z mapping MLP
    skip_rescale: bool = True               # divide residual sums by sqrt(2) (NCSN++)

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.attn_resolutions is not None:
            object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("in_ch", "out_ch", "resolution", "base_ch", "num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} = {getattr(self, name)}; must be >= 1")
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks = {self.num_res_blocks}; must be >= 1")
        if self.z_dim < 0:
            raise ValueError(f"UNetConfig.z_dim = {self.z_dim}; must be >= 0 (0 = no z)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout = {self.dropout}; must be in [0, 1)")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"UNetConfig.time_embedding = {self.time_embedding!r}; "
                             f"choose one of {'|'.join(TIME_EMBEDDINGS)}")
        _check_levels("UNetConfig", self.resolution, self.ch_mult, self.base_ch, self.num_groups)
        levels = self.level_resolutions()
        for r in self.attn_resolutions or ():
            if r not in levels:
                raise ValueError(f"UNetConfig.attn_resolutions has {r}; the levels are {levels}")

    def level_resolutions(self) -> tuple:
        return tuple(self.resolution // 2 ** i for i in range(len(self.ch_mult)))

    def attention_at(self) -> tuple:
        return (self.level_resolutions()[-1],) if self.attn_resolutions is None else self.attn_resolutions

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_ch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        """Named small configs; overrides replace fields, e.g. preset("digits8", in_ch=2)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {'|'.join(UNET_PRESETS)}")
        return dataclasses.replace(UNET_PRESETS[name], **overrides)


UNET_PRESETS: dict[str, UNetConfig] = {
    # 8x8 digits: 8 -> 4, attention at 4x4; ~0.9 M parameters so CPU training stays feasible.
    # CLD: preset("digits8", in_ch=2); DDGAN generator: preset("digits8", z_dim=..., time_embedding="sinusoidal").
    "digits8": UNetConfig(in_ch=1, out_ch=1, resolution=8, base_ch=32, ch_mult=(1, 2),
                          num_res_blocks=1, num_groups=8),
    # LSGM prior on a 4-channel 4x4 latent: 4 -> 2 (~0.9 M).
    "latent4": UNetConfig(in_ch=4, out_ch=4, resolution=4, base_ch=32, ch_mult=(1, 2),
                          num_res_blocks=1, num_groups=8),
    "img32": UNetConfig(in_ch=3, out_ch=3, resolution=32, base_ch=32, ch_mult=(1, 2, 2, 2),
                        num_res_blocks=2, attn_resolutions=(8,), num_groups=8),
    "img64": UNetConfig(in_ch=3, out_ch=3, resolution=64, base_ch=32, ch_mult=(1, 2, 2, 2, 4),
                        num_res_blocks=2, attn_resolutions=(8,), num_groups=8),
}


class _Blocks(nn.ModuleList):
    """A run of blocks that all take (h, emb)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, emb)
        return h


class UNet(nn.Module):
    """forward(x (N, in_ch, R, R), t (N,) float, z (N, z_dim) or None) -> (N, out_ch, R, R).

    t is the continuous time (fourier_log: t > 0 required, log t is taken; not checked in the
    forward to keep it free of host syncs) or, with sinusoidal and time_scale 1, a step index as
    float. z is required iff cfg.z_dim > 0. The output conv is zero-initialised, so a fresh net
    outputs exactly 0.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise TypeError(f"UNet(cfg): cfg must be a UNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        E = cfg.emb_dim
        self.time_emb = TimeEmbedding(cfg.time_embedding, cfg.base_ch, E, cfg.fourier_scale,
                                      cfg.time_scale)
        self.z_emb = MappingMLP(cfg.z_dim, E, cfg.z_emb_layers) if cfg.z_dim > 0 else None
        block = dict(emb_dim=E, num_groups=cfg.num_groups, dropout=cfg.dropout,
                     skip_rescale=cfg.skip_rescale)
        attn_at = cfg.attention_at()
        resolutions = cfg.level_resolutions()

        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.base_ch, 3, padding=1)
        # Encoder: each level's blocks, then a halving except at the last level. skip_chs records
        # the channels of every activation the decoder will concatenate back.
        self.down = nn.ModuleList()
        ch = cfg.base_ch
        skip_chs = [ch]
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = _Blocks([ResBlock(ch, cfg.base_ch * mult, **block)])
                ch = cfg.base_ch * mult
                if resolutions[i] in attn_at:
                    blocks.append(AttnBlock(ch, cfg.num_groups, cfg.skip_rescale))
                self.down.append(blocks)
                skip_chs.append(ch)
            if i < len(cfg.ch_mult) - 1:
                self.down.append(_Blocks([Downsample(ch)]))
                skip_chs.append(ch)

        self.mid = _Blocks([ResBlock(ch, ch, **block), AttnBlock(ch, cfg.num_groups, cfg.skip_rescale),
                            ResBlock(ch, ch, **block)])

        # Decoder mirrors the encoder with one extra block per level, each eating one skip.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for j in range(cfg.num_res_blocks + 1):
                blocks = _Blocks([ResBlock(ch + skip_chs.pop(), cfg.base_ch * mult, **block)])
                ch = cfg.base_ch * mult
                if resolutions[i] in attn_at:
                    blocks.append(AttnBlock(ch, cfg.num_groups, cfg.skip_rescale))
                if i > 0 and j == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.up.append(blocks)
        assert not skip_chs, "every encoder activation must be consumed by the decoder"

        self.norm_out = AdaGroupNormSiLU(ch, cfg.num_groups, 0)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        N = x.shape[0]
        check_input("x", x, (N, cfg.in_ch, cfg.resolution, cfg.resolution))
        check_input("t", t, (N,))
        emb = self.time_emb(t)  # (N, E)
        if self.z_emb is not None:
            if z is None:
                raise ValueError(f"z is None but UNetConfig.z_dim = {cfg.z_dim}; pass z of shape (N, {cfg.z_dim})")
            check_input("z", z, (N, cfg.z_dim))
            emb = emb + self.z_emb(z)
        elif z is not None:
            raise ValueError("z was given but UNetConfig.z_dim = 0; this net takes no z")
        emb = torch.nn.functional.silu(emb)

        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = blocks(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for blocks in self.up:
            h = blocks(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(self.norm_out(h))


# ---------------------------------------------------------------------------------------------
# DDGAN discriminator D(x_{t-1}, x_t, t) -> logit (reference/ddgan.md sec. 3).

@dataclass(frozen=True)
class DiscriminatorConfig:
    in_ch: int = 1                          # channels of ONE image; the net sees 2*in_ch (x_prev, x_t)
    resolution: int = 8                     # input H = W
    base_ch: int = 32                       # channels at the first level
    ch_mult: tuple = (1, 2, 2)              # channel multiplier per level; each later level halves H
    num_groups: int = 8                     # GroupNorm groups
    time_embedding: str = "sinusoidal"      # DDGAN conditions on the discrete step index
    fourier_scale: float = 16.0             # only for fourier_log
    time_scale: float = 1.0                 # sinusoidal multiplier: 1 for a step index, 1000 for t in [0, 1]
    skip_rescale: bool = True               # divide residual sums by sqrt(2)
    mbstd_group: int = 0                    # minibatch-std feature over groups of this many
                                            # consecutive samples (StyleGAN); 0 = off
    pixel_features: int = 0                 # random Fourier features of x_prev's values (0 = off)
    pixel_scale: float = 1.0                # ... their frequency std, cycles per unit of value
    pixel_levels: int = 0                   # tanh ramps of x_prev at the boundaries of this
                                            # many grey levels of [-1, 1] (0 = off)
    pixel_level_width: float = 0.5          # ... their width, in grey levels
    pixel_max_t: float = 0.0                # > 0: the features only where t <= this (zeros
                                            # elsewhere); 0 = at every t

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.mbstd_group < 0:
            raise ValueError(f"DiscriminatorConfig.mbstd_group = {self.mbstd_group}; must be >= 0")
        check_fourier_fields("DiscriminatorConfig", "pixel_features", self.pixel_features,
                             "pixel_scale", self.pixel_scale)
        # The same two checks as a Fourier lift's count and scale, and one level alone has no
        # boundary to ramp at.
        check_fourier_fields("DiscriminatorConfig", "pixel_levels", self.pixel_levels,
                             "pixel_level_width", self.pixel_level_width)
        if self.pixel_levels == 1:
            raise ValueError("DiscriminatorConfig.pixel_levels = 1; must be 0 (off) or an int >= 2")
        if self.pixel_levels and self.pixel_features:
            raise ValueError("DiscriminatorConfig: pixel_features and pixel_levels are two lifts "
                             "of the same values; set one of them")
        if not (isinstance(self.pixel_max_t, (int, float)) and not isinstance(self.pixel_max_t, bool)
                and 0 <= self.pixel_max_t < float("inf")):
            raise ValueError(f"DiscriminatorConfig.pixel_max_t = {self.pixel_max_t!r}; must be a "
                             f"number >= 0 (0 = every t)")
        for name in ("in_ch", "resolution", "base_ch", "num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DiscriminatorConfig.{name} = {getattr(self, name)}; must be >= 1")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"DiscriminatorConfig.time_embedding = {self.time_embedding!r}; "
                             f"choose one of {'|'.join(TIME_EMBEDDINGS)}")
        _check_levels("DiscriminatorConfig", self.resolution, self.ch_mult, self.base_ch, self.num_groups)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiscriminatorConfig":
        return config_from_dict(cls, d)


class Discriminator(nn.Module):
    """forward(x_prev (N, C, R, R), x_t (N, C, R, R), t (N,)) -> logits (N,).

    Pair concatenated on channels, a residual block per level with the time embedding in its
    GroupNorm scale/shift, stride-2 downsampling, then global sum pooling and a linear head.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        if not isinstance(cfg, DiscriminatorConfig):
            raise TypeError(f"Discriminator(cfg): cfg must be a DiscriminatorConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        E = 4 * cfg.base_ch
        self.time_emb = TimeEmbedding(cfg.time_embedding, cfg.base_ch, E, cfg.fourier_scale,
                                      cfg.time_scale)
        # x_prev only: its values must be resolved finely (a grey level is 0.12 in model
        # space), x_t's noise need not be.
        self.pixel_feats = (PixelFourierFeatures(cfg.pixel_features, cfg.pixel_scale)
                            if cfg.pixel_features else
                            PixelLevelFeatures(cfg.pixel_levels, cfg.pixel_level_width)
                            if cfg.pixel_levels else None)
        extra = self.pixel_feats.channels(cfg.in_ch) if self.pixel_feats is not None else 0
        self.conv_in = nn.Conv2d(2 * cfg.in_ch + extra, cfg.base_ch, 3, padding=1)
        self.blocks = _Blocks()
        ch = cfg.base_ch
        for i, mult in enumerate(cfg.ch_mult):
            self.blocks.append(ResBlock(ch, cfg.base_ch * mult, E, cfg.num_groups,
                                        skip_rescale=cfg.skip_rescale))
            ch = cfg.base_ch * mult
            if i < len(cfg.ch_mult) - 1:
                self.blocks.append(Downsample(ch))
        # Minibatch std: one extra channel, folded back to ch by a 3x3 conv.
        self.mbstd_conv = nn.Conv2d(ch + 1, ch, 3, padding=1) if cfg.mbstd_group else None
        self.norm_out = AdaGroupNormSiLU(ch, cfg.num_groups, 0)
        self.head = nn.Linear(ch, 1)

    def _mbstd(self, h: torch.Tensor) -> torch.Tensor:
        """Append the minibatch std (layers.minibatch_std over (C, H, W)) as one channel."""
        N, _, H, W = h.shape
        s = minibatch_std(h, self.cfg.mbstd_group)[:, None, None, None].expand(N, 1, H, W)
        return self.mbstd_conv(torch.cat([h, s], dim=1))

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        N = x_t.shape[0]
        shape = (N, cfg.in_ch, cfg.resolution, cfg.resolution)
        check_input("x_prev", x_prev, shape)
        check_input("x_t", x_t, shape)
        check_input("t", t, (N,))
        emb = torch.nn.functional.silu(self.time_emb(t))
        parts = [x_prev, x_t]
        if self.pixel_feats is not None:
            feats = self.pixel_feats(x_prev)
            if cfg.pixel_max_t > 0:
                # Only the steps that need a grey level resolved see it; the others keep the
                # raw-value D whose shapes were better (docs/ddgan_tuning.md).
                feats = feats * (t <= cfg.pixel_max_t).to(feats.dtype)[:, None, None, None]
            parts.append(feats)
        h = self.blocks(self.conv_in(torch.cat(parts, dim=1)), emb)
        if self.mbstd_conv is not None:
            h = self._mbstd(h)
        h = self.norm_out(h).sum(dim=(2, 3))  # (N, ch)
        return self.head(h)[:, 0]
