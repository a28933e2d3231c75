"""Latent Score-based Generative Model (reference/lsgm.md): a VAE whose prior is a score-based
diffusion model in latent space, with the mixed score (sec. 3), trained in two stages (sec. 4).

Pieces:
  encoder q(z_0 | x) = N(mu, s^2)        nets.vae.Encoder, one latent group latent_ch x 4 x 4
  decoder p(x | z_0)                     nets.vae.Decoder, categorical over the 17 grey levels
  prior   p(z_0)                         geometric VP-SDE (sde.GeometricVPSDE, lsgm.md sec. 2) in
                                         latent space; eps network = UNet preset "latent4" with the
                                         mixed score eps = (1 - alpha) sigma_t z_t + alpha eps'

Images only: the VAE is convolutional with a categorical likelihood over grey levels, so the 2D
toys (continuous points, no grey levels) are refused with a clear error.

The cross entropy, exact for the geometric VP-SDE (derivation in `cross_entropy`):

    CE(q_0 || p_0) = E_t [ beta_t / (2 sigma_t^2) ||eps - eps_theta(z_t, t)||^2 ]
                     - (D/2) log(sigma_1^2 / sigma_0^2) + CE(q_1 || N(0, I))

where q_t is the encoder's q(z_0 | x) pushed through q(z_t | z_0) = N(m_t z_0, sigma_t^2 I) and
D the latent size. As in the paper, z_0 ~ q(z_0 | x) is taken as the process at t = 0 although
the geometric SDE's kernel already carries sigma_0^2 = sigma2_min (3e-5) there: the bound is on
CE(q_0 || p_0) with q_0 = q(z_0 | x) scaled by m_0 ~ 1 - 1.5e-5 and blurred by sigma_0 ~ 0.0055,
a perturbation far below the encoder's own std. The last term is taken in closed form rather
than assuming q_1 = N(0, I) (the paper's constant D/2 log(2 pi e sigma_0^2) is its limit).

Training (Family.step switches on ctx.step):
  stage 1, steps 1..vae_steps: VAE with a N(0, I) prior, closed-form KL with a linear warm-up;
          with prior_in_stage1 the prior's own update below runs too (on the moving latents).
  stage 2, the rest, two optimiser groups:
    "vae"   (encoder + decoder): recon + negative encoder entropy + likelihood-weighted CE, t drawn
            from an importance proposal (see `is_proposal`) and divided by its density. The CE's
            gradient also reaches the prior's parameters during this backward; those gradients
            are discarded (the "prior" optimiser zeroes them before its own backward), so the
            prior never follows the bound's weighting.
    "prior" (UNet + mixing logits): unweighted eps-prediction loss ||eps - eps_theta||^2 with
            t ~ U[0, 1] on z_0.detach(), so the prior's loss moves no encoder parameter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastsample.nets import Decoder, Encoder, UNet, UNetConfig, VAEConfig
from fastsample.nets.vae import bits_per_dim
from fastsample.sde import GeometricVPSDE
from fastsample.models.registry import ExportPart, IOTensor, card_dict

SAMPLERS = ("ode", "em")
T_SAMPLINGS = ("is", "uniform")
DECODE_MODES = ("mode", "mean")
LOG_2PI = math.log(2 * math.pi)
# Fourier features of log t need t > 0; the prior sees t clamped here (math keeps the exact t).
T_NET_MIN = 1e-5


# ---------------------------------------------------------------------------------------------
# Config.

@dataclass(frozen=True)
class Config:
    latent_ch: int = 4              # channels of the 4x4 latent (one group)
    vae_base_ch: int = 32           # VAE channels at full resolution
    vae_res_blocks: int = 1         # VAE residual blocks per level
    prior_base_ch: int = 32         # prior U-Net channels at the first level (preset latent4)
    prior_res_blocks: int = 1       # prior U-Net residual blocks per level
    mixing_logit_init: float = -3.0 # alpha = sigmoid(logit) per channel; -3: alpha ~ 0.047 (sec. 3)
    sigma2_min: float = 3e-5        # geometric VP-SDE sigma^2(0) (sec. 2)
    sigma2_max: float = 0.999       # geometric VP-SDE sigma^2(1)
    vae_steps: int = 3000           # stage 1 length (VAE, Normal prior); stage 2 runs after it
    prior_in_stage1: bool = True    # also fit the prior to the (detached) latents during stage 1:
                                    # otherwise a time-boxed run leaves the EMA prior half
                                    # untrained (the first release: 663 prior steps, EMA 0.999)
    kl_warmup_frac: float = 0.3     # KL weight ramps linearly 0 -> 1 over this fraction of stage 1
    kl_min_coeff: float = 0.01      # KL weight at step 1 of the warm-up
    vae_t_sampling: str = "is"      # stage 2 t for the CE of the VAE: "is" (importance) | "uniform"
    lr_vae: float = 1e-3            # Adam lr, encoder + decoder (both stages)
    lr_prior: float = 1e-3          # Adam lr, prior U-Net + mixing logits
    decode: str = "mode"            # sampling: decoder "mode" (argmax level) or rounded "mean"
    eval_samples: int = 1000        # samples drawn by Family.evaluate
    eval_t_draws: int = 4           # t draws per image for the NELBO estimate in evaluate
    train_steps: int = 8000         # total optimiser steps, both stages (~17 min on 1 CPU thread; the CLI reads it)
    batch_size: int = 64            # global batch (the CLI reads it)
    ema_decay: float = 0.999        # EMA of encoder, decoder and prior (the CLI reads it)

    def __post_init__(self):
        for name in ("latent_ch", "vae_base_ch", "vae_res_blocks", "prior_base_ch",
                     "prior_res_blocks", "train_steps", "batch_size", "eval_samples",
                     "eval_t_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"lsgm Config.{name} = {v!r}; must be an int >= 1")
        if isinstance(self.vae_steps, bool) or not isinstance(self.vae_steps, int) \
                or not 0 <= self.vae_steps <= self.train_steps:
            raise ValueError(f"lsgm Config.vae_steps = {self.vae_steps!r}; must be an int in "
                             f"[0, train_steps={self.train_steps}]")
        if not 0 < self.sigma2_min < self.sigma2_max < 1:
            raise ValueError(f"lsgm Config: need 0 < sigma2_min ({self.sigma2_min}) < sigma2_max "
                             f"({self.sigma2_max}) < 1")
        if self.vae_t_sampling not in T_SAMPLINGS:
            raise ValueError(f"lsgm Config.vae_t_sampling = {self.vae_t_sampling!r}; choose "
                             f"{'|'.join(T_SAMPLINGS)}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"lsgm Config.decode = {self.decode!r}; choose {'|'.join(DECODE_MODES)}")
        if not 0 <= self.kl_warmup_frac <= 1 or not 0 <= self.kl_min_coeff <= 1:
            raise ValueError(f"lsgm Config: kl_warmup_frac ({self.kl_warmup_frac}) and kl_min_coeff "
                             f"({self.kl_min_coeff}) must lie in [0, 1]")
        for name in ("lr_vae", "lr_prior", "ema_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"lsgm Config.{name} = {v!r}; must be a finite number >= 0")
        if not math.isfinite(self.mixing_logit_init) and self.mixing_logit_init != -math.inf:
            raise ValueError(f"lsgm Config.mixing_logit_init = {self.mixing_logit_init}; must be "
                             f"finite (or -inf for a prior that is exactly N(0, I))")


def default_config(data) -> Config:
    """Digits preset; the 2D toys are refused (see the module docstring)."""
    check_images(data)
    return Config()


def check_images(data, family: str = "lsgm") -> None:
    """Refuse data a digits VAE cannot model (every latent family's check)."""
    if getattr(data, "kind", None) != "image":
        raise ValueError(f"{family} supports image data only (categorical VAE over grey levels); got "
                         f"data set {getattr(data, 'name', data)!r} of kind "
                         f"{getattr(data, 'kind', '?')!r}. Use --model ddpm|cld|ddgan for 2D toys")
    shape = tuple(data.x.shape[1:])
    if shape != (1, 8, 8):
        raise ValueError(f"{family} is configured for 8x8 single-channel digits; got images of shape "
                         f"{shape}")


def vae_config(cfg: Config) -> VAEConfig:
    return VAEConfig.preset("digits8", latent_ch=cfg.latent_ch, base_ch=cfg.vae_base_ch,
                            num_res_blocks=cfg.vae_res_blocks)


def prior_config(cfg: Config) -> UNetConfig:
    return UNetConfig.preset("latent4", in_ch=cfg.latent_ch, out_ch=cfg.latent_ch,
                             base_ch=cfg.prior_base_ch, num_res_blocks=cfg.prior_res_blocks)


def sde_of(cfg: Config) -> GeometricVPSDE:
    return GeometricVPSDE(sigma2_min=cfg.sigma2_min, sigma2_max=cfg.sigma2_max)


# ---------------------------------------------------------------------------------------------
# Prior network with the mixed score (lsgm.md sec. 3).

class MixedScorePrior(nn.Module):
    """eps_theta(z_t, t) = (1 - alpha) sigma_t z_t + alpha eps'(z_t, t), alpha = sigmoid(logit).

    z_t (N, C, 4, 4), t (N,) forward time in [0, 1]. sigma_t is recomputed from t with the
    geometric schedule (sigma_t^2 = sigma2_min (sigma2_max / sigma2_min)^t) in t's dtype, so the
    module alone is the whole prior (exportable without the sde package). alpha = 0 makes the
    prior exactly N(0, I): the VP-SDE keeps N(0, I) invariant and its eps is sigma_t z_t.
    """

    def __init__(self, net_cfg: UNetConfig, sigma2_min: float, sigma2_max: float,
                 mixing_logit_init: float):
        super().__init__()
        self.net = UNet(net_cfg)
        self.mixing_logit = nn.Parameter(torch.full((net_cfg.out_ch,), float(mixing_logit_init)))
        self.sigma2_min = float(sigma2_min)
        self.log_ratio = math.log(sigma2_max / sigma2_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.sigma2_min * torch.exp(self.log_ratio * t))

    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.mixing_logit)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma_t = self.sigma(t).to(z_t.dtype)[:, None, None, None]
        alpha = self.alpha().to(z_t.dtype)[None, :, None, None]
        eps_res = self.net(z_t, t.clamp(min=T_NET_MIN))
        return (1 - alpha) * sigma_t * z_t + alpha * eps_res


