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

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastsample.nets import (Discriminator, DiscriminatorConfig, MLPConfig, TimeMLP, UNet,
                             UNetConfig)
from fastsample.data import dequantize_digits
from fastsample.data.images import DIGITS_LEVELS
from fastsample.sde import ddgan_schedule
from fastsample.models.registry import ExportPart, IOTensor, card_dict
from fastsample.samplers import plan as plans

SAMPLERS = ("posterior",)
ARCHS = ("unet", "mlp")
_UNET_PRESET_BY_RESOLUTION = {8: "digits8", 32: "img32", 64: "img64"}


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
    disc_mbstd: int = 0             # image D: minibatch-std group size (0 = off)
    cond_group: int = 0             # image D: groups of this many pairs share x_i (0 = off; = disc_mbstd)
    hidden: int = 128               # MLP width (G and D, 2D only)
    num_layers: int = 4             # MLP hidden layers (G and D, 2D only)
    lr_g: float = 1.6e-4            # generator Adam lr (sec. 3)
    lr_d: float = 1.25e-4           # discriminator Adam lr (sec. 3)
    beta1: float = 0.5              # Adam beta1 (sec. 3)
    beta2: float = 0.9              # Adam beta2 (sec. 3)
    lr_min_frac: float = 0.1        # cosine decay ends at lr * lr_min_frac; 1 = constant lr
    r1_gamma: float = 0.02          # R1 weight: gamma/2 E||grad_x D(x_real)||^2 (sec. 3)
    ds_weight: float = 0.0          # diversity term on G: -ds_weight E min(|dx0'|/|dz|, ds_cap); 0 = off
    ds_cap: float = 0.5             # its cap on the per-element mean-abs ratio (pushes a z-blind G only)
    lazy_reg: int = 15              # R1 every lazy_reg steps, scaled by lazy_reg; 1 = every step
    eps: float = 1e-3               # schedule: forward time of x_0 (sec. 1)
    beta_min: float = 0.1           # schedule: VP beta(0)
    beta_max: float = 20.0          # schedule: VP beta(1)
    t_power: float = 1.0            # schedule: t_i = eps + (1 - eps) (i / T)^t_power
    eval_samples: int = 1000        # samples drawn by Family.evaluate
    train_steps: int = 4000         # default optimiser steps (the CLI reads it)
    batch_size: int = 64            # default global batch (the CLI reads it)
    ema_decay: float = 0.999        # EMA of G weights (the CLI reads it)
    grad_clip: float = 1.0          # max grad norm per optimiser group (the CLI reads it); 0 = off

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
            if self.arch != "unet" or self.disc_mbstd != self.cond_group:
                raise ValueError(f"ddgan Config.cond_group = {self.cond_group} needs the image D "
                                 f"(arch 'unet') with disc_mbstd = {self.cond_group}; got arch "
                                 f"{self.arch!r}, disc_mbstd {self.disc_mbstd}")
            if self.batch_size % self.cond_group:
                raise ValueError(f"ddgan Config.batch_size = {self.batch_size} is not a multiple "
                                 f"of cond_group = {self.cond_group}")
        if not self.grad_clip >= 0:
            raise ValueError(f"ddgan Config.grad_clip = {self.grad_clip!r}; must be >= 0 (0 = off)")
        if not self.r1_gamma >= 0:
            raise ValueError(f"ddgan Config.r1_gamma = {self.r1_gamma!r}; must be >= 0")
        if not self.ds_weight >= 0:
            raise ValueError(f"ddgan Config.ds_weight = {self.ds_weight!r}; must be >= 0 (0 = off)")
        if not self.ds_cap > 0:
            raise ValueError(f"ddgan Config.ds_cap = {self.ds_cap!r}; must be > 0")
        try:  # eps, beta_min/max, t_power: the schedule's own checks, at config time
            schedule_of(self)
        except ValueError as e:
            raise ValueError(f"ddgan Config: {e}") from None


