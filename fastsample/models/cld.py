"""Critically-Damped Langevin Diffusion (CLD): hybrid score matching with the mixed score.

Reference: reference/cld.md (Dockhorn, Vahdat, Kreis, ICLR 2022), sec. 3 (training), 7 (pitfalls).
The net sees (x_t, v_t) and predicts alpha, the velocity part only; the v-score is

    s_theta(u_t, t) = -v_t / SigmaRef_vv(t) - ell_t * alpha      (mixed score, sec. 3.2)
    s_theta(u_t, t) = -ell_t * alpha                              (mixed score off: the toy config)

and the `reweightedv2` loss is (r - eps_v)^2 with r = s_theta / (-ell_t) (sec. 3.3), summed over
the data dimensions and averaged over the batch. All CLD scalars come from fastsample.sde.cld in
float64 and are cast per sample to the compute dtype; the loss is reduced in fp32 outside autocast,
and the nets compute their time features outside autocast (pitfall 1).

Data: digits batches arrive dequantised in [0, 1) and the model works in [-1, 1]; 2D toys are
used as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastsample.nets import MLPConfig, TimeMLP, UNet, UNetConfig
from fastsample.nets.layers import config_from_dict
from fastsample.sde import CLD, CLDConfig
from fastsample.models.registry import ExportPart, IOTensor, card_dict
from fastsample.samplers import plan as plans

SAMPLERS = ("sscs", "em", "ode")
NETS = ("unet", "mlp")
WEIGHTINGS = ("reweightedv2", "reweightedv1", "likelihood")


#-----------------------------------------------------------------------------------------------
# Config.

@dataclass(frozen=True)
class Config:
    data_shape: tuple = (1, 8, 8)       # one sample's shape in model space: (C, R, R) or (d,)
    net: str = "unet"                   # unet (images) | mlp (2D toys)
    unet_preset: str = "digits8"        # UNetConfig preset; in_ch = 2C, out_ch = C are set here
    base_ch: int = 32                   # U-Net base width (overrides the preset)
    dropout: float = 0.0                # U-Net dropout
    mlp_hidden: int = 128               # toy MLP: width of every hidden layer (cld.md sec. 3.4)
    mlp_layers: int = 4                 # toy MLP: number of hidden layers
    fourier_scale: float = 16.0         # std of the log-t Fourier frequencies (cld.md sec. 3.4: 16)
    mixed_score: bool = True            # s = -v/SigmaRef_vv - ell alpha; off: s = -ell alpha (toy config)
    weighting: str = "reweightedv2"     # reweightedv2 (eps loss) | reweightedv1 | likelihood (sec. 3.3)
    Minv: float = 4.0                   # inverse mass; Gamma = 2/sqrt(Minv) (critical damping)
    beta0: float = 4.0                  # beta(t) = beta0 + beta1 t
    beta1: float = 0.0
    gamma: float = 0.04                 # v0 ~ N(0, gamma M)
    numerical_eps: float = 1e-9         # added to Sigma_xx, Sigma_vv before each Cholesky (sec. 2.4)
    sampling_eps: float = 1e-3          # samplers stop at forward time sampling_eps, then denoise
    loss_eps: float = 1e-5              # training draws t = loss_eps + (1 - loss_eps) u^loss_t_power, u ~ U[0, 1]
    loss_t_power: float = 1.0           # > 1 draws small t more often (same optimum, other emphasis)
    lr: float = 1e-3                    # Adam learning rate
    warmup: int = 200                   # linear learning-rate warm-up, optimiser steps
    lr_min_frac: float = 1.0            # cosine decay to lr * lr_min_frac at the last step; 1 = constant
    input_features: int = 0             # toy MLP: random Fourier features of (x, v) (MLPConfig); 0 = off
    input_scale: float = 1.0            # toy MLP: their frequency std, cycles per unit
    train_steps: int = 2000             # optimiser steps of `fastsample train` (digits: 8.8 it/s on 1 CPU thread, ~4 min)
    batch_size: int = 128               # global batch
    ema_decay: float = 0.999            # EMA of the released weights
    eval_samples: int = 500             # samples drawn by evaluate() (SSCS-QS, eval_nfe)
    eval_nfe: int = 50                  # NFE of evaluate()'s sampler

    def __post_init__(self):
        shape = tuple(int(s) for s in self.data_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(f"Config.data_shape = {self.data_shape!r}; expected (d,) or (C, R, R)")
        object.__setattr__(self, "data_shape", shape)
        if self.net not in NETS:
            raise ValueError(f"Config.net = {self.net!r}; choose one of {'|'.join(NETS)}")
        if (self.net == "unet") != (len(shape) == 3):
            raise ValueError(f"Config.net = {self.net!r} does not fit data_shape {shape}: "
                             f"unet takes (C, R, R), mlp takes (d,)")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Config.weighting = {self.weighting!r}; "
                             f"choose one of {'|'.join(WEIGHTINGS)}")
        for name in ("train_steps", "batch_size", "eval_samples", "mlp_hidden", "mlp_layers",
                     "base_ch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Config.{name} = {getattr(self, name)!r}; must be >= 1")
        if self.eval_nfe < 2:
            raise ValueError(f"Config.eval_nfe = {self.eval_nfe!r}; must be >= 2")
        if self.warmup < 0:
            raise ValueError(f"Config.warmup = {self.warmup!r}; must be >= 0")
        if not (isinstance(self.loss_t_power, (int, float)) and 0 < self.loss_t_power < 100):
            raise ValueError(f"Config.loss_t_power = {self.loss_t_power!r}; must lie in (0, 100)")
        if not 0.0 <= self.lr_min_frac <= 1.0:
            raise ValueError(f"Config.lr_min_frac = {self.lr_min_frac!r}; must lie in [0, 1]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Config.lr = {self.lr!r}; must be a positive finite number")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"Config.ema_decay = {self.ema_decay!r}; must be in [0, 1)")
        self.cld_config()  # validates the CLD fields with CLDConfig's own messages

    def cld_config(self) -> CLDConfig:
        return CLDConfig(Minv=self.Minv, beta0=self.beta0, beta1=self.beta1, gamma=self.gamma,
                         numerical_eps=self.numerical_eps, sampling_eps=self.sampling_eps,
                         loss_eps=self.loss_eps)

    def net_config(self) -> UNetConfig | MLPConfig:
        if self.net == "unet":
            C = self.data_shape[0]
            return UNetConfig.preset(self.unet_preset, in_ch=2 * C, out_ch=C,
                                     resolution=self.data_shape[1], base_ch=self.base_ch,
                                     dropout=self.dropout, time_embedding="fourier_log",
                                     fourier_scale=self.fourier_scale)
        d = self.data_shape[0]
        return MLPConfig(in_dim=2 * d, out_dim=d, hidden=self.mlp_hidden,
                         num_layers=self.mlp_layers, time_embedding="fourier_log",
                         fourier_scale=self.fourier_scale, input_features=self.input_features,
                         input_scale=self.input_scale)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data_shape"] = list(self.data_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return config_from_dict(cls, d)


def default_config(data) -> Config:
    """Digits: U-Net on (2, 8, 8) with the mixed score. 2D toys: the cld.md toy config (MLP 4x128,
    mixed score off, numerical_eps 1e-6, EMA 0.999, batch 512, lr 1e-3), except fourier_scale 1
    (on diamond, 4000 steps, SSCS-20 SWD 0.105 vs 0.172 with 16; floor 0.027) and what grid25's
    narrow modes need (docs/grid25.md): at t ~ 0.003-0.03 the v-score is a steep sawtooth in x
    that the raw MLP never learned (its HSM loss there 1.3 vs the exact score's 0.08, samples 2%
    within 3 std). 64 Fourier features of (x, v) at 3 cycles/unit alone: still 2%; + t drawn
    as u^3 and 40k steps with a cosine lr: SSCS-50 84%; u^4 and 60k steps: 95%."""
    shape = tuple(data.x.shape[1:])
    if data.kind == "points":
        return Config(data_shape=shape, net="mlp", mixed_score=False, numerical_eps=1e-6,
                      lr=1e-3, warmup=0, train_steps=60000, batch_size=512, ema_decay=0.999,
                      fourier_scale=1.0, input_features=64, input_scale=3.0, lr_min_frac=0.0,
                      loss_t_power=4.0)
    # EMA 0.995 (half-life ~140 steps): at the CPU budget of ~2000 steps, 0.999 would still hold
    # e^-2 = 14% of the untrained weights (measured: a 1000-step toy EMA at 0.999 was unusable).
    return Config(data_shape=shape, net="unet", mixed_score=True, ema_decay=0.995)


#-----------------------------------------------------------------------------------------------
# Model: the net plus the CLD scalars a sampler needs.

def build_net(net_kind: str, cfg) -> nn.Module:
    return UNet(cfg) if net_kind == "unet" else TimeMLP(cfg)


class Model(nn.Module):
    """A CLD score model ready for sampling.

    alpha(x, v, t): x, v (N, *data_shape), t (N,) forward time > 0 -> alpha (N, *data_shape).
    Samplers read `cld` (float64 scalars), `mixed_score`, `data_shape` and call `to_data`.
    """

    family = "cld"

    def __init__(self, config: Config, net: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.cld = CLD(config.cld_config())
        self.mixed_score = config.mixed_score
        self.data_shape = config.data_shape
        self.is_image = len(config.data_shape) == 3
        self.net = net if net is not None else build_net(config.net, config.net_config())

    def alpha(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Images: x and v stacked on channels (2C); points: concatenated features (2d).
        return self.net(torch.cat([x, v], dim=1), t)

    def forward(self, x, v, t):
        return self.alpha(x, v, t)

    def score(self, x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """The v-score s_theta(u, t) (sec. 3.2); t a float or (N,) forward times."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        alpha = self.alpha(x, v, t64.to(x.dtype))
        return self.cld.score_from_alpha(v, t64, alpha, self.mixed_score)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space: digits back to the levels k/16; points unchanged."""
        if self.is_image:
            from fastsample.data import quantize_digits
            return quantize_digits((x.float() + 1) / 2)
        return x.float()

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        """Rebuild from exactly the card: `config` is the Config, net_config["net"] the net."""
        card = upgrade_card(card_dict(card))
        config = Config.from_dict(card["config"])
        model = cls(config, net=net_from_card(config, card["net_config"]["net"], "cld"))
        load_net(model.net, state_dict, "cld")
        return model


def net_from_card(config: Config, net_card: dict, family: str) -> nn.Module:
    """The score net a card's net_config["net"] describes (its kind must match the config)."""
    net_cfg = dict(net_card)
    kind = net_cfg.pop("kind", None)
    if kind != config.net:
        raise ValueError(f"{family} card: net_config kind {kind!r} does not match the config's "
                         f"net {config.net!r}")
    cfg_cls = UNetConfig if kind == "unet" else MLPConfig
    net_cfg = cfg_cls.from_dict({k: tuple(v) if isinstance(v, list) else v
                                 for k, v in net_cfg.items()})
    return build_net(kind, net_cfg)