def build_prior(cfg: Config) -> MixedScorePrior:
    return MixedScorePrior(prior_config(cfg), cfg.sigma2_min, cfg.sigma2_max, cfg.mixing_logit_init)


# ---------------------------------------------------------------------------------------------
# Terms of the bound, per image (N,), in nats.

def gaussian_entropy(log_s: torch.Tensor) -> torch.Tensor:
    """H[N(mu, s^2)] summed over latent dims: sum (log s + log(2 pi e)/2)."""
    return (log_s + 0.5 * (LOG_2PI + 1)).flatten(1).sum(1)


def gaussian_ce_normal(mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """CE(N(mu, s^2) || N(0, I)) = sum (mu^2 + s^2 + log 2 pi) / 2."""
    return 0.5 * (mu * mu + torch.exp(2 * log_s) + LOG_2PI).flatten(1).sum(1)


def kl_normal(mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, s^2) || N(0, I)) = CE - H, closed form."""
    return 0.5 * (mu * mu + torch.exp(2 * log_s) - 1 - 2 * log_s).flatten(1).sum(1)


def is_proposal(u: torch.Tensor, v: float, sde: GeometricVPSDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance proposal r(t) for the likelihood-weighted CE: (t, r(t)) from u ~ U[0, 1).

    If the latents were N(0, v I), the best predictor's error gives the integrand
    beta_t/(2 sigma_t^2) E||eps - eps*||^2 = (D c/2) v / (v + (1 - v) sigma_t^2), c = log(s2max/s2min):
    constant for v = 1 (why the geometric SDE suits a near-Normal latent, lsgm.md sec. 2) and
    peaked at small t for v < 1. So r(t) = h(t) / Z with h(t) = 1 / (v + b e^{c t}),
    b = (1 - v) sigma2_min, whose antiderivative G(t) = (t - log(v + b e^{c t}) / c) / v inverts
    in closed form: e^{c v G} = w / (v + b w) with w = e^{c t}, so w = E v / (1 - E b).
    v = 1 gives the uniform proposal exactly. Computed in float64.
    """
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"is_proposal: v = {v!r}; must be a finite positive latent variance")
    c = sde.log_ratio / sde.T
    b = (1.0 - v) * sde.sigma2_min
    u64 = u.to(torch.float64)

    def G(t: float) -> float:
        return (t - math.log(v + b * math.exp(c * t)) / c) / v

    G0, G1 = G(0.0), G(sde.T)
    g = G0 + u64 * (G1 - G0)
    E = torch.exp(c * v * g)
    t = torch.log(E * v / (1.0 - E * b)) / c
    t = t.clamp(0.0, sde.T)
    r = 1.0 / ((v + b * torch.exp(c * t)) * (G1 - G0))
    return t, r