def default_config(data) -> Config:
    """Digits / images: U-Net G, conv D with a minibatch-std feature (groups of 4), ddgan.md's
    lrs and Adam betas, no gradient clipping, batch 64, 8000 steps (13.3 min on one thread of
    the previous 2-core CPU; a later, slower one ran ~5.5 it/s alone). Measured on digits (n =
    2000, seed 0): the old recipe (loop's clip at 1, no mbstd, 6000 steps) FD 63; no clip 45;
    + mbstd 42 (6000 steps); + 8000 steps 24; + the batch ordered by i so mbstd groups share a
    noise level 17.7. Without mbstd the raw G hops between classes (class KL to uniform
    0.1-0.2); at the noisy steps i = 3, 4, where the class is chosen, a per-pair D can barely
    see the class mix, a batch statistic can.

    Read those one-draw numbers with care: the FD of one 2000-sample draw of this model has a
    std of ~2.5 across seeds (the released G: 12.7-19.8 over seeds 0-9, mean 16.1; a 4000-step
    run: 21.5-36.5), so only multi-seed means separate settings. Tried with single draws and
    not kept: R1 gamma 0.1 / 0.005, lr_min_frac 0.02, p(i) ~ T+1-i, disc_base_ch 64, 12000
    steps, disc_mbstd 8, EMA 0.9995 / 0.998. Tried later (means over 6 seeds unless said):
    the diversity term ds_weight 0.1 / ds_cap 0.25 at 8000 steps FD 17.2 / C2ST 0.548 over
    10 seeds vs 16.1 / 0.524 (not kept; at 4000 steps it did help: 22.2 vs 32.2); ds_weight 1
    / cap 0.5 over-spreads the noisy steps (Var_z 3x the posterior's) and ends at FD 46 (4000
    steps); beta_max 12 (even log-SNR gaps) FD 36 vs 21 at 4000 steps (2 draws vs 1); D without
    GroupNorm (leaky ReLU, paper-like), a D with base 16 channels: D collapses to a constant
    logit within ~300 steps (R1 -> 1e-5), G drifts; a D that also sees x_0 / x_0': D wins,
    FD > 1000 at 3000 steps; 2x both lrs FD 30.2 vs 32.2 at 4000 steps (within noise), 3x
    both lrs 76.5 (6 seeds each): the lrs are not what holds a short run back. Longer runs
    plateau: 12000 steps FD 16.7 (6 seeds) vs 16.1 at 8000; batch 32 x 16000 steps (the same
    samples as 64 x 8000) 30.8: the batch size matters more than the step count; but batch
    128 x 4000 steps (the release's compute) reads 25.5, and 128 x 8000 steps (twice it)
    23.0 over 10 seeds (C2ST 0.557): worse than 64 x 8000 at either compute. But the
    training seed alone moves it as much: these defaults with --seed 1 read FD 22.6 (6
    seeds, C2ST 0.580) against seed 0's 16.1, so one training run per setting cannot rank
    settings either. The time grid: t_power 2 (alpha_bar_i 0.955 / 0.52 / 0.040 / 4e-5 instead
    of 0.52 / 0.079 / 0.0034 / 4e-5) reads FD 16.4 (training seed 0) and 20.2 (seed 1), t_power
    1.5 18.4, t_power 2 with 2x lr_d 16.5: no better on FD. metrics.class_mix_split shows why
    FD is so noisy: resampled to the train split's class shares, the same samples read 11-14,
    and most of the spread between sampler and training seeds is the class mix (KL to the train
    shares 0.003-0.016, against DDPM DDIM-50's 0.001-0.006); the released G makes too few 8s
    (7.3% vs the train split's 9.7%) and too many 5s (11.7% vs 10.1%), and it does so in
    its last step: from real x_1 (alpha_bar 0.52) that step alone gives 7.1-7.8% 8s. On that
    class-balanced FD t_power 2 is the better grid on both training seeds (11.7 / 11.9 vs 12.7 / 15.3 over sampler seeds 0-5; DDIM-50: 6.6), but
    it is not the default: its plain FD, the bar's metric, is no better. A 4x wider D
    (disc_base_ch 64, 1.3 M parameters, ~1.5x the step time): FD 14.7 (seed 0, balanced 13.6)
    and 39.1 (seed 1, its class mix off: KL 0.030), not kept. cond_group 4 (D's minibatch-std
    groups share one x_i and hold extra reals from the training set's exact p(x_{i-1} | x_i))
    does what it is for: G's z-spread goes from 0.5% of the posterior's variance (release) to
    89-95% at i = 1 (z_usage), but FD gets worse: 20.8 / 28.3 on training seeds 0 / 1 (balanced
    13.1 / 16.6, class KL 0.012 / 0.017; sampler seeds 0-5), not kept. A G that samples the
    true conditional spread is not a better G here: what limits FD is the fidelity of each draw.
    Nor does a wider G (base_ch 48, 2.2x the parameters) fix it in 8000 steps: FD 45.7.
    2D points: MLPs, batch 256, higher lrs (at ddgan.md's lrs the MLP critic learns too slowly
    and G collapses to a line); 4000 steps ~ 1.5 min at ~45 it/s, all 25 grid25 modes by
    step 2000."""
    if data.kind == "image":
        return Config(arch="unet", z_dim=32, lr_g=1.6e-4, lr_d=1.25e-4, grad_clip=0.0,
                      disc_mbstd=4, train_steps=8000, batch_size=64, ema_decay=0.999)
    return Config(arch="mlp", z_dim=8, lr_g=5e-4, lr_d=1e-3, r1_gamma=0.05, lazy_reg=1,
                  train_steps=4000, batch_size=256, ema_decay=0.995)


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
                     z_dim=cfg.z_dim, time_embedding="sinusoidal", time_scale=1.0)


