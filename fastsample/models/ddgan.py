"""Denoising Diffusion GAN (reference/ddgan.md): a conditional GAN models the multimodal
denoising distribution p(x_{i-1} | x_i) of a T-step VP chain (T = 4 by default).

Generator x_0' = G(x_i, z, i) (U-Net with AdaGN of z for images, TimeMLP with z for 2D points),
then x'_{i-1} ~ q(x_{i-1} | x_i, x_0') (sec. 2). Discriminator D(x_{i-1}, x_i, i) (sec. 3),
non-saturating loss, lazy R1 penalty on real x_{i-1}, Adam(0.5, 0.9), separate G/D learning
rates with cosine decay, EMA of G. Only the generator is released; D lives in the training state.

Spaces: the model works in [-1, 1] for images (x = 2y - 1 of the dequantised data y) and in the
data's own coordinates for 2D points; `Model.to_data` maps samples back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastsample.nets import (Discriminator, DiscriminatorConfig, MLPConfig, TimeMLP, UNet,
                             UNetConfig)
from fastsample import metrics
from fastsample.nets.layers import PixelLevelFeatures, minibatch_std
from fastsample.sde import ddgan_schedule
from fastsample.models.registry import ExportPart, IOTensor, card_dict
from fastsample.samplers import plan as plans
from fastsample.samplers import ddgan as sd

SAMPLERS = ("posterior",)
ARCHS = ("unet", "mlp")
# 4: a 4x4 latent (latent DDGAN's G).
_UNET_PRESET_BY_RESOLUTION = {4: "latent4", 8: "digits8", 32: "img32", 64: "img64"}


# ---------------------------------------------------------------------------------------------
# Config.

@dataclass(frozen=True)
class Config:
    T: int = 4                      # denoising steps = generator calls per sample (sec. 1)
    z_dim: int = 32                 # latent z size fed to G (sec. 2)
    arch: str = "unet"              # "unet" (images) | "mlp" (2D points); set by default_config
    base_ch: int = 32               # U-Net generator channels at the first level
    disc_base_ch: int = 32          # image discriminator channels at the first level
    disc_ch_mult: tuple = (1, 2, 2) # image discriminator channel multipliers (8 -> 4 -> 2)
    disc_mbstd: int = 0             # D: minibatch-std group size (0 = off)
    cond_group: int = 0             # MLP D: groups of this many pairs share x_i (0 = off; = disc_mbstd)
    hidden: int = 128               # MLP width (G and D, 2D only)
    num_layers: int = 4             # MLP hidden layers (G and D, 2D only)
    input_features: int = 0         # MLP G: random Fourier features of x_i (MLPConfig); 0 = off
    input_scale: float = 1.0        # ... their frequency std, cycles per unit
    disc_input_features: int = 0    # D: random Fourier features of its input; 0 = off. MLP D:
                                    # of (x_{i-1}, x_i); image D: of each pixel value of x_{i-1}
    disc_input_scale: float = 1.0   # ... their frequency std (D must resolve modes of std 0.018,
                                    # or a background band of 0.12 in model space)
    disc_input_levels: int = 0      # image D: tanh ramps of x_{i-1} at the boundaries of this
                                    # many grey levels (nets.layers.PixelLevelFeatures); 0 = off
    disc_input_max_step: int = 0    # image D: its pixel features only on pairs at steps
                                    # i <= this (zeros elsewhere); 0 = every step
    lr_g: float = 1.6e-4            # generator Adam lr (sec. 3)
    lr_d: float = 1.25e-4           # discriminator Adam lr (sec. 3)
    beta1: float = 0.5              # Adam beta1 (sec. 3)
    beta2: float = 0.9              # Adam beta2 (sec. 3)
    lr_min_frac: float = 0.1        # cosine decay ends at lr * lr_min_frac; 1 = constant lr
    r1_gamma: float = 0.02          # R1 weight: gamma/2 E||grad_x D(x_real)||^2 (sec. 3)
    lazy_reg: int = 15              # R1 every lazy_reg steps, scaled by lazy_reg; 1 = every step
    eps: float = 1e-3               # schedule: forward time of x_0 (sec. 1)
    beta_min: float = 0.1           # schedule: VP beta(0)
    beta_max: float = 20.0          # schedule: VP beta(1)
    t_power: float = 1.0            # schedule: t_i = eps + (1 - eps) (i / T)^t_power
    eval_samples: int = 1000        # samples drawn by Family.evaluate
    train_steps: int = 8000         # default optimiser steps (the CLI reads it)
    batch_size: int = 64            # default global batch (the CLI reads it)
    ema_decay: float = 0.999        # EMA of G weights (the CLI reads it)
    grad_clip: float = 0.0          # max grad norm per optimiser group (the CLI reads it); 0 = off
    dequantize: bool = True         # images: train on uniformly dequantised grey levels (the CLI
                                    # reads it); False: on the exact levels k/16
    div_weight: float = 0.0         # > 0: G also maximises div_weight * E min(ratio, div_tau),
    div_tau: float = 1.0            # ratio = mean|x_0'(z1) - x_0'(z2)| / mean|z1 - z2| for one x_i
                                    # (diversity-sensitive cGAN loss); 0 = off
    es_weight: float = 0.0          # > 0: G also minimises es_weight * the energy score of its
                                    # x_0' draws against the real x_0 behind x_i (energy_score);
                                    # 0 = off
    es_beta: float = 1.0            # ... the score's exponent, in (0, 2)
    tex_weight: float = 0.0         # > 0: a second, local critic (TextureCritic: a patch critic
                                    # on the grey levels of x_{i-1}) at steps i <= tex_max_step,
                                    # its G loss weighted by this; 0 = off (images only)
    tex_levels: int = 17            # ... the grey levels it sees (PixelLevelFeatures)
    tex_max_step: int = 1           # ... the steps it judges
    skip_sigma_data: float = 0.0    # > 0: G = c_skip(i) x_i + c_out(i) F (SkipGenerator), with
                                    # this data std; 0 = off (G's net outputs x_0' itself)

    def __post_init__(self):
        object.__setattr__(self, "disc_ch_mult", tuple(self.disc_ch_mult))
        for name in ("T", "z_dim", "base_ch", "disc_base_ch", "hidden", "num_layers", "lazy_reg",
                     "eval_samples", "train_steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ddgan Config.{name} = {v!r}; must be an int >= 1")
        if self.arch not in ARCHS:
            raise ValueError(f"ddgan Config.arch = {self.arch!r}; choose one of {'|'.join(ARCHS)}")
        for name in ("lr_g", "lr_d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ddgan Config.{name} = {getattr(self, name)!r}; must be > 0")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"ddgan Config.{name} = {getattr(self, name)!r}; must be in [0, 1)")
        if not 0 < self.lr_min_frac <= 1:
            raise ValueError(f"ddgan Config.lr_min_frac = {self.lr_min_frac!r}; must be in (0, 1]")
        if isinstance(self.disc_mbstd, bool) or not isinstance(self.disc_mbstd, int) \
                or self.disc_mbstd < 0:
            raise ValueError(f"ddgan Config.disc_mbstd = {self.disc_mbstd!r}; must be an int >= 0")
        if isinstance(self.cond_group, bool) or not isinstance(self.cond_group, int) \
                or self.cond_group < 0 or self.cond_group == 1:
            raise ValueError(f"ddgan Config.cond_group = {self.cond_group!r}; must be 0 (off) or "
                             f"an int >= 2")
        if self.cond_group:
            # The group is only visible to D through its minibatch-std feature.
            if self.arch != "mlp" or self.disc_mbstd != self.cond_group:
                raise ValueError(f"ddgan Config.cond_group = {self.cond_group} needs the MLP D "
                                 f"(arch 'mlp') with disc_mbstd = {self.cond_group}; got arch "
                                 f"{self.arch!r}, disc_mbstd {self.disc_mbstd}")
            if self.batch_size % self.cond_group:
                raise ValueError(f"ddgan Config.batch_size = {self.batch_size} is not a multiple "
                                 f"of cond_group = {self.cond_group}")
        if isinstance(self.disc_input_max_step, bool) or not isinstance(self.disc_input_max_step, int) \
                or not 0 <= self.disc_input_max_step <= self.T:
            raise ValueError(f"ddgan Config.disc_input_max_step = {self.disc_input_max_step!r}; "
                             f"must be an int in [0, T = {self.T}] (0 = every step)")
        if self.disc_input_max_step and (self.arch != "unet" or not (self.disc_input_features
                                                                      or self.disc_input_levels)):
            raise ValueError(f"ddgan Config.disc_input_max_step = {self.disc_input_max_step} "
                             f"gates the image D's pixel features: it needs arch 'unet' and "
                             f"disc_input_features > 0 or disc_input_levels > 0 (got arch "
                             f"{self.arch!r}, disc_input_features {self.disc_input_features}, "
                             f"disc_input_levels {self.disc_input_levels})")
        if self.disc_input_levels and self.arch != "unet":
            raise ValueError(f"ddgan Config.disc_input_levels = {self.disc_input_levels} is for "
                             f"the image D (arch 'unet'); got arch {self.arch!r}")
        if not isinstance(self.dequantize, bool):
            raise ValueError(f"ddgan Config.dequantize = {self.dequantize!r}; must be true or false")
        if not self.grad_clip >= 0:
            raise ValueError(f"ddgan Config.grad_clip = {self.grad_clip!r}; must be >= 0 (0 = off)")
        if not (isinstance(self.skip_sigma_data, (int, float)) and 0 <= self.skip_sigma_data
                < float("inf")):
            raise ValueError(f"ddgan Config.skip_sigma_data = {self.skip_sigma_data!r}; must be "
                             f">= 0 (0 = off)")
        for name in ("div_weight", "div_tau", "es_weight", "tex_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"ddgan Config.{name} = {v!r}; must be a number >= 0")
        if isinstance(self.tex_levels, bool) or not isinstance(self.tex_levels, int) \
                or self.tex_levels < 2:
            raise ValueError(f"ddgan Config.tex_levels = {self.tex_levels!r}; must be an int >= 2")
        if isinstance(self.tex_max_step, bool) or not isinstance(self.tex_max_step, int) \
                or not 1 <= self.tex_max_step <= self.T:
            raise ValueError(f"ddgan Config.tex_max_step = {self.tex_max_step!r}; must be an int "
                             f"in [1, T = {self.T}]")
        if self.tex_weight > 0 and self.arch != "unet":
            raise ValueError(f"ddgan Config.tex_weight = {self.tex_weight} is for images (arch "
                             f"'unet'); got arch {self.arch!r}")
        if not (isinstance(self.es_beta, (int, float)) and not isinstance(self.es_beta, bool)
                and 0 < self.es_beta < 2):
            raise ValueError(f"ddgan Config.es_beta = {self.es_beta!r}; must be in (0, 2) (the "
                             f"energy score is strictly proper only there)")
        if self.div_weight > 0 and self.div_tau <= 0:
            raise ValueError(f"ddgan Config.div_tau = {self.div_tau!r}; must be > 0 when "
                             f"div_weight > 0")
        if not self.r1_gamma >= 0:
            raise ValueError(f"ddgan Config.r1_gamma = {self.r1_gamma!r}; must be >= 0")
        try:  # eps, beta_min/max, t_power: the schedule's own checks, at config time
            schedule_of(self)
        except ValueError as e:
            raise ValueError(f"ddgan Config: {e}") from None


def default_config(data) -> Config:
    """The released recipes. Digits / images: the Config defaults (U-Net G, ddgan.md's lrs and
    Adam betas, no gradient clipping, batch 64, 8000 steps) plus a conv D with a minibatch-std
    feature in groups of 4, which lets D see the class mix of a batch at the noisy steps where a
    per-pair D cannot. With the batch ordered by i, no clip and 8000 steps this took digits FD
    from 63 to 17.7 (one draw). G is also scored on the real x_0 behind x_i by the energy score
    (es_weight 5), a proper scoring rule: without a z term G ignored z (z_usage 0.5-0.9% of the
    posterior's spread per step); the diversity term (div_weight 1) made it use z but
    over-spread the noisy steps (81-319%); the energy score gives 96-131% with G's mean 1.3-6x
    nearer the posterior's and recall 0.74 -> 0.77 (docs/ddgan_tuning.md).
    2D points: MLPs, batch 256, higher lrs (at ddgan.md's lrs the
    MLP critic learns too slowly and G collapses to a line), the loop's clip at 1, and for
    modes of std 0.018 (grid25, docs/grid25.md): 64 Fourier features of the input at 2
    cycles/unit for G and D (a raw-coordinate D stays at chance), R1 0.005 (0.05 keeps D too
    smooth to see the modes), t_power 3 (the last step becomes a near-unimodal denoise, from
    alpha_bar 0.996) and 12000 steps: 2.4% -> 65% of samples within 3 std of a mode.
    What was tried and measured, and not kept: docs/ddgan_tuning.md."""
    if data.kind == "image":
        return Config(arch="unet", disc_mbstd=4, es_weight=5.0)
    return Config(arch="mlp", z_dim=8, lr_g=5e-4, lr_d=1e-3, r1_gamma=0.005, lazy_reg=1,
                  train_steps=12000, batch_size=256, ema_decay=0.995, grad_clip=1.0, t_power=3.0,
                  input_features=64, input_scale=2.0, disc_input_features=64,
                  disc_input_scale=2.0)


def schedule_of(cfg: Config):
    return ddgan_schedule(cfg.T, eps=cfg.eps, beta_min=cfg.beta_min, beta_max=cfg.beta_max,
                          t_power=cfg.t_power)


# ---------------------------------------------------------------------------------------------
# Networks built from (Config, data shape).

def generator_config(cfg: Config, data_shape: tuple) -> UNetConfig | MLPConfig:
    """G's net config: the time input is the step index i (sinusoidal, time_scale 1)."""
    if cfg.arch == "unet":
        C, H, W = data_shape
        if H != W or H not in _UNET_PRESET_BY_RESOLUTION:
            raise ValueError(f"ddgan: image shape {tuple(data_shape)} has no U-Net preset; square "
                             f"resolutions {sorted(_UNET_PRESET_BY_RESOLUTION)} are supported")
        return UNetConfig.preset(_UNET_PRESET_BY_RESOLUTION[H], in_ch=C, out_ch=C,
                                 base_ch=cfg.base_ch, z_dim=cfg.z_dim,
                                 time_embedding="sinusoidal", time_scale=1.0)
    (D,) = data_shape
    return MLPConfig(in_dim=D, out_dim=D, hidden=cfg.hidden, num_layers=cfg.num_layers,
                     z_dim=cfg.z_dim, time_embedding="sinusoidal", time_scale=1.0,
                     input_features=cfg.input_features, input_scale=cfg.input_scale)


def build_generator(net_cfg: UNetConfig | MLPConfig) -> nn.Module:
    return UNet(net_cfg) if isinstance(net_cfg, UNetConfig) else TimeMLP(net_cfg)


class SkipGenerator(nn.Module):
    """x_0' = c_skip(i) x_i / sqrt(alpha_bar_i) + c_out(i) F(x_i, i, z), Karras et al.'s (2022)
    preconditioning in x_0 units: x_i / sqrt(alpha_bar_i) = x_0 + sigma_i eps with sigma_i^2 =
    (1 - alpha_bar_i) / alpha_bar_i, c_skip = sigma_d^2 / (sigma_i^2 + sigma_d^2), c_out =
    sigma_i sigma_d / sqrt(sigma_i^2 + sigma_d^2).

    Why: at a step whose x_i is nearly clean, G's x_0' must match x_i to within the data's own
    fine scale, and a plain net gets there only as precisely as D can resolve; on grid25 (modes
    of std 0.018) the plain G sent 29% of its draws off a mode from an x_1 whose noise (std
    0.011) was smaller than a mode. Here F's error is scaled by c_out ~ sigma_i, so the clean
    steps are near the identity by construction; at the noisy ones c_skip -> 0 and F is G.
    The tables are rebuilt from the schedule (not saved), indexed by the step i."""

    def __init__(self, net: nn.Module, schedule, sigma_data: float):
        super().__init__()
        self.net = net
        ab = schedule.alpha_bar.double()
        sig2 = (1 - ab) / ab
        sd2 = float(sigma_data) ** 2
        self.register_buffer("c_skip", (sd2 / (sig2 + sd2) / ab.sqrt()).float(), persistent=False)
        self.register_buffer("c_out", (sig2.sqrt() * sigma_data / (sig2 + sd2).sqrt()).float(),
                             persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        k = t.round().long().clamp(1, self.c_skip.shape[0] - 1)
        shape = (-1, *([1] * (x.dim() - 1)))
        return (self.c_skip[k].view(shape).to(x.dtype) * x
                + self.c_out[k].view(shape).to(x.dtype) * self.net(x, t, z))


def make_generator(cfg: Config, data_shape: tuple) -> nn.Module:
    """G as trained and released: the net, wrapped in SkipGenerator when skip_sigma_data > 0
    (its state-dict keys then start with `net.`)."""
    net = build_generator(generator_config(cfg, data_shape))
    return SkipGenerator(net, schedule_of(cfg), cfg.skip_sigma_data) if cfg.skip_sigma_data \
        else net


class MLPDiscriminator(nn.Module):
    """D(x_prev (N, D), x_t (N, D), t (N,)) -> logits (N,) for 2D points. mbstd_group > 1: the
    MLP's output is a feature vector, and the head also sees its std over groups of that many
    consecutive rows (averaged over features), as the image D's minibatch-std channel."""

    def __init__(self, cfg: MLPConfig, mbstd_group: int = 0):
        super().__init__()
        self.mbstd_group = mbstd_group
        if mbstd_group > 1:
            self.net = TimeMLP(dataclasses.replace(cfg, out_dim=cfg.hidden))
            self.head = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden + 1, cfg.hidden), nn.SiLU(),
                                      nn.Linear(cfg.hidden, 1))
        else:
            self.net, self.head = TimeMLP(cfg), None

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.net(torch.cat([x_prev, x_t], dim=1), t)
        if self.head is None:
            return h[:, 0]
        s = minibatch_std(h, self.mbstd_group)
        return self.head(torch.cat([h, s[:, None]], dim=1))[:, 0]


