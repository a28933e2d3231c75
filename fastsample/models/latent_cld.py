"""Latent CLD: LSGM's VAE with a Critically-Damped Langevin prior on its latent, in phase space
(z, v) (reference/cld.md, reference/lsgm.md).

Prior: hybrid score matching on the velocity with the mixed score, exactly CLD's
(models/cld.py: hsm_loss, the net alpha(z, v, t) on the stacked (z, v)), on the 4x4x4 latent:

    s_theta(u_t, t) = -v_t / SigmaRef_vv(t) - ell_t alpha_theta(u_t, t).

The analytic part, in latent space. Stage 1 trains the VAE against a N(0, I) prior, so its
latents are close to N(0, I) (the premise of LSGM's mixed score). For z_0 ~ N(0, I), v_0 ~
N(0, gamma M I), the CLD kernel is linear-Gaussian, so u_t = (z_t, v_t) ~ N(0, Sigma(t)) with
Sigma the covariance of cld.md sec. 2.2 at s_x = Var(z_0) = 1, s_v = gamma M: exactly CLD's
mixed-score reference kernel, which in pixel space was a stand-in for data that are not Normal
and in latent space is the latents' own law. The exact Normal-latent score is
grad_v log N(u; 0, Sigma) = (Sigma_xv z - Sigma_xx v) / det Sigma; its v-marginal part
-v / Sigma_vv is what the mixed score keeps, so that SSCS's score half step stays the affine map
v <- k_v v + k_alpha alpha of its plan rows (no z term; the cross term is the network's). With
alpha = 0 the prior is then the v-marginal score of N(0, I) latents (tests check the marginal
moments against the closed forms).

Training (two stages in one run, models/latent.py): the VAE with a Normal prior, then the CLD
prior on the frozen encoder's latents; no end-to-end stage. Sampling: SSCS / EM / the ODE in
latent space, then the decoder step (samplers/latent_cld.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastsample.models import cld, latent, lsgm
from fastsample.models.registry import ExportPart, card_dict
from fastsample.sde import CLD

FAMILY = "latent-cld"
SAMPLERS = ("sscs", "em", "ode")


@dataclass(frozen=True)
class Config(cld.Config, latent.VAEFields):
    """cld.Config (its data_shape is the shape CLD runs on: the latent, or with latent_channels
    set the modelled channels, derived from the VAE's fields) + the VAE's fields."""

    def __post_init__(self):
        self.check_vae(FAMILY, self.train_steps)
        if self.latent_channels:
            # `--set latent_channels=0` alone must give the CLD its one-channel state.
            object.__setattr__(self, "data_shape", self.state_shape())
        cld.Config.__post_init__(self)


def default_config(data) -> Config:
    """Digits: the CLD prior is CLD's digits recipe on the 4x4x4 latent (U-Net preset latent4
    on the stacked (z, v), mixed score) after LSGM's 3000-step VAE stage; batch 64 as LSGM's."""
    lsgm.check_images(data, FAMILY)
    shape = lsgm.vae_config(latent.VAEFields()).latent_shape
    return Config(data_shape=shape, net="unet", unet_preset="latent4", mixed_score=True,
                  train_steps=8000, batch_size=64, ema_decay=0.999, eval_nfe=20)


class Model(latent.DecoderStep, nn.Module):
    """A latent CLD ready for sampling: alpha(z, v, t) on latents (N, *latent_shape), t (N,)
    forward time; decode(z_0) -> model space [-1, 1]; to_data -> the data grid. vae: the VAE
    (latent.VAE) or, in tests, latent.IdentityVAE."""

    family = FAMILY

    def __init__(self, config: Config, dataset: str = "digits", net: nn.Module | None = None,
                 vae: nn.Module | None = None):
        super().__init__()
        self.config, self.dataset = config, dataset
        self.cld = CLD(config.cld_config())
        self.mixed_score = config.mixed_score
        self.vae = vae if vae is not None else latent.VAE(config)
        if latent.state_shape(tuple(self.vae.latent_shape), config.latent_channels) \
                != tuple(config.data_shape):
            raise ValueError(f"{FAMILY}: the VAE's latent {self.vae.latent_shape} (channels "
                             f"{config.latent_channels or 'all'}) is not the config's CLD shape "
                             f"{config.data_shape}")
        self.latent_shape = tuple(config.data_shape)
        self.latent_channels = config.latent_channels
        self.data_shape = tuple(self.vae.data_shape)
        self.net = net if net is not None else cld.build_net(config.net, config.net_config())

    def alpha(self, z: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, v], dim=1), t)

    forward = alpha

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        card = card_dict(card)
        config = Config.from_dict(card["config"])
        vae = latent.VAE(config)
        rest = latent.load_vae(vae, state_dict, FAMILY, "net")
        model = cls(config, card["dataset"], cld.net_from_card(config, card["net_config"]["net"],
                                                             FAMILY), vae)
        cld.load_net(model.net, rest, FAMILY)
        return model


def upgrade_card(card: dict) -> dict:
    """Latent CLD cards were born in format 2."""
    return card


class Family:
    """Stage 1: the VAE with a Normal prior; stage 2: HSM of the CLD prior on the frozen
    encoder's latents, its lr warm-up counted from the stage's first step."""

    name = FAMILY
    released = ("encoder", "decoder", "net")

    def __init__(self, data, config: Config):
        lsgm.check_images(data, FAMILY)
        self.data, self.config = data, config
        self.cld = CLD(config.cld_config())

    def modules(self) -> dict[str, nn.Module]:
        return {**latent.vae_modules(self.config),
                "net": cld.build_net(self.config.net, self.config.net_config())}

    def optimizers(self, modules):
        self._opt = torch.optim.Adam(modules["net"].parameters(), lr=self.config.lr)
        return {"vae": latent.vae_optimizer(modules, self.config), "net": self._opt}

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = latent.vae_stage(ctx, self.config, batch)
        if out is not None:
            return out
        z0 = latent.encode_latents(ctx, batch, self.config.latent_channels)
        return {"loss": cld.hsm_step(ctx, self.config, self.cld, self._opt, z0,
                                     offset=self.config.vae_steps)}

    def card(self) -> dict:
        config = self.config.to_dict()
        net_cfg = self.config.net_config()
        return {"dataset": self.data.name, "config": config,
                "data_shape": latent.vae_data_shape(self.config),
                "net_config": {"net": {"kind": self.config.net, **net_cfg.to_dict()},
                               "vae": latent.vae_card(self.config)},
                "sde_config": cld.sde_info(config)}

    def evaluate(self, ema_modules: dict) -> dict:
        """Metrics of eval_samples SSCS-QS samples at eval_nfe from the EMA model."""
        from fastsample import metrics
        from fastsample.samplers import latent_cld as sampler
        model = latent.load_released(Model(self.config, self.data.name), ema_modules, "net")
        device = next(model.parameters()).device
        x, nfe = sampler.sample(model, "sscs", self.config.eval_nfe, self.config.eval_samples,
                                seed=0, device=device)
        return {**{k: float(v) for k, v in metrics.evaluate(x.cpu(), self.data.name).items()},
                "nfe": nfe}


# ---------------------------------------------------------------------------------------------
# What a latent CLD exports (registry: EXPORTS): the whole sampler with the decoder step.

def _export_sampler(model, table) -> ExportPart:
    """(z_T, v_T, noise) -> (z_0, samples): the latent SSCS/EM plan and the decoder, one graph."""
    return cld.plan_part(model, table, tuple(model.latent_shape), latent=True)


EXPORTS = {"sampler": _export_sampler}
