"""Latent DDGAN: a Denoising Diffusion GAN (reference/ddgan.md) whose x is LSGM's VAE latent.

The T-step VP chain, the generator x_0' = G(x_i, z, i), the time-conditioned discriminator
D(x_{i-1}, x_i, i), the non-saturating loss with lazy R1 and the posterior sampler are DDGAN's
(models/ddgan.py, samplers/ddgan.py), sized for the 4x4x4 latent: G is the U-Net preset latent4
(4 -> 2) with AdaGN of z, D a conv net over 4 -> 2 with the minibatch-std feature. Sampling
ends with the decoder step (samplers/latent_ddgan.py).

Training (two stages in one run, models/latent.py): the VAE with a Normal prior, then the GAN
on the frozen encoder's latents (the cosine lr decay spans the whole run, as DDGAN's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastsample.models import ddgan, latent, lsgm
from fastsample.models.registry import card_dict

FAMILY = "latent-ddgan"
SAMPLERS = ("posterior",)


@dataclass(frozen=True)
class Config(ddgan.Config, latent.VAEFields):
    """ddgan.Config (its arch fits the latent) + the VAE's fields."""
    disc_ch_mult: tuple = (1, 2)    # image discriminator: 4 -> 2 on the latent
    disc_mbstd: int = 4             # minibatch-std groups, DDGAN's digits recipe

    def __post_init__(self):
        ddgan.Config.__post_init__(self)
        self.check_vae(FAMILY, self.train_steps)


def default_config(data) -> Config:
    """Digits: DDGAN's digits recipe (T = 4, U-Net G, lrs, Adam betas, R1) on the 4x4x4 latent,
    after LSGM's 3000-step VAE stage."""
    lsgm.check_images(data, FAMILY)
    return Config(arch="unet")


class Model(latent.DecoderStep, ddgan.Model):
    """A latent DDGAN ready for sampling: denoise(x_i, z, i) on latents (N, *latent_shape);
    decode(z_0) -> model space [-1, 1]; to_data -> the data grid. vae: the VAE (latent.VAE)
    or, in tests, latent.IdentityVAE (kind "points" with an MLP G)."""

    family = FAMILY

    def __init__(self, cfg: Config, dataset: str = "digits", kind: str = "image",
                 vae: nn.Module | None = None):
        vae = vae if vae is not None else latent.VAE(cfg)
        shape = latent.state_shape(tuple(vae.latent_shape), cfg.latent_channels)
        super().__init__(cfg, dataset, kind, shape)
        self.vae = vae
        self.latent_shape = shape
        self.latent_channels = cfg.latent_channels
        self.data_shape = tuple(vae.data_shape)

    @classmethod
    def from_checkpoint(cls, state_dict: dict, card) -> "Model":
        card = card_dict(card)
        try:
            cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in card["config"].items()})
        except TypeError as e:
            raise ValueError(f"{FAMILY} checkpoint card: config is not a {FAMILY} Config "
                             f"({e})") from None
        model = cls(cfg, card["dataset"])
        model.generator.load_state_dict(latent.load_vae(model.vae, state_dict, FAMILY,
                                                        "generator"))
        return model


def upgrade_card(card: dict) -> dict:
    """Latent DDGAN cards were born in format 2."""
    return card


class Family(ddgan.Family):
    """Stage 1: the VAE with a Normal prior; stage 2: DDGAN's D and G updates on the frozen
    encoder's latents."""

    name = FAMILY
    released = ("encoder", "decoder", "generator")

    def __init__(self, data, config: Config):
        lsgm.check_images(data, FAMILY)
        super().__init__(data, config)
        self.data_shape = config.state_shape()

    def modules(self) -> dict[str, nn.Module]:
        return {**latent.vae_modules(self.cfg), **super().modules()}

    def optimizers(self, modules):
        return {**super().optimizers(modules), "vae": latent.vae_optimizer(modules, self.cfg)}

    def step(self, ctx, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = latent.vae_stage(ctx, self.cfg, batch)
        if out is not None:
            return out
        return self.gan_step(ctx, latent.encode_latents(ctx, batch, self.cfg.latent_channels))

    def card(self) -> dict:
        card = super().card()
        card["config"] = {k: list(v) if isinstance(v, tuple) else v
                          for k, v in asdict(self.cfg).items()}
        card["data_shape"] = latent.vae_data_shape(self.cfg)
        card["net_config"]["vae"] = latent.vae_card(self.cfg)
        return card

    def evaluate(self, ema_modules: dict) -> dict:
        """Metrics of cfg.eval_samples posterior samples from the EMA model."""
        from fastsample import metrics
        from fastsample.samplers import latent_ddgan as sampler
        model = latent.load_released(Model(self.cfg, self.data.name), ema_modules, "generator")
        device = next(model.parameters()).device
        x, nfe = sampler.sample(model, "posterior", self.cfg.T, self.cfg.eval_samples, seed=0,
                                device=device)
        return {**{k: float(v) for k, v in metrics.evaluate(x.cpu(), self.data.name).items()},
                "nfe": nfe}


# ---------------------------------------------------------------------------------------------
# What a latent DDGAN exports (registry: EXPORTS): the whole sampler with the decoder step.

def _export_sampler(model, table):
    """(z_T, z, noise) -> (z_0, samples): the latent posterior plan and the decoder, one graph."""
    return ddgan.sampler_part(model, table, tuple(model.latent_shape), latent=True)


EXPORTS = {"sampler": _export_sampler}