def cross_entropy(prior: nn.Module, z0: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor,
                  t: torch.Tensor, r_t: torch.Tensor, eps: torch.Tensor,
                  sde: GeometricVPSDE) -> torch.Tensor:
    """One-draw DSM estimate of CE(q_0 || p_0) per image (N,), t ~ r (density r_t (N,)).

    Derivation (both q_t and p_t solve the Fokker-Planck equation of dz = -beta/2 z dt + g dW):
    d/dt KL(q_t||p_t) = -(g^2/2) E||grad log q_t - grad log p_t||^2 and
    d/dt H(q_t) = E[div f] + (g^2/2) E||grad log q_t||^2, div f = -beta D/2. Integrating CE = KL + H
    from 0 to 1, replacing the marginal score by the conditional one -eps/sigma_t (denoising score
    matching) and p's score by -eps_theta/sigma_t:
        CE_0 = CE_1 + int beta/(2 sigma^2) E||eps - eps_theta||^2 dt - (D/2) int beta m^2/sigma^2 dt
    and beta m^2 / sigma^2 = d log sigma^2 / dt, so the last integral is log(sigma_1^2/sigma_0^2).
    CE_1 = CE(N(m_1 mu, m_1^2 s^2 + sigma_1^2) || N(0, I)) in closed form.
    """
    D = z0[0].numel()
    m_t, sigma_t = sde.marginal(t)
    beta_t = sde.beta(t)
    z_t = _bc(m_t, z0) * z0 + _bc(sigma_t, z0) * eps
    eps_hat = prior(z_t, t.to(z0.dtype))
    err = (eps - eps_hat).float().pow(2).flatten(1).sum(1)
    w = (beta_t / (2 * sigma_t ** 2) / r_t).to(err.dtype)
    m1, s1 = (float(x) for x in sde.marginal(sde.T))
    s0 = float(sde.std(0.0))
    var1 = m1 ** 2 * torch.exp(2 * log_s) + s1 ** 2
    ce1 = 0.5 * (m1 ** 2 * mu * mu + var1 + LOG_2PI).flatten(1).sum(1)
    const = -0.5 * D * math.log(s1 ** 2 / s0 ** 2)
    return w * err + const + ce1