def build_discriminator(cfg: Config, data_shape: tuple) -> nn.Module:
    if cfg.arch == "unet":
        C, H, _ = data_shape
        return Discriminator(DiscriminatorConfig(in_ch=C, resolution=H, base_ch=cfg.disc_base_ch,
                                                 ch_mult=cfg.disc_ch_mult, time_scale=1.0,
                                                 mbstd_group=cfg.disc_mbstd,
                                                 pixel_features=cfg.disc_input_features,
                                                 pixel_scale=cfg.disc_input_scale,
                                                 pixel_levels=cfg.disc_input_levels,
                                                 pixel_max_t=float(cfg.disc_input_max_step)))
    (D,) = data_shape
    # A zero output layer would leave D blind at the start; a GAN wants a live critic from step 1.
    return MLPDiscriminator(MLPConfig(in_dim=2 * D, out_dim=1, hidden=cfg.hidden,
                                      num_layers=cfg.num_layers, time_embedding="sinusoidal",
                                      time_scale=1.0, zero_init_out=False,
                                      input_features=cfg.disc_input_features,
                                      input_scale=cfg.disc_input_scale), cfg.disc_mbstd)


class TextureCritic(nn.Module):
    """x (N, C, H, W) in model space -> per-pixel logits (N, H, W): a patch critic (5 x 5
    receptive field) on the grey-level ramps of x (PixelLevelFeatures, half a level wide).

    The main D sees raw values and is smooth in each; it cannot tell a background pixel one grey
    level off, and lifting its own input to grey levels cost the digits their shapes (FD 16 ->
    123, docs/ddgan_tuning.md). This critic sees only local grey-level texture, has its own
    loss, and its pull on G is weighted apart (tex_weight), so the two views do not compete
    for one D's capacity."""

    def __init__(self, in_ch: int, levels: int, ch: int = 32):
        super().__init__()
        self.levels = PixelLevelFeatures(levels, 0.5)
        self.net = nn.Sequential(nn.Conv2d(self.levels.channels(in_ch), ch, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"TextureCritic: x must be (N, C, H, W), got shape {tuple(x.shape)}")
        return self.net(self.levels(x))[:, 0]


def _check_arch(cfg: Config, kind: str) -> None:
    want = "unet" if kind == "image" else "mlp"
    if cfg.arch != want:
        raise ValueError(f"ddgan Config.arch = {cfg.arch!r} does not fit {kind} data; use {want!r}")


def diversity_ratio(x_a: torch.Tensor, x_b: torch.Tensor, z_a: torch.Tensor,
                    z_b: torch.Tensor) -> torch.Tensor:
    """Per row: mean |x_a - x_b| over mean |z_a - z_b|, how far G's output moves per unit of
    latent (Yang et al. 2019's diversity-sensitive term, L1 on both sides). (N,)"""
    return (x_a - x_b).abs().flatten(1).mean(1) / (z_a - z_b).abs().mean(1).clamp(min=1e-6)


def energy_score(x_a: torch.Tensor, x_b: torch.Tensor, x0: torch.Tensor,
                 beta: float = 1.0) -> torch.Tensor:
    """Per row: the energy score of the two-draw distribution {x_a, x_b} at the outcome x0,
    0.5 (|x_a - x0|^beta + |x_b - x0|^beta) - 0.5 |x_a - x_b|^beta, |.| the RMS over a row's
    entries. Strictly proper for 0 < beta < 2 (Gneiting & Raftery 2007): its expectation over
    x0 ~ p is minimised only when x_a, x_b are independent draws of p, so it asks G for the
    posterior p(x_0 | x_i) itself, its spread included, where a regression loss would ask for
    the posterior's mean. Its pull on a draw has length ~|error|^(beta - 1): constant at beta 1,
    fading near the target as beta nears 2. (N,)"""
    def dist(d: torch.Tensor) -> torch.Tensor:
        # The epsilon keeps the gradient finite where two draws coincide (a collapsed G).
        return (d.flatten(1).pow(2).mean(1) + 1e-12).pow(beta / 2)
    return 0.5 * (dist(x_a - x0) + dist(x_b - x0)) - 0.5 * dist(x_a - x_b)


_POSTERIOR_ROWS = 4096   # training rows behind each step's posterior draws (cond_group)


def sample_rows(logw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row indices from the categorical softmax(logw) (M, R), by the inverse CDF at the
    uniforms u (M, K): (M, K) int64."""
    cdf = torch.softmax(logw.double(), dim=1).cumsum(dim=1)
    # right=True: the first j with cdf_j > u, so a zero-weight row is never drawn, not even at u = 0.
    idx = torch.searchsorted(cdf, u.double().to(cdf.device), right=True)
    return idx.clamp(max=logw.shape[1] - 1)  # u above a rounded cdf[-1] < 1


# ---------------------------------------------------------------------------------------------
# Data space <-> model space.

def to_model(x: torch.Tensor, kind: str) -> torch.Tensor:
    return 2.0 * x - 1.0 if kind == "image" else x


def to_data(x: torch.Tensor, kind: str, dataset: str) -> torch.Tensor:
    if kind == "points":
        return x.float()
    y = (x.float() + 1.0) / 2.0
    if dataset == "digits":
        from fastsample.data import quantize_digits
        return quantize_digits(y)
    return y.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The released model: EMA generator + schedule.

# Training-only Config fields that were removed (experiments not kept, see docs/ddgan_tuning.md),
# with the value that meant "off". Cards written before the removal carry them.
_REMOVED_OFF = {"ds_weight": 0.0}
_REMOVED_INERT = ("ds_cap",)       # the diversity term's cap: inert while ds_weight is off


def _drop_removed(config: dict) -> dict:
    """A card's config without the removed fields when they hold their off value; a card whose
    checkpoint was trained with one of those features on is refused, naming the key."""
    for key, off in _REMOVED_OFF.items():
        if key in config and config[key] != off:
            raise ValueError(f"ddgan checkpoint card: config.{key} = {config[key]!r}: this "
                             f"checkpoint was trained with {key}, a feature removed from "
                             f"fastsample (off = {off!r}; see docs/ddgan_tuning.md)")
    removed = set(_REMOVED_OFF) | set(_REMOVED_INERT)
    return {k: v for k, v in config.items() if k not in removed}


class Model(nn.Module):
    """Sampling-ready DDGAN: `denoise(x_i, z, i)` is G; `schedule` the T-step DDGANSchedule."""

    family = "ddgan"

    def __init__(self, cfg: Config, dataset: str, kind: str, data_shape: tuple):
        super().__init__()
        _check_arch(cfg, kind)
        self.cfg, self.dataset, self.kind = cfg, dataset, kind
        self.data_shape = tuple(int(s) for s in data_shape)
        self.generator = make_generator(cfg, self.data_shape)
        self.schedule = schedule_of(cfg)

    @property
    def T(self) -> int:
        return self.cfg.T

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    def denoise(self, x_i: torch.Tensor, z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """x_0' = G(x_i, z, i): x_i (N, *data_shape), z (N, z_dim), i (N,) float step index."""
        return self.generator(x_i, i, z)

    forward = denoise

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return to_data(x, self.kind, self.dataset)

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        card = upgrade_card(card_dict(card))
        shape = tuple(card["data_shape"])
        try:
            cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in _drop_removed(card["config"]).items()})
        except TypeError as e:
            raise ValueError(f"ddgan checkpoint card: config is not a ddgan Config ({e})") from None
        model = cls(cfg, card["dataset"], "points" if len(shape) == 1 else "image", shape)
        model.generator.load_state_dict(state_dict)
        return model