def build_generator(net_cfg: UNetConfig | MLPConfig) -> nn.Module:
    return UNet(net_cfg) if isinstance(net_cfg, UNetConfig) else TimeMLP(net_cfg)


class MLPDiscriminator(nn.Module):
    """D(x_prev (N, D), x_t (N, D), t (N,)) -> logits (N,) for 2D points."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.net = TimeMLP(cfg)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_prev, x_t], dim=1), t)[:, 0]


def build_discriminator(cfg: Config, data_shape: tuple) -> nn.Module:
    if cfg.arch == "unet":
        C, H, _ = data_shape
        return Discriminator(DiscriminatorConfig(in_ch=C, resolution=H, base_ch=cfg.disc_base_ch,
                                                 ch_mult=cfg.disc_ch_mult, time_scale=1.0,
                                                 mbstd_group=cfg.disc_mbstd))
    (D,) = data_shape
    # A zero output layer would leave D blind at the start; a GAN wants a live critic from step 1.
    return MLPDiscriminator(MLPConfig(in_dim=2 * D, out_dim=1, hidden=cfg.hidden,
                                      num_layers=cfg.num_layers, time_embedding="sinusoidal",
                                      time_scale=1.0, zero_init_out=False))


def _check_arch(cfg: Config, kind: str) -> None:
    want = "unet" if kind == "image" else "mlp"
    if cfg.arch != want:
        raise ValueError(f"ddgan Config.arch = {cfg.arch!r} does not fit {kind} data; use {want!r}")


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

class Model(nn.Module):
    """Sampling-ready DDGAN: `denoise(x_i, z, i)` is G; `schedule` the T-step DDGANSchedule."""

    family = "ddgan"

    def __init__(self, cfg: Config, dataset: str, kind: str, data_shape: tuple):
        super().__init__()
        _check_arch(cfg, kind)
        self.cfg, self.dataset, self.kind = cfg, dataset, kind
        self.data_shape = tuple(int(s) for s in data_shape)
        self.generator = build_generator(generator_config(cfg, self.data_shape))
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
                            for k, v in card["config"].items()})
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
        self._rows_cache = None   # cond_group: (training-row centres, var_u), built on first use

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": build_generator(generator_config(self.cfg, self.data_shape)),
                "discriminator": build_discriminator(self.cfg, self.data_shape)}

    def optimizers(self, modules):
        c = self.cfg
        # Kept so step() can set the cosine lr; the loop restores their state in place on resume.
        self._opts = {"disc": torch.optim.Adam(modules["discriminator"].parameters(), lr=c.lr_d,
                                         betas=(c.beta1, c.beta2)),
                "gen": torch.optim.Adam(modules["generator"].parameters(), lr=c.lr_g,
                                        betas=(c.beta1, c.beta2))}
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
        for name, lr in (("disc", c.lr_d), ("gen", c.lr_g)):
            for g in self._opts[name].param_groups:
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
        training set (x_0 by Bayes' rule over its rows, then q(x_{i-1} | x_i, x_0)). Each row is
        still a draw of the usual real pair, but D's minibatch std of a group now measures the
        spread of p(x_{i-1} | x_i), which a G that ignores z cannot show."""
        K, N = self.cfg.cond_group, x0.shape[0]
        if N % K:
            raise ValueError(f"ddgan: the batch on this process ({N}) is not a multiple of "
                             f"cond_group = {K}")
        M = N // K
        i_g = (ctx.randint(self.cfg.T, M).cpu() + 1).sort().values
        prev_a, xi_a = self._real_pair(ctx, x0[:M], i_g)
        logw = posterior_log_weights(xi_a, self._sqrt_ab[i_g].to(x0.device),
                                     *self._posterior_rows(x0.device))
        rows = sample_rows(logw, ctx.rand(M, K - 1))                      # (M, K-1)
        x0_k = self.data.x.to(x0.device)[rows.flatten()]
        if self.kind == "image":  # the batch sampler dequantises images the same way
            x0_k = dequantize_digits(x0_k, u=ctx.rand(*x0_k.shape))
        x0_k = to_model(x0_k, self.kind).view(M, K - 1, *x0.shape[1:])
        c = lambda table: self._coef(table, i_g, x0)[:, None]
        prev_k = (c(self._c0) * x0_k + c(self._c1) * xi_a[:, None]
                  + c(self._sigma_post) * ctx.randn(M, K - 1, *x0.shape[1:]))
        x_prev = torch.cat([prev_a[:, None], prev_k], dim=1).flatten(0, 1)
        return x_prev, xi_a.repeat_interleave(K, dim=0), i_g.repeat_interleave(K)

    def _posterior_rows(self, device) -> tuple[torch.Tensor, float]:
        """Model-space centres of the training rows and the variance of their dequantisation
        noise there (a uniform bin of width 2/17 for images, 0 for points)."""
        if self._rows_cache is not None and self._rows_cache[0].device == torch.device(device):
            return self._rows_cache
        x = self.data.x.to(device=device, dtype=torch.float64)
        if self.kind == "image":
            x = to_model(dequantize_digits(x, u=torch.full_like(x, 0.5)), self.kind)
            self._rows_cache = (x, (2.0 / DIGITS_LEVELS) ** 2 / 12.0)
        else:
            self._rows_cache = (x, 0.0)
        return self._rows_cache

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        self._set_lr(ctx)
        x0 = to_model(batch, self.kind)
        N = x0.shape[0]
        G, D = ctx.m("generator"), ctx.m("discriminator")

        if c.cond_group:
            x_prev, x_i, i = self._grouped_real(ctx, x0)
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

        # G step: non-saturating loss against the updated D.
        loss_g = F.softplus(-D(x_fake, x_i, t)).mean()
        ds = None
        if c.ds_weight > 0:
            # Diversity-sensitive term: a conditional G learns to ignore z (the released G has
            # Var_z x_0' ~ 0.4% of the data posterior's Var(x_0 | x_1), see z_usage). Every
            # other row gets a second z; strided, not the first half: rows are sorted by i.
            z2 = ctx.randn(z[::2].shape[0], c.z_dim)
            x0_pred2 = G(x_i[::2], t[::2], z2)
            ds = ((x0_pred[::2] - x0_pred2).abs().flatten(1).mean(1)
                  / (z[::2] - z2).abs().mean(1))
            loss_g = loss_g - c.ds_weight * ds.clamp(max=c.ds_cap).mean()
        ctx.optimize("gen", loss_g)
        out = {"loss_d": loss_d.detach(), "loss_d_real": loss_d_real.detach(),
               "loss_d_fake": loss_d_fake.detach(), "loss_g": loss_g.detach()}
        if ds is not None:
            out["ds_ratio"] = ds.mean().detach()
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
        from fastsample import metrics
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
        if self.data.name == "toy2d:grid25":
            out.update(grid25_modes(x.cpu()))
        out["nfe"] = nfe
        return out


