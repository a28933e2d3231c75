"""VP-SDE / DDPM baseline: an eps-prediction net trained in continuous time.

Forward process (reference/ddgan.md sec. 1; fastsample.sde.vp.VPSDE): beta(t) = beta_min +
t (beta_max - beta_min), x_t = m_t x_0 + sigma_t eps with m_t = exp(-B(t)/2), sigma_t^2 = 1 - m_t^2.
Loss (Ho et al. 2020 "simple" loss in continuous time): t ~ U[t_eps, 1], eps ~ N(0, I),
L = mean ||eps_theta(x_t, t) - eps||^2; the score is -eps_theta / sigma_t.

t_eps = 1e-3: the discrete samplers (ancestral, DDIM on DDPMSchedule(1000)) query the net at
t >= ~1e-3 (alpha_bar_1 = 1 - 1e-4 matches t ~ 1e-3), and EM / ODE stop at t_eps; training below
it would spend capacity on noise levels (sigma < 0.03) that no sampler visits.

Nets: digits (and other images) use the "digits8" U-Net preset with Fourier features of log t;
2D toys use TimeMLP with sinusoidal features of 1000 t. Images are trained in [-1, 1]
(x = 2 y - 1 of the dequantised y in [0, 1)); points as they come.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fastsample.data import Dataset, quantize_digits
from fastsample.models.registry import card_dict
from fastsample.nets import MLPConfig, TimeMLP, UNet, UNetConfig
from fastsample.samplers.ddpm import SAMPLERS  # noqa: F401  (family contract)
from fastsample.sde.vp import VPSDE

ARCHS = ("unet", "mlp")


@dataclass(frozen=True)
class Config:
    arch: str = "unet"                      # "unet" (images) | "mlp" (2D points)
    train_steps: int = 10000                # optimiser steps; digits: ~19 min at 8.8 it/s (1 CPU thread)
    batch_size: int = 128                   # global batch
    ema_decay: float = 0.999                # EMA of the released weights
    lr: float = 1e-3                        # Adam learning rate
    warmup: int = 200                       # linear lr warm-up steps
    lr_min_frac: float = 1.0                # cosine decay to lr * lr_min_frac at the last step; 1 = constant
    beta_min: float = 0.1                   # VP-SDE beta(0)
    beta_max: float = 20.0                  # VP-SDE beta(1)
    t_eps: float = 1e-3                     # training times t ~ U[t_eps, 1]; EM / ODE stop here
    N: int = 1000                           # size of the discrete DDPM schedule (ancestral, DDIM)
    # U-Net (arch "unet"), on top of UNetConfig.preset("digits8")
    base_ch: int = 32                       # channels at the first level
    ch_mult: tuple = (1, 2)                 # channel multiplier per level
    num_res_blocks: int = 1                 # residual blocks per level
    dropout: float = 0.0                    # dropout in residual blocks
    time_embedding: str = "fourier_log"     # fourier_log (of log t) | sinusoidal (of 1000 t)
    # TimeMLP (arch "mlp")
    hidden: int = 128                       # hidden width
    num_layers: int = 4                     # hidden layers
    input_features: int = 0                 # random Fourier features of x_t (MLPConfig); 0 = raw x_t
    input_scale: float = 1.0                # their frequency std, cycles per unit of x
    # evaluate() at the end of training
    # (stochastic: after 3000 digits steps EM-200 is at the FD floor while DDIM-100 is not yet)
    eval_sampler: str = "em"                # sampler used by evaluate()
    eval_steps: int = 200                   # its steps
    eval_num: int = 1000                    # number of samples it draws

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.arch not in ARCHS:
            raise ValueError(f"ddpm Config.arch = {self.arch!r}; choose {'|'.join(ARCHS)}")
        for name in ("train_steps", "batch_size", "N", "eval_steps", "eval_num"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ddpm Config.{name} = {v!r}; must be an int >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ddpm Config.ema_decay = {self.ema_decay}; must be in [0, 1)")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"ddpm Config: lr = {self.lr} must be > 0 and warmup = "
                             f"{self.warmup} >= 0")
        if not 0.0 <= self.lr_min_frac <= 1.0:
            raise ValueError(f"ddpm Config.lr_min_frac = {self.lr_min_frac}; must lie in [0, 1]")
        if not 0.0 < self.t_eps < 1.0:
            raise ValueError(f"ddpm Config.t_eps = {self.t_eps}; must lie in (0, 1)")
        if self.eval_sampler not in SAMPLERS:
            raise ValueError(f"ddpm Config.eval_sampler = {self.eval_sampler!r}; "
                             f"choose {'|'.join(SAMPLERS)}")
        VPSDE(self.beta_min, self.beta_max)  # validates the SDE parameters

    @property
    def sde(self) -> VPSDE:
        return VPSDE(self.beta_min, self.beta_max)


def default_config(data: Dataset) -> Config:
    """Digits / images: the U-Net; 2D points: the MLP (cheaper, trained longer at a larger batch)."""
    if data.kind == "image":
        return Config(arch="unet")
    # grid25's modes (std 0.0177, 0.71 apart) need an eps-net that resolves x_t at ~0.02: raw
    # coordinates learn that slowly (spectral bias), 64 Fourier features of x_t at 3 cycles per
    # unit do not. DDIM-50 share of samples within 3 std of a mode (seed 0, n = 2000; exact
    # scores 98.4%): raw x_t 20k steps 76%; + features 86%; + cosine lr to 0 91%; 40k steps 94%
    # (hidden 256: no gain; more small-t draws: +1%). The ancestral sampler reads 99.8-100%.
    return Config(arch="mlp", train_steps=40000, batch_size=512, lr=2e-3, ema_decay=0.999,
                  eval_num=2000, input_features=64, input_scale=3.0, lr_min_frac=0.0)


def net_config(cfg: Config, shape: tuple) -> UNetConfig | MLPConfig:
    """The net for samples of shape `shape` ((C, R, R) images or (D,) points)."""
    if cfg.arch == "unet":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"arch 'unet' needs square images (C, R, R), got item shape {shape}")
        C, R = shape[0], shape[1]
        return UNetConfig.preset("digits8", in_ch=C, out_ch=C, resolution=R, base_ch=cfg.base_ch,
                                 ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                                 dropout=cfg.dropout, time_embedding=cfg.time_embedding)
    if len(shape) != 1:
        raise ValueError(f"arch 'mlp' needs points (D,), got item shape {shape}")
    return MLPConfig(in_dim=shape[0], out_dim=shape[0], hidden=cfg.hidden,
                     num_layers=cfg.num_layers, time_embedding="sinusoidal", time_scale=1000.0,
                     input_features=cfg.input_features, input_scale=cfg.input_scale)


def build_net(netcfg: UNetConfig | MLPConfig) -> nn.Module:
    return UNet(netcfg) if isinstance(netcfg, UNetConfig) else TimeMLP(netcfg)


#-----------------------------------------------------------------------------------------------
# The ready model: what the samplers call.


class Model(nn.Module):
    """eps_theta with its SDE; the interface documented in fastsample/samplers/ddpm.py."""

    family = "ddpm"

    def __init__(self, net: nn.Module, cfg: Config, dataset: str, shape: tuple):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.dataset = dataset
        self.shape = tuple(shape)
        self.sde = cfg.sde
        self.t_eps = cfg.t_eps
        self.N = cfg.N

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, *shape) in model space, t (B,) continuous time -> eps_theta, like x."""
        return self.net(x, t)

    forward = eps

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space: digits quantised to k/16, other images clamped to [0, 1],
        points unchanged."""
        if len(self.shape) == 1:
            return x.float()
        y = (x.float() + 1.0) / 2.0
        return quantize_digits(y) if self.dataset == "digits" else y.clamp(0.0, 1.0)

    def card(self) -> dict:
        netcfg = self.net.cfg
        return {"dataset": self.dataset, "config": _json_config(self.cfg),
                "data_shape": list(self.shape),
                "net_config": {"net": {"kind": self.cfg.arch, **netcfg.to_dict()}},
                "sde_config": {"kind": "vp", "beta_min": self.cfg.beta_min,
                               "beta_max": self.cfg.beta_max, "t_eps": self.cfg.t_eps,
                               "N": self.cfg.N}}

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        """Rebuild from a released checkpoint (EMA weights of "net") and its card."""
        card = upgrade_card(card_dict(card))
        try:
            cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in card["config"].items()})
            shape = tuple(card["data_shape"])
            net = dict(card["net_config"]["net"])
            cls_cfg = UNetConfig if net.pop("kind") == "unet" else MLPConfig
            netcfg = cls_cfg.from_dict(net)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"ddpm checkpoint card is not a ddpm card ({type(e).__name__}: {e})") from None
        model = cls(build_net(netcfg), cfg, card["dataset"], shape)
        model.net.load_state_dict(state_dict)
        return model.eval()


def upgrade_card(card: dict) -> dict:
    """Format 1 kept the Config in sde_config["config"] and the net as net_config {arch, shape,
    net}; format 2 moves them to config, data_shape and net_config["net"] (with its kind)."""
    if card.get("config") is not None:
        return card
    try:
        sde, net = dict(card["sde_config"]), dict(card["net_config"])
        config = sde.pop("config")
        shape, arch, netcfg = list(net["shape"]), net["arch"], dict(net["net"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a ddpm card: format 1 lacks {e}; expected sde_config.config and "
                         f"net_config arch, shape, net") from None
    return {**card, "config": config, "data_shape": shape,
            "net_config": {"net": {"kind": arch, **netcfg}}, "sde_config": sde,
            "format_version": 2}


def _json_config(cfg: Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


#-----------------------------------------------------------------------------------------------
# Training (the shared loop's Family protocol).


class Family:
    name = "ddpm"
    released = ("net",)

    def __init__(self, data: Dataset, cfg: Config):
        self.data, self.cfg = data, cfg
        self.shape = tuple(data.shape)
        self.image = data.kind == "image"
        self.netcfg = net_config(cfg, self.shape)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": build_net(self.netcfg)}

    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        self._opt = torch.optim.Adam(modules["net"].parameters(), lr=self.cfg.lr)
        return {"net": self._opt}

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x0 = 2.0 * batch - 1.0 if self.image else batch
        n = x0.shape[0]
        # Continuous time t ~ U[t_eps, 1]; m_t, sigma_t in float64, then cast to the batch dtype.
        t = cfg.t_eps + (1.0 - cfg.t_eps) * ctx.rand(n)
        m_t, sigma_t = cfg.sde.marginal(t.double())
        view = (n,) + (1,) * (x0.dim() - 1)
        noise = ctx.randn(*x0.shape)
        x_t = m_t.to(x0.dtype).view(view) * x0 + sigma_t.to(x0.dtype).view(view) * noise
        eps_pred = ctx.m("net")(x_t, t)
        loss = (eps_pred.float() - noise).square().mean()
        scale = ctx.lr_scale(cfg.warmup, cfg.lr_min_frac)
        for group in self._opt.param_groups:
            group["lr"] = cfg.lr * scale
        ctx.optimize("net", loss)
        return {"loss": loss.detach()}

    def model(self, net: nn.Module) -> Model:
        return Model(net, self.cfg, self.data.name, self.shape)

    def card(self) -> dict:
        return Model(build_net(self.netcfg), self.cfg, self.data.name, self.shape).card()

    def evaluate(self, ema_modules: dict[str, nn.Module]) -> dict:
        """Metrics of cfg.eval_num samples from the EMA net (fastsample.metrics.evaluate)."""
        from fastsample import metrics
        from fastsample.samplers.ddpm import sample

        if not (self.data.name == "digits" or self.data.name.startswith("toy2d:")):
            return {}
        cfg = self.cfg
        net = ema_modules["net"]
        device = next(net.parameters()).device
        steps = None if cfg.eval_sampler == "ode" else cfg.eval_steps
        x, nfe = sample(self.model(net).eval(), cfg.eval_sampler, steps, cfg.eval_num, seed=0,
                        device=device, batch=500)
        out = metrics.evaluate(x.cpu(), self.data.name)
        return {**out, "sampler": cfg.eval_sampler, "nfe": nfe}