# ---------------------------------------------------------------------------------------------
# Training (the shared loop's Family protocol).

class Family:
    """DDGAN training step (sec. 3): one D update (with lazy R1), then one G update."""

    name = "ddgan"
    released = ("generator",)

    def __init__(self, data, config: Config):
        _check_arch(config, data.kind)
        self.data, self.cfg = data, config
        self.kind = data.kind
        self.data_shape = tuple(data.x.shape[1:])
        self.schedule = schedule_of(config)
        sch = self.schedule
        # Float64 tables on the host, indexed by the step i, cast once per step to the batch.
        self._sqrt_ab = torch.sqrt(sch.alpha_bar).float()
        self._sqrt_1m_ab = torch.sqrt(1.0 - sch.alpha_bar).float()
        self._sqrt_alpha = torch.sqrt(sch.alpha).float()
        self._sqrt_beta = torch.sqrt(sch.beta).float()
        self._c0, self._c1 = sch.c0.float(), sch.c1.float()
        # The last step (i = 1) has sigma_post = 0 exactly; NaN at index 0 is never read.
        self._sigma_post = torch.sqrt(sch.sigma2_post.clamp(min=0)).float()

    def modules(self) -> dict[str, nn.Module]:
        mods = {"generator": make_generator(self.cfg, self.data_shape),
                "discriminator": build_discriminator(self.cfg, self.data_shape)}
        if self.cfg.tex_weight > 0:
            mods["texture"] = TextureCritic(self.data_shape[0], self.cfg.tex_levels)
        return mods

    def optimizers(self, modules):
        c = self.cfg
        # Kept so step() can set the cosine lr; the loop restores their state in place on resume.
        self._opts = {"disc": torch.optim.Adam(modules["discriminator"].parameters(), lr=c.lr_d,
                                         betas=(c.beta1, c.beta2)),
                "gen": torch.optim.Adam(modules["generator"].parameters(), lr=c.lr_g,
                                        betas=(c.beta1, c.beta2))}
        if "texture" in modules:
            self._opts["tex"] = torch.optim.Adam(modules["texture"].parameters(), lr=c.lr_d,
                                                 betas=(c.beta1, c.beta2))
        return self._opts

    def _coef(self, table: torch.Tensor, i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return table[i].to(x.device).view(-1, *([1] * (x.dim() - 1)))

    def _set_lr(self, ctx) -> None:
        # Cosine decay from lr to lr * lr_min_frac over the run's steps (`--steps` when given,
        # else train_steps), set from the step counter so resume needs no scheduler state.
        c = self.cfg
        total = ctx.total_steps
        frac = min(ctx.step - 1, total) / total
        scale = c.lr_min_frac + (1 - c.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * frac))
        for name, lr in (("disc", c.lr_d), ("gen", c.lr_g), ("tex", c.lr_d)):
            for g in (self._opts[name].param_groups if name in self._opts else ()):
                g["lr"] = lr * scale

    def _real_pair(self, ctx, x0: torch.Tensor, i: torch.Tensor):
        x_prev = (self._coef(self._sqrt_ab, i - 1, x0) * x0
                  + self._coef(self._sqrt_1m_ab, i - 1, x0) * ctx.randn(*x0.shape))
        x_i = (self._coef(self._sqrt_alpha, i, x0) * x_prev
               + self._coef(self._sqrt_beta, i, x0) * ctx.randn(*x0.shape))
        return x_prev, x_i

    def _grouped_real(self, ctx, x0: torch.Tensor):
        """Real rows in groups of K = cond_group that share one x_i: the group's first x_{i-1}
        is the usual pair's, the other K - 1 are further draws from p(x_{i-1} | x_i) of the
        training set (its row x_0 by Bayes' rule, then q(x_{i-1} | x_i, x_0)). Each row is still
        a draw of the real pair's distribution, but D's minibatch std of a group now measures
        the spread of p(x_{i-1} | x_i), which a G that ignores z cannot show; the fake groups
        share the same x_i. Also returns each row's x_0 (a draw of p(x_0 | x_i) too)."""
        K, N = self.cfg.cond_group, x0.shape[0]
        if N % K:
            raise ValueError(f"ddgan: the batch on this process ({N}) is not a multiple of "
                             f"cond_group = {K}")
        M = N // K
        i_g = ctx.randint(self.cfg.T, M).cpu() + 1
        prev_a, xi_a = self._real_pair(ctx, x0[:M], i_g)
        rows = self.data.x
        if len(rows) > _POSTERIOR_ROWS:
            # A fresh random subset each step: the posterior of its empirical distribution, a
            # close stand-in for the whole set's at a sixteenth of the (M, R) cdist (4096 rows
            # in the whole set's place measured 26 vs 4 steps/s on grid25).
            rows = rows[ctx.randint(len(rows), _POSTERIOR_ROWS).cpu()]
        rows = rows.to(device=x0.device, dtype=torch.float64)
        logw = metrics.posterior_log_weights(xi_a, self._sqrt_ab[i_g].to(x0.device), rows)
        x0_k = rows[sample_rows(logw, ctx.rand(M, K - 1)).flatten()].to(x0.dtype)
        x0_k = x0_k.view(M, K - 1, *x0.shape[1:])
        c = lambda table: self._coef(table, i_g, x0)[:, None]
        prev_k = (c(self._c0) * x0_k + c(self._c1) * xi_a[:, None]
                  + c(self._sigma_post) * ctx.randn(M, K - 1, *x0.shape[1:]))
        x_prev = torch.cat([prev_a[:, None], prev_k], dim=1).flatten(0, 1)
        x0_rows = torch.cat([x0[:M, None], x0_k], dim=1).flatten(0, 1)
        return x_prev, xi_a.repeat_interleave(K, dim=0), i_g.repeat_interleave(K), x0_rows

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.gan_step(ctx, to_model(batch, self.kind))

    def gan_step(self, ctx, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """One D update (with lazy R1) and one G update on model-space data x0."""
        c = self.cfg
        self._set_lr(ctx)
        N = x0.shape[0]
        G, D = ctx.m("generator"), ctx.m("discriminator")

        if c.cond_group:
            x_prev, x_i, i, x0 = self._grouped_real(ctx, x0)
        else:
            # Real pair: x_{i-1} ~ q(x_{i-1} | x_0), x_i ~ q(x_i | x_{i-1}), i uniform in 1..T.
            i = ctx.randint(c.T, N).cpu() + 1
            if c.disc_mbstd > 1:
                # D's minibatch-std groups are consecutive samples; sorted by i, a group mostly
                # shares one noise level, so its std measures sample diversity at that step
                # instead of the spread between steps. The rows are iid: the order changes
                # nothing else.
                i = i.sort().values
            x_prev, x_i = self._real_pair(ctx, x0, i)
        t = i.to(device=x0.device, dtype=torch.float32)

        # Fake pair: x_0' = G(x_i, z, i), x'_{i-1} ~ q(x_{i-1} | x_i, x_0').
        z = ctx.randn(N, c.z_dim)
        x0_pred = G(x_i, t, z)
        x_fake = (self._coef(self._c0, i, x0) * x0_pred + self._coef(self._c1, i, x0) * x_i
                  + self._coef(self._sigma_post, i, x0) * ctx.randn(*x0.shape))

        # D step: one forward over [real; fake] (GroupNorm is per sample, so this equals two
        # forwards, and DDP sees one forward per backward).
        do_r1 = c.r1_gamma > 0 and ctx.step % c.lazy_reg == 0
        x_real = x_prev.detach().requires_grad_(do_r1)
        logits = D(torch.cat([x_real, x_fake.detach()]), torch.cat([x_i, x_i]), torch.cat([t, t]))
        d_real, d_fake = logits[:N], logits[N:]
        loss_d_real = F.softplus(-d_real).mean()
        loss_d_fake = F.softplus(d_fake).mean()
        loss_d = loss_d_real + loss_d_fake
        r1 = torch.zeros((), device=x0.device)
        if do_r1:
            (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            loss_d = loss_d + 0.5 * c.r1_gamma * c.lazy_reg * r1
        ctx.optimize("disc", loss_d)

        loss_tex = None
        if c.tex_weight > 0:
            # Every row goes through the (small) critic and a mask keeps the judged steps, so
            # each process runs the same graph whatever its draw of i (DDP).
            Dt = ctx.m("texture")
            w_tex = (i <= c.tex_max_step).to(device=x0.device, dtype=x0.dtype)
            w_tex = w_tex / w_tex.sum().clamp(min=1)
            lt = Dt(torch.cat([x_prev.detach(), x_fake.detach()])).flatten(1).float()
            loss_tex = ((F.softplus(-lt[:N]).mean(1) + F.softplus(lt[N:]).mean(1)) * w_tex).sum()
            ctx.optimize("tex", loss_tex)

        # G step: non-saturating loss against the updated D.
        loss_g = F.softplus(-D(x_fake, x_i, t)).mean()
        div = es = None
        total_g = loss_g
        if loss_tex is not None:
            tex_g = (F.softplus(-Dt(x_fake).flatten(1).float()).mean(1) * w_tex).sum()
            total_g = total_g + c.tex_weight * tex_g
        if c.div_weight > 0 or c.es_weight > 0:
            z2 = ctx.randn(N, c.z_dim)
            x0_pred2 = G(x_i, t, z2)
        if c.div_weight > 0:
            # A conditional G collapses onto one x_0' per x_i (z_usage ~0.5%): D, seeing one pair
            # per x_i, cannot ask for the posterior's other modes. Rewarding output change per
            # unit of z change makes ignoring z cost something; the clip at div_tau stops the
            # reward from outbidding D where the true posterior is narrow.
            div = diversity_ratio(x0_pred, x0_pred2, z, z2).clamp(max=c.div_tau).mean()
            total_g = total_g - c.div_weight * div
        if c.es_weight > 0:
            # D's gradient is all a GAN's G hears, and a D smooth in each value cannot see a
            # pixel one grey level off (or a point 1/40 of the grid's spacing off a mode). The
            # real x_0 behind x_i is a draw of p(x_0 | x_i), so a proper score of G's draws at
            # it supervises every value directly without pulling G to the posterior's mean.
            es = energy_score(x0_pred, x0_pred2, x0, c.es_beta).mean()
            total_g = total_g + c.es_weight * es
        ctx.optimize("gen", total_g)
        out = {"loss_d": loss_d.detach(), "loss_d_real": loss_d_real.detach(),
               "loss_d_fake": loss_d_fake.detach(), "loss_g": loss_g.detach()}
        if div is not None:
            out["div"] = div.detach()
        if es is not None:
            out["es"] = es.detach()
        if loss_tex is not None:
            out["loss_tex"] = loss_tex.detach()
            out["loss_g_tex"] = tex_g.detach()
        if do_r1:
            out["r1"] = r1.detach()
        return out

    def card(self) -> dict:
        gcfg = generator_config(self.cfg, self.data_shape)
        return {"dataset": self.data.name, "config": _json_safe(asdict(self.cfg)),
                "data_shape": list(self.data_shape),
                "net_config": {"generator": {"kind": self.cfg.arch,
                                             **_json_safe(gcfg.to_dict())}},
                "sde_config": {"kind": "ddgan_schedule", "T": self.cfg.T, "eps": self.cfg.eps,
                               "beta_min": self.cfg.beta_min, "beta_max": self.cfg.beta_max,
                               "t_power": self.cfg.t_power}}

    def evaluate(self, ema_modules: dict) -> dict:
        """Metrics of cfg.eval_samples posterior samples from the EMA generator."""
        from fastsample.samplers import ddgan as sampler
        model = Model(self.cfg, self.data.name, self.kind, self.data_shape)
        model.generator.load_state_dict(ema_modules["generator"].state_dict())
        device = next(ema_modules["generator"].parameters()).device
        model = model.to(device).eval()
        x, nfe = sampler.sample(model, "posterior", self.cfg.T, self.cfg.eval_samples, seed=0,
                                device=device)
        if self.data.name == "digits" or self.data.name.startswith("toy2d:"):
            out = metrics.evaluate(x.cpu(), self.data.name)
        else:
            out = {"n": len(x)}
        out["nfe"] = nfe
        return out


FORMAT1_FIELD_DEFAULTS = {"grad_clip": 1.0, "disc_mbstd": 0, "t_power": 1.0}


def upgrade_card(card: dict) -> dict:
    """Format 1 kept the Config, the data kind and shape and the generator's dict inside
    net_config; format 2 moves them to config, data_shape and net_config["generator"]."""
    if card.get("config") is not None:
        return card
    try:
        net = card["net_config"]
        # A format-1 config written before a field existed ran with that field's value of the
        # time, not today's default (grad_clip was the loop's 1.0; the grid25 release predates
        # it): fill those in, so the upgraded card says how the weights were trained.
        config = {**FORMAT1_FIELD_DEFAULTS, **net["config"]}
        shape = list(net["data_shape"])
        gen = {"kind": config["arch"], **net.get("generator", {})}
        if net["kind"] != ("points" if len(shape) == 1 else "image"):
            raise ValueError(f"data kind {net['kind']!r} does not fit data_shape {shape}")
    except (KeyError, TypeError) as e:
        raise ValueError(f"ddgan checkpoint card (format 1) lacks {e}; expected net_config "
                         f"with config, kind, data_shape and generator") from None
    return {**card, "config": config, "data_shape": shape, "net_config": {"generator": gen},
            "format_version": 2}


def _json_safe(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["Config", "default_config", "Family", "Model", "SAMPLERS",
           "generator_config", "build_generator", "make_generator", "build_discriminator",
           "schedule_of", "SamplerGraph", "sampler_part", "SkipGenerator"]


# ---------------------------------------------------------------------------------------------
# What a DDGAN exports (registry: EXPORTS; fastsample/export builds artifacts from these).

class GeneratorGraph(nn.Module):
    """(x_t, z, t) -> x0: the generator's x_0' prediction, t the float step index i."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, z, t):
        return self.model.denoise(x_t, z, t)


class SamplerGraph(nn.Module):
    """(x_T (N,...), z (N,T,z_dim), noise (N,T,...)) -> (x0, samples): the whole posterior plan
    with its float64 constants baked in, in the plan loop's arithmetic (x <- c1 x + c0 x0' +
    sigma n, the affine1 twin's order) written out of place, so that it traces into one graph.
    Every input is batch-first so that a server (Triton's dynamic batcher, fastsample serve)
    can concatenate requests along axis 0; row k reads z[:, k] and noise[:, k] (zeros where
    sigma = 0). decode=True (a latent model): samples = postprocess(model.decode(x0)), the
    decoder step."""

    def __init__(self, model, table, decode: bool = False):
        super().__init__()
        self.model, self.decode = model, decode
        self.rows = [tuple(r) for r in table.rows]
        self.post = table.header["postprocess"][0]

    def forward(self, x_T, z, noise):
        x = x_T
        for k, (i, c0, c1, sigma) in enumerate(self.rows):
            t = x.new_full((x.shape[0],), i)
            x0 = self.model.denoise(x, z[:, k], t)
            x = c1 * x + c0 * x0
            if sigma:
                x = x + sigma * noise[:, k]
        return x, plans.apply_postprocess(self.post, self.model.decode(x) if self.decode else x)


def _export_generator(model, table) -> ExportPart:
    shape, zd, T = tuple(model.data_shape), model.z_dim, model.T

    def draw(n, g):
        return (torch.randn(n, *shape, generator=g), torch.randn(n, zd, generator=g),
                torch.randint(1, T + 1, (n,), generator=g).float())
    return ExportPart(GeneratorGraph(model),
                      [IOTensor("x_t", ("batch", *shape)), IOTensor("z", ("batch", zd)),
                       IOTensor("t", ("batch",))], [IOTensor("x0", ("batch", *shape))],
                      table, "posterior", T, draw, f"x_t, z ~ N(0, I); t uniform in 1..{T}")


def _export_sampler(model, table) -> ExportPart:
    return sampler_part(model, table, tuple(model.data_shape))


def sampler_part(model, table, shape: tuple, latent: bool = False) -> ExportPart:
    """The whole posterior plan as one graph on states of `shape`; latent=True: a latent
    model's, ending with its decoder step (samples in data_shape, x0 the latent)."""
    zd, T = model.z_dim, model.T
    level = 1 / 16 if table.header["postprocess"][0] == "quantize17" else 0.0
    out = tuple(model.data_shape)

    def draw(n, g):
        return (torch.randn(n, *shape, generator=g), torch.randn(n, T, zd, generator=g),
                torch.randn(n, T, *shape, generator=g))

    def feed(seed: int, num: int):
        x_T, z = sd.prior_of_shape(model, shape, num, seed, "cpu")
        # The CPU twins' posterior noise of one batch of `num` (offset 0), row k at axis 1.
        noise = torch.stack([r[0] if r else torch.zeros_like(x_T)
                             for r in plans.twin_noise(table, seed, x_T)], dim=1)
        return x_T, z.contiguous(), noise
    return ExportPart(SamplerGraph(model, table, decode=latent),
                      [IOTensor("x_T", ("batch", *shape)), IOTensor("z", ("batch", T, zd)),
                       IOTensor("noise", ("batch", T, *shape))],
                      [IOTensor("x0", ("batch", *shape)),
                       IOTensor("samples", ("batch", *out), level=level)],
                      table, "posterior", T, draw, "x_T, z, noise ~ N(0, I)",
                      calls=T + latent, feed=feed)


EXPORTS = {"generator": _export_generator, "sampler": _export_sampler}