@torch.no_grad()
def z_usage(model: "Model", x0: torch.Tensor, ref: torch.Tensor, draws: int = 16,
            seed: int = 0) -> list[dict]:
    """How much of the denoising distribution's spread G produces from z, per step i.

    For each i: x_i ~ q(x_i | x_0) from the rows of `x0` (model space), then
    - posterior_var: E ||x_0 - E[x_0 | x_i]||^2 under the empirical distribution of `ref`
      (model space), by Bayes' rule over its rows: the spread a perfect p(x_0 | x_i) has;
    - generator_var: E sum_pixels Var_z G(x_i, z, i), over `draws` latents per x_i;
    - mean_err: E ||E_z G(x_i, z, i) - E[x_0 | x_i]||^2.
    generator_var << posterior_var means G ignores z: the multimodal p(x_{i-1} | x_i) the
    paper's argument rests on is then a point mass plus the posterior noise.
    """
    g = torch.Generator().manual_seed(seed)
    R = ref.flatten(1).double()
    rows = []
    for i in range(1, model.T + 1):
        ab = float(model.schedule.alpha_bar[i])
        x_i = model.schedule.q_sample(x0, i, torch.randn(x0.shape, generator=g))
        w = torch.softmax(posterior_log_weights(x_i, torch.full((len(x0),), ab ** 0.5), R), dim=1)
        mean = w @ R
        pvar = (w * R.pow(2).sum(1)[None]).sum(1) - mean.pow(2).sum(1)
        t = torch.full((len(x0),), float(i))
        outs = torch.stack([model.denoise(x_i, torch.randn(len(x0), model.z_dim, generator=g), t)
                            for _ in range(draws)]).flatten(2).double()
        rows.append({"i": i, "alpha_bar": ab, "posterior_var": float(pvar.clamp(min=0).mean()),
                     "generator_var": float(outs.var(0).sum(1).mean()),
                     "mean_err": float((outs.mean(0) - mean).pow(2).sum(1).mean())})
    return rows