def load_net(net: nn.Module, state_dict: dict, family: str) -> None:
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{family} checkpoint does not fit its card's net: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")


#-----------------------------------------------------------------------------------------------
# Training: hybrid score matching (sec. 3.1) with the mixed score (3.2) and a weighting (3.3).

_SDE_KEYS = ("Minv", "beta0", "beta1", "gamma", "numerical_eps", "sampling_eps", "mixed_score")


def sde_info(config: dict) -> dict:
    return {"kind": "cld", **{k: config[k] for k in _SDE_KEYS if k in config}}


def upgrade_card(card: dict) -> dict:
    """Format 1 kept the whole Config as sde_config and the net's dict as net_config; format 2
    moves them to config and net_config["net"]."""
    if card.get("config") is not None:
        return card
    try:
        config, net = dict(card["sde_config"]), dict(card["net_config"])
        shape = list(config["data_shape"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"cld checkpoint card (format 1) lacks {e}; expected the Config as "
                         f"sde_config") from None
    return {**card, "config": config, "data_shape": shape, "net_config": {"net": net},
            "sde_config": sde_info(config), "format_version": 2}


def hsm_loss(net: nn.Module, cld: CLD, x0: torch.Tensor, t: torch.Tensor, eps_x: torch.Tensor,
             eps_v: torch.Tensor, mixed_score: bool, weighting: str = "reweightedv2"
             ) -> torch.Tensor:
    """HSM loss per sample (N,) in fp32. x0, eps_x, eps_v: (N, *shape); t: (N,) float64."""
    if t.dtype != torch.float64:
        raise ValueError(f"hsm_loss: t must be float64 (CLD scalars are fp64), got {t.dtype}")
    x_t, v_t = cld.perturb(x0, t, eps_x, eps_v)
    alpha = net(torch.cat([x_t, v_t], dim=1), t.to(x0.dtype))
    ell = cld.ell(t)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        view = (-1,) + (1,) * (x0.dim() - 1)
        # r = s_theta / (-ell): the score in eps units
        r = alpha.float()
        if mixed_score:
            r = r + v_t.float() * (1.0 / (ell * cld.sigma_ref_vv(t))).float().view(view)
        err = ((r - eps_v.float()) ** 2).flatten(1).sum(1)
        if weighting == "reweightedv2":
            return err
        g = (cld.Gamma * cld.beta(t)).float()
        if weighting == "reweightedv1":
            return err * g
        return err * g * (ell ** 2).float()         # likelihood: (s + ell eps_v)^2 Gamma beta


def hsm_step(ctx, cfg: Config, cld: CLD, opt: torch.optim.Optimizer, x0: torch.Tensor,
             offset: int = 0) -> torch.Tensor:
    """One HSM update of the optimiser group "net" on model-space data x0; the lr follows
    ctx.lr_scale, its schedule starting after `offset` steps of an earlier stage (a latent
    model's VAE). Returns the detached loss."""
    N = x0.shape[0]
    eps_l = cfg.loss_eps
    u = ctx.rand(N, dtype=torch.float64)
    t = eps_l + (1.0 - eps_l) * (u if cfg.loss_t_power == 1.0 else u ** cfg.loss_t_power)
    eps_x = ctx.randn(*x0.shape)
    eps_v = ctx.randn(*x0.shape)
    loss = hsm_loss(ctx.m("net"), cld, x0, t, eps_x, eps_v, cfg.mixed_score,
                    cfg.weighting).mean()
    scale = ctx.lr_scale(cfg.warmup, cfg.lr_min_frac, offset=offset)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * scale
    ctx.optimize("net", loss)
    return loss.detach()


class Family:
    """The training-loop protocol (fastsample.train.loop.Family) for CLD."""

    name = "cld"
    released = ("net",)

    def __init__(self, data, config: Config):
        if tuple(data.x.shape[1:]) != config.data_shape:
            raise ValueError(f"cld: data {data.name!r} has sample shape {tuple(data.x.shape[1:])} "
                             f"but Config.data_shape is {config.data_shape}")
        self.data, self.config = data, config
        self.cld = CLD(config.cld_config())
        self.is_image = data.kind == "image"

    def modules(self) -> dict[str, nn.Module]:
        return {"net": build_net(self.config.net, self.config.net_config())}

    def optimizers(self, modules):
        self._opt = torch.optim.Adam(modules["net"].parameters(), lr=self.config.lr)
        return {"net": self._opt}

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = 2 * batch - 1 if self.is_image else batch
        return {"loss": hsm_step(ctx, self.config, self.cld, self._opt, x0)}

    def card(self) -> dict:
        net_cfg = self.config.net_config()
        config = self.config.to_dict()
        return {"dataset": self.data.name, "config": config,
                "data_shape": list(self.config.data_shape),
                "net_config": {"net": {"kind": self.config.net, **net_cfg.to_dict()}},
                "sde_config": sde_info(config)}

    def evaluate(self, ema_modules: dict[str, nn.Module]) -> dict:
        """Metrics of eval_samples SSCS-QS samples at eval_nfe from the EMA net."""
        from fastsample import metrics
        from fastsample.samplers import cld as cld_samplers

        net = ema_modules["net"]
        model = Model(self.config, net=net).eval()
        device = next(net.parameters()).device
        samples, nfe = cld_samplers.sample(model, "sscs", self.config.eval_nfe,
                                           self.config.eval_samples, seed=0, device=device)
        out = metrics.evaluate(samples.cpu(), self.data.name)
        return {**{k: float(v) for k, v in out.items()}, "nfe": nfe}


# ---------------------------------------------------------------------------------------------
# What a CLD model exports (registry: EXPORTS).

class ScoreGraph(nn.Module):
    """(x, v, t) -> alpha = Model.alpha(x, v, t), t the forward time."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, v, t):
        return self.model.alpha(x, v, t)


class PlanGraph(nn.Module):
    """(x_T, v_T, noise (N, R, 2, ...)) -> (x0, samples): a whole affine2 plan (SSCS, EM, the
    denoising row) with its float64 constants baked in, in the affine2 twin's arithmetic
    (kernels/affine.py) written out of place so that it traces into one graph; noise[:, k]
    holds (n0, n1) of the k-th row that draws noise, batch-first so that a server can
    concatenate requests on axis 0. decode=True (a latent model): samples =
    postprocess(model.decode(x0)), the decoder step."""

    def __init__(self, model, table, decode: bool = False):
        super().__init__()
        self.model, self.decode = model, decode
        self.rows = [tuple(r) for r in table.rows]
        self.post = table.header["postprocess"][0]

    def forward(self, x_T, v_T, noise):
        x, v, d = x_T, v_T, 0
        for net_on, t, k_v, k_a, T_xx, T_xv, T_vx, T_vv, K11, K21, K22, D_xv in self.rows:
            v_s = k_v * v
            if net_on:
                v_s = v_s + k_a * self.model.alpha(x, v, x.new_full((x.shape[0],), t))
            x_new = T_xx * x + T_xv * v_s + D_xv * v
            v_new = T_vx * x + T_vv * v_s
            if K11 or K21 or K22:
                x_new = x_new + K11 * noise[:, d, 0]
                v_new = v_new + K21 * noise[:, d, 0] + K22 * noise[:, d, 1]
                d += 1
            x, v = x_new, v_new
        return x, plans.apply_postprocess(self.post, self.model.decode(x) if self.decode else x)


def plan_part(model, table, shape: tuple, latent: bool = False) -> ExportPart:
    """A whole affine2 plan as one graph on states of `shape` (x_T ~ N(0, I), v_T ~ N(0, M I));
    latent=True: a latent model's, ending with its decoder step."""
    R = sum(1 for d in plans.noise_draws(table) if d)
    level = 1 / 16 if table.header["postprocess"][0] == "quantize17" else 0.0
    out, M = tuple(model.data_shape), model.cld.M

    def draw(n, g):
        return (torch.randn(n, *shape, generator=g),
                torch.randn(n, *shape, generator=g) * M ** 0.5,
                torch.randn(n, R, 2, *shape, generator=g))
    return ExportPart(PlanGraph(model, table, decode=latent),
                      [IOTensor("x_T", ("batch", *shape)), IOTensor("v_T", ("batch", *shape)),
                       IOTensor("noise", ("batch", R, 2, *shape))],
                      [IOTensor("x0", ("batch", *shape)),
                       IOTensor("samples", ("batch", *out), level=level)],
                      table, table.header["sampler"][0], int(table.header["nfe"][0]), draw,
                      "x_T, noise ~ N(0, I); v_T ~ N(0, M I)",
                      calls=plans.net_calls(table) + latent)


def _export_score(model, table) -> ExportPart:
    shape, eps = tuple(model.data_shape), model.cld.config.sampling_eps

    def draw(n, g):
        return (torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g),
                eps + (1 - eps) * torch.rand(n, generator=g))
    return ExportPart(ScoreGraph(model),
                      [IOTensor("x", ("batch", *shape)), IOTensor("v", ("batch", *shape)),
                       IOTensor("t", ("batch",))], [IOTensor("alpha", ("batch", *shape))],
                      table, table.header["sampler"][0], int(table.header["nfe"][0]), draw,
                      f"x, v ~ N(0, I); t uniform in [{eps:g}, 1]")


EXPORTS = {"score": _export_score}