def _bc(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coef.to(dtype=x.dtype, device=x.device).reshape((-1,) + (1,) * (x.dim() - 1))


def latent_variance(mu: torch.Tensor, log_s: torch.Tensor) -> float:
    """The batch's latent second moment E[z^2] = E[mu^2 + s^2] (a host read, training only),
    clamped so the proposal's density ratio stays within 1e3."""
    v = float((mu.detach() ** 2 + torch.exp(2 * log_s.detach())).mean())
    return min(max(v, 1e-3), 1e3)


def to_levels01(x_data: torch.Tensor) -> torch.Tensor:
    """Dequantised digits y in [0, 1) -> the grey levels k/16 the categorical decoder scores."""
    from fastsample.data import quantize_digits
    return quantize_digits(x_data)


@torch.no_grad()
def nelbo(encoder: nn.Module, decoder: nn.Module, prior: nn.Module, x: torch.Tensor,
          sde: GeometricVPSDE, generator: torch.Generator, t_draws: int = 4) -> dict:
    """NELBO per image (nats, mean over x) with the score prior and with a N(0, I) prior.

    x: (N, 1, 8, 8) on the level grid k/16. One z_0 per image, `t_draws` uniform t per image for
    the CE (an unbiased estimate either way). Returns floats: recon, neg_entropy, ce, nelbo,
    kl_normal, nelbo_normal, and both NELBOs in bits per dimension."""
    dev = x.device
    mu, log_s = encoder(x)
    z0 = mu + torch.exp(log_s) * torch.randn(mu.shape, generator=generator).to(dev)
    recon = -decoder.log_prob(decoder(z0), x)
    neg_ent = -gaussian_entropy(log_s)
    ce = torch.zeros_like(recon)
    for _ in range(t_draws):
        t = torch.rand(x.shape[0], generator=generator, dtype=torch.float64).to(dev)
        eps = torch.randn(z0.shape, generator=generator).to(dev)
        ce += cross_entropy(prior, z0, mu, log_s, t, torch.ones_like(t), eps, sde) / t_draws
    kl = kl_normal(mu, log_s)
    n_dims = x[0].numel()
    out = {"recon": recon.mean(), "neg_entropy": neg_ent.mean(), "ce": ce.mean(),
           "nelbo": (recon + neg_ent + ce).mean(), "kl_normal": kl.mean(),
           "nelbo_normal": (recon + kl).mean()}
    out = {k: float(v) for k, v in out.items()}
    out["nelbo_bpd"] = float(bits_per_dim(torch.tensor(out["nelbo"]), n_dims))
    out["nelbo_normal_bpd"] = float(bits_per_dim(torch.tensor(out["nelbo_normal"]), n_dims))
    return out


def split_state(state_dict: dict, family: str, heads: tuple) -> dict:
    """A checkpoint's flat state dict as {head: its weights without the `head.` prefix}; a key
    under no head is refused."""
    parts = {h: {} for h in heads}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head not in parts or not rest:
            raise ValueError(f"{family} checkpoint: unexpected weight {k!r}; keys must start "
                             f"with {', '.join(h + '.' for h in heads)}")
        parts[head][rest] = v
    return parts


def decode_levels(decoder: nn.Module, z0: torch.Tensor, mode: str) -> torch.Tensor:
    """z_0 -> model space [-1, 1]: the bin centre (k + 1/2)/K of the chosen level k, mapped
    by 2y - 1, so to_data recovers k/16 exactly. mode: "mode" = argmax level, "mean" = the
    categorical mean rounded to the nearest level. Shared by every latent family's decoder."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}; choose {'|'.join(DECODE_MODES)}")
    logits = decoder(z0)
    K = decoder.cfg.num_levels
    if mode == "mode":
        N, CK, H, W = logits.shape
        k = logits.reshape(N, CK // K, K, H, W).argmax(dim=2).float()
    else:
        k = torch.round(decoder.mean(logits) * (K - 1))
    y = (k + 0.5) / K
    return 2 * y - 1


def kl_coeff(cfg, step: int) -> float:
    """Linear KL warm-up over the first kl_warmup_frac of stage 1 (cfg.vae_steps), then 1."""
    n = cfg.kl_warmup_frac * cfg.vae_steps
    if n <= 0 or step >= n:
        return 1.0
    return cfg.kl_min_coeff + (1 - cfg.kl_min_coeff) * step / n


def encode_sample(ctx, x: torch.Tensor):
    """The encoder's (mu, log_s), a reparameterised z_0 ~ q(z_0 | x) and the decoder's
    reconstruction NLL per image (N,), from the loop's modules "encoder" and "decoder"."""
    enc, dec = ctx.m("encoder"), ctx.m("decoder")
    mu, log_s = enc(x)
    z0 = mu + torch.exp(log_s) * ctx.randn(*mu.shape)
    recon = -dec.log_prob(dec(z0), x)
    return mu, log_s, z0, recon


def normal_prior_step(ctx, cfg, mu: torch.Tensor, log_s: torch.Tensor,
                      recon: torch.Tensor, n_dims: int) -> dict:
    """Stage 1 (lsgm.md sec. 4): the VAE with a N(0, I) prior, closed-form KL with the warm-up,
    one update of the optimiser group "vae"."""
    kl = kl_normal(mu, log_s)
    loss = (recon + kl_coeff(cfg, ctx.step) * kl).mean() / n_dims
    ctx.optimize("vae", loss)
    return {"loss_vae": loss.detach(),
            "nelbo_bpd": bits_per_dim((recon + kl).mean(), n_dims).detach()}


# ---------------------------------------------------------------------------------------------
# The released model: EMA encoder, decoder and prior.

class Model(nn.Module):
    """Sampling-ready LSGM. `eps(z_t, t)` is the prior's mixed eps prediction (latent
    (N, C, 4, 4), t (N,)); `decode(z_0)` maps latents to model space [-1, 1] (N, 1, 8, 8);
    `to_data` maps that to the digits grid k/16."""

    family = "lsgm"

    def __init__(self, cfg: Config, dataset: str = "digits"):
        super().__init__()
        self.cfg, self.dataset = cfg, dataset
        self.vae_cfg = vae_config(cfg)
        self.encoder = Encoder(self.vae_cfg)
        self.decoder = Decoder(self.vae_cfg)
        self.prior = build_prior(cfg)
        self.sde = sde_of(cfg)

    @property
    def latent_shape(self) -> tuple:
        return self.vae_cfg.latent_shape

    def eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.prior(z_t, t)

    forward = eps

    def decode(self, z0: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """z_0 -> model space [-1, 1]: the bin centre (k + 1/2)/17 of the chosen level k, mapped
        by 2y - 1, so to_data recovers k/16 exactly. mode: "mode" = argmax level, "mean" = the
        categorical mean rounded to the nearest level."""
        return decode_levels(self.decoder, z0, mode or self.cfg.decode)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        from fastsample.data import quantize_digits
        return quantize_digits((x.float() + 1) / 2)

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        card = upgrade_card(card_dict(card))
        dataset = card["dataset"]
        try:
            cfg = Config(**card["config"])
        except TypeError as e:
            raise ValueError(f"lsgm checkpoint card: config is not an lsgm Config ({e})") from None
        model = cls(cfg, dataset)
        parts = split_state(state_dict, "lsgm", ("encoder", "decoder", "prior"))
        for name, sd in parts.items():
            getattr(model, name).load_state_dict(sd)
        return model


# ---------------------------------------------------------------------------------------------
# Training (the shared loop's Family protocol).

class Family:
    """Two-stage LSGM training (lsgm.md sec. 4); see the module docstring for the gradients."""

    name = "lsgm"
    released = ("encoder", "decoder", "prior")

    def __init__(self, data, config: Config):
        check_images(data)
        self.data, self.cfg = data, config
        self.vae_cfg = vae_config(config)
        self.sde = sde_of(config)

    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": Encoder(self.vae_cfg), "decoder": Decoder(self.vae_cfg),
                "prior": build_prior(self.cfg)}

    def optimizers(self, modules):
        vae = list(modules["encoder"].parameters()) + list(modules["decoder"].parameters())
        return {"vae": torch.optim.Adam(vae, lr=self.cfg.lr_vae),
                "prior": torch.optim.Adam(modules["prior"].parameters(), lr=self.cfg.lr_prior)}

    def kl_coeff(self, step: int) -> float:
        return kl_coeff(self.cfg, step)

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = to_levels01(batch)  # (N, 1, 8, 8) on the level grid
        n, n_dims = x.shape[0], x[0].numel()
        mu, log_s, z0, recon = encode_sample(ctx, x)
        if ctx.step <= self.cfg.vae_steps:
            out = normal_prior_step(ctx, self.cfg, mu, log_s, recon, n_dims)
            if self.cfg.prior_in_stage1:
                out["loss_prior"] = self._prior_step(ctx, z0)
            return out

        # Stage 2, VAE: the likelihood-weighted CE with importance-sampled t.
        if self.cfg.vae_t_sampling == "is":
            t, r_t = is_proposal(ctx.rand(n, dtype=torch.float64), latent_variance(mu, log_s), self.sde)
        else:
            t = ctx.rand(n, dtype=torch.float64)
            r_t = torch.ones_like(t)
        t, r_t = t.to(ctx.device), r_t.to(ctx.device)
        ce = cross_entropy(ctx.m("prior"), z0, mu, log_s, t, r_t, ctx.randn(*mu.shape), self.sde)
        neg_ent = -gaussian_entropy(log_s)
        nelbo_i = recon + neg_ent + ce
        loss_vae = nelbo_i.mean() / n_dims
        ctx.optimize("vae", loss_vae)

        return {"loss_vae": loss_vae.detach(), "loss_prior": self._prior_step(ctx, z0),
                "nelbo_bpd": bits_per_dim(nelbo_i.mean(), n_dims).detach()}

    def _prior_step(self, ctx, z0: torch.Tensor) -> torch.Tensor:
        """The prior's own update: unweighted eps prediction on detached latents, t ~ U[0, 1]."""
        zd = z0.detach()
        t_p = ctx.rand(zd.shape[0], dtype=torch.float64).to(ctx.device)
        eps = ctx.randn(*zd.shape)
        m_t, sigma_t = self.sde.marginal(t_p)
        z_t = _bc(m_t, zd) * zd + _bc(sigma_t, zd) * eps
        loss_prior = (ctx.m("prior")(z_t, t_p.to(zd.dtype)) - eps).float().pow(2).mean()
        ctx.optimize("prior", loss_prior)
        return loss_prior.detach()

    def card(self) -> dict:
        v = self.vae_cfg
        return {"dataset": self.data.name, "config": asdict(self.cfg),
                "data_shape": [v.in_ch, v.resolution, v.resolution],
                "net_config": {"vae": _json_safe(v.to_dict()),
                               "prior": _json_safe(prior_config(self.cfg).to_dict())},
                "sde_config": {"kind": "geometric_vp", "sigma2_min": self.cfg.sigma2_min,
                               "sigma2_max": self.cfg.sigma2_max, "T": 1.0}}

    def evaluate(self, ema_modules: dict) -> dict:
        """Test-split NELBO (score prior and N(0, I) prior) and sample metrics of the EMA model."""
        from fastsample import metrics
        from fastsample.data import load_dataset
        from fastsample.samplers import lsgm as sampler
        model = Model(self.cfg, self.data.name)
        for k in self.released:
            getattr(model, k).load_state_dict(ema_modules[k].state_dict())
        device = next(ema_modules["prior"].parameters()).device
        model = model.to(device).eval()
        out = {}
        if self.data.name == "digits":
            x = load_dataset("digits", split="test").x.to(device)
            out.update(nelbo(model.encoder, model.decoder, model.prior, x, model.sde,
                             torch.Generator().manual_seed(0), self.cfg.eval_t_draws))
        x, nfe = sampler.sample(model, "ode", 1, self.cfg.eval_samples, seed=0, device=device,
                                rtol=1e-3, atol=1e-3)
        if self.data.name == "digits":
            out.update(metrics.evaluate(x.cpu(), "digits"))
        out["nfe_ode_1e-3"] = nfe
        return out


def upgrade_card(card: dict) -> dict:
    """Format 1 kept the Config in net_config["config"] beside the vae and prior dicts; format 2
    moves it to config and records the data shape (the VAE's input)."""
    if card.get("config") is not None:
        return card
    try:
        net = dict(card["net_config"])
        config, vae = net.pop("config"), net["vae"]
        shape = [vae["in_ch"], vae["resolution"], vae["resolution"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"lsgm checkpoint card (format 1) lacks {e}; expected net_config with "
                         f"config and vae") from None
    return {**card, "config": config, "data_shape": shape, "net_config": net,
            "format_version": 2}


def _json_safe(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["Config", "default_config", "Family", "Model", "SAMPLERS", "MixedScorePrior",
           "decode_levels", "kl_coeff", "encode_sample", "normal_prior_step", "check_images",
           "build_prior", "cross_entropy", "is_proposal", "nelbo", "gaussian_entropy",
           "gaussian_ce_normal", "kl_normal", "vae_config", "prior_config", "sde_of"]


# ---------------------------------------------------------------------------------------------
# What an LSGM exports (registry: EXPORTS).

class DecoderGraph(nn.Module):
    """z0 -> x in model space (Model.decode: the level's bin centre, argmax or rounded mean)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z0):
        return self.model.decode(z0)


class ScoreGraph(nn.Module):
    """(z_t, t) -> eps = Model.eps(z_t, t), the mixed-score eps prediction."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z_t, t):
        return self.model.eps(z_t, t)


def _export_decoder(model, table) -> ExportPart:
    lat, data = tuple(model.latent_shape), tuple(table.header["data_shape"])
    K = model.vae_cfg.num_levels

    def draw(n, g):
        return (torch.randn(n, *lat, generator=g),)
    return ExportPart(DecoderGraph(model), [IOTensor("z0", ("batch", *lat))],
                      [IOTensor("x", ("batch", *data), level=2 / K)], table, "em",
                      int(table.header["nfe"][0]), draw, "z0 ~ N(0, I)",
                      {"decode": model.cfg.decode})


def _export_score(model, table) -> ExportPart:
    lat = tuple(model.latent_shape)

    def draw(n, g):
        return torch.randn(n, *lat, generator=g), torch.rand(n, generator=g)
    return ExportPart(ScoreGraph(model),
                      [IOTensor("z_t", ("batch", *lat)), IOTensor("t", ("batch",))],
                      [IOTensor("eps", ("batch", *lat))], table, "em",
                      int(table.header["nfe"][0]), draw, "z_t ~ N(0, I); t uniform in [0, 1]")


EXPORTS = {"decoder": _export_decoder, "score": _export_score}