def posterior_log_weights(x_i: torch.Tensor, sqrt_ab: torch.Tensor, centres: torch.Tensor,
                          var_u: float = 0.0) -> torch.Tensor:
    """log p(row j | x_i) up to a per-row constant, for data = the rows `centres` (R, ...) each
    spread by independent noise of variance var_u per element: x_i = sqrt_ab c_j + noise of
    variance 1 - ab + ab var_u (exact for var_u = 0; for dequantised digits var_u is a uniform
    bin's, whose Gaussian stand-in is off by < 0.1% of the variance at alpha_bar 0.52).
    x_i (M, ...), sqrt_ab (M,) -> (M, R) float64."""
    s = sqrt_ab.double()
    var = 1.0 - s ** 2 + s ** 2 * var_u
    # ||x - s c|| = s ||x / s - c||: one (M, R) cdist, no (M, R, D) stack of scaled centres.
    d = torch.cdist(x_i.flatten(1).double() / s[:, None], centres.flatten(1).double()) * s[:, None]
    return -d.pow(2) / (2.0 * var[:, None])


def sample_rows(logw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row indices from the categorical softmax(logw) (M, R), by the inverse CDF at the
    uniforms u (M, K): (M, K) int64."""
    cdf = torch.softmax(logw.double(), dim=1).cumsum(dim=1)
    # right=True: the first j with cdf_j > u, so a zero-weight row is never drawn, not even at u = 0.
    idx = torch.searchsorted(cdf, u.double().to(cdf.device), right=True)
    return idx.clamp(max=logw.shape[1] - 1)  # u above a rounded cdf[-1] < 1


def grid25_modes(x: torch.Tensor, min_share: float = 0.2) -> dict:
    """grid25 mode coverage by the nearest-mean rule: every sample belongs to its nearest mean; a
    mode is hit when it holds at least min_share of the uniform share 1/25 of the samples.
    Also the share of samples within 3 component stds of their mean (sample sharpness)."""
    from fastsample.data.toy2d import grid25
    mix = grid25().mixture
    means, std = mix.means.float(), float(mix.stds[0])
    dist, k = torch.cdist(x.float(), means).min(dim=1)  # nearest mean per sample
    counts = torch.bincount(k, minlength=len(means))
    hit = int((counts >= min_share * len(x) / len(means)).sum())
    return {"modes_hit": hit, "within_3std": float((dist < 3 * std).float().mean())}


def upgrade_card(card: dict) -> dict:
    """Format 1 kept the Config, the data kind and shape and the generator's dict inside
    net_config; format 2 moves them to config, data_shape and net_config["generator"]."""
    if card.get("config") is not None:
        return card
    try:
        net = card["net_config"]
        config, shape = net["config"], list(net["data_shape"])
        gen = {"kind": config["arch"], **net["generator"]}
        if net["kind"] != ("points" if len(shape) == 1 else "image"):
            raise ValueError(f"data kind {net['kind']!r} does not fit data_shape {shape}")
    except (KeyError, TypeError) as e:
        raise ValueError(f"ddgan checkpoint card (format 1) lacks {e}; expected net_config "
                         f"with config, kind, data_shape and generator") from None
    return {**card, "config": config, "data_shape": shape, "net_config": {"generator": gen},
            "format_version": 2}


def _json_safe(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["Config", "default_config", "Family", "Model", "SAMPLERS", "grid25_modes", "z_usage",
           "posterior_log_weights", "sample_rows",
           "generator_config", "build_generator", "build_discriminator", "schedule_of"]


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
    """(x_T, z (T,N,z_dim), noise (T,N,...)) -> (x0, samples): the whole posterior plan with
    its float64 constants baked in, in the plan loop's arithmetic (x <- c1 x + c0 x0' + sigma n,
    the affine1 twin's order) written out of place, so that it traces into one graph."""

    def __init__(self, model, table):
        super().__init__()
        self.model = model
        self.rows = [tuple(r) for r in table.rows]
        self.post = table.header["postprocess"][0]

    def forward(self, x_T, z, noise):
        x = x_T
        for k, (i, c0, c1, sigma) in enumerate(self.rows):
            t = x.new_full((x.shape[0],), i)
            x0 = self.model.denoise(x, z[k], t)
            x = c1 * x + c0 * x0
            if sigma:
                x = x + sigma * noise[k]
        return x, plans.apply_postprocess(self.post, x)


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
    shape, zd, T = tuple(model.data_shape), model.z_dim, model.T
    level = 1 / 16 if table.header["postprocess"][0] == "quantize17" else 0.0

    def draw(n, g):
        return (torch.randn(n, *shape, generator=g), torch.randn(T, n, zd, generator=g),
                torch.randn(T, n, *shape, generator=g))
    return ExportPart(SamplerGraph(model, table),
                      [IOTensor("x_T", ("batch", *shape)), IOTensor("z", (T, "batch", zd)),
                       IOTensor("noise", (T, "batch", *shape))],
                      [IOTensor("x0", ("batch", *shape)),
                       IOTensor("samples", ("batch", *shape), level=level)],
                      table, "posterior", T, draw, "x_T, z, noise ~ N(0, I)", calls=T)


EXPORTS = {"generator": _export_generator, "sampler": _export_sampler}

