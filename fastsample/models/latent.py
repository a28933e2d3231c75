"""What the latent families (a prior of another family run in a VAE's latent space) share: the
VAE's Config fields, the VAE module with its decoder step, an identity "VAE" for oracle tests,
and the two training stages' VAE side.

The VAE is LSGM's (models/lsgm.py: the same encoder/decoder design, the categorical likelihood
over the 17 digit levels, the stage-1 recipe with a N(0, I) prior and a KL warm-up). A latent
family trains in two stages inside one `fastsample train` run:

  stage 1, steps 1..vae_steps: the VAE with the Normal prior (lsgm.normal_prior_step);
  stage 2, the rest: the VAE is frozen and the family's prior trains on latents
          z_0 ~ q(z_0 | x) of the frozen encoder (one reparameterised draw per image).

The checkpoint releases the EMA encoder and decoder. The EMA keeps moving towards the frozen
weights through stage 2 (at decay 0.999 over >= 4000 steps its distance from them shrinks by
e^-4 or more), so the released decoder is the one the prior's latents were drawn for, up to
that residue. End-to-end training (stage 2 also moving the VAE through the prior's cross
entropy, LSGM's stage 2) is not implemented for the latent families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastsample.nets import Decoder, Encoder
from fastsample.models import lsgm


@dataclass(frozen=True)
class VAEFields:
    """The VAE's hyper-parameters, as fields of a latent family's flat Config (`--set`)."""
    latent_ch: int = 4              # channels of the 4x4 latent
    vae_base_ch: int = 32           # VAE channels at full resolution
    vae_res_blocks: int = 1         # VAE residual blocks per level
    vae_steps: int = 3000           # stage 1 length (VAE, Normal prior); the prior trains after
    kl_warmup_frac: float = 0.3     # KL weight ramps linearly 0 -> 1 over this fraction of stage 1
    kl_min_coeff: float = 0.01      # KL weight at step 1 of the warm-up
    lr_vae: float = 1e-3            # Adam lr of encoder + decoder (stage 1)
    decode: str = "mode"            # sampling: decoder "mode" (argmax level) or rounded "mean"
    vae_init: str = ""              # a checkpoint (e.g. a released LSGM) whose encoder. and
                                    # decoder. weights start the VAE; with vae_steps = 0 the VAE
                                    # stays as loaded and only the prior trains
    latent_channels: tuple = ()     # the latent channels the prior models (() = all); the others
                                    # are inactive (q(z | x) = the prior for every x) and the
                                    # decoder step reads them at 0, their mean

    def check_vae(self, family: str, train_steps: int) -> None:
        for name in ("latent_ch", "vae_base_ch", "vae_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{family} Config.{name} = {v!r}; must be an int >= 1")
        if isinstance(self.vae_steps, bool) or not isinstance(self.vae_steps, int) \
                or not 0 <= self.vae_steps < train_steps:
            raise ValueError(f"{family} Config.vae_steps = {self.vae_steps!r}; must be an int in "
                             f"[0, train_steps={train_steps}) so the prior trains")
        if not 0 <= self.kl_warmup_frac <= 1 or not 0 <= self.kl_min_coeff <= 1:
            raise ValueError(f"{family} Config: kl_warmup_frac and kl_min_coeff must lie in "
                             f"[0, 1]")
        if not (isinstance(self.lr_vae, (int, float)) and math.isfinite(self.lr_vae)
                and self.lr_vae > 0):
            raise ValueError(f"{family} Config.lr_vae = {self.lr_vae!r}; must be > 0")
        if self.decode not in lsgm.DECODE_MODES:
            raise ValueError(f"{family} Config.decode = {self.decode!r}; choose "
                             f"{'|'.join(lsgm.DECODE_MODES)}")
        ch = self.latent_channels
        if isinstance(ch, (str, bytes)) or not hasattr(ch, "__iter__"):
            ch = (ch,)
        ch = tuple(ch)
        object.__setattr__(self, "latent_channels", ch)
        if any(isinstance(c, bool) or not isinstance(c, int) for c in ch) \
                or list(ch) != sorted(set(ch)) or (ch and not 0 <= ch[0] <= ch[-1] < self.latent_ch):
            raise ValueError(f"{family} Config.latent_channels = {ch!r}; must be increasing "
                             f"distinct channel indices in [0, latent_ch={self.latent_ch}), or "
                             f"() for all")

    def state_shape(self) -> tuple:
        """The prior's state: the latent's modelled channels (all of them by default)."""
        return state_shape(lsgm.vae_config(self).latent_shape, self.latent_channels)


def state_shape(latent_shape: tuple, channels: tuple) -> tuple:
    """A latent prior's state: latent_shape with only the modelled channels (() = all)."""
    C, *rest = latent_shape
    return (len(channels) or C, *rest)


class VAE(nn.Module):
    """LSGM's encoder and decoder. decode(z_0) -> model space [-1, 1] (the decoder step of a
    latent sampler); to_data -> the digits grid k/16."""

    def __init__(self, cfg: VAEFields):
        super().__init__()
        self.vae_cfg = lsgm.vae_config(cfg)
        self.mode = cfg.decode
        self.encoder = Encoder(self.vae_cfg)
        self.decoder = Decoder(self.vae_cfg)

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.vae_cfg.latent_shape)

    @property
    def data_shape(self) -> tuple:
        v = self.vae_cfg
        return (v.in_ch, v.resolution, v.resolution)

    def decode(self, z0: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return lsgm.decode_levels(self.decoder, z0, mode or self.mode)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        from fastsample.data import quantize_digits
        return quantize_digits((x.float() + 1) / 2)


class IdentityVAE(nn.Module):
    """The identity as a "VAE" on points of shape `shape` (oracle tests: a latent family with
    it must reproduce its pixel-space family exactly)."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.latent_shape = self.data_shape = tuple(shape)
        self.mode = "mode"

    def decode(self, z0: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return z0

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def active_channels(encoder: nn.Module, x01: torch.Tensor, threshold: float = 0.01) -> tuple:
    """Latent channels whose posterior mean varies over the data (Burda et al. 2016's active
    units, per channel: Var_x E[z | x] averaged over the channel's positions > threshold). An
    inactive channel has q(z | x) ~ the N(0, I) prior for every x: nothing to model there.
    x01: images on [0, 1] levels (lsgm.to_levels01)."""
    with torch.no_grad():
        mu, _ = encoder(x01)
    var = mu.var(dim=0).flatten(1).mean(1)
    return tuple(int(c) for c in torch.nonzero(var > threshold).flatten())


def full_latent(z0: torch.Tensor, channels: tuple, full_ch: int) -> torch.Tensor:
    """The modelled channels of z0 (N, len(channels), ...) put in their places of the VAE's
    latent, the inactive ones at 0 (by concatenation, so that it traces into one graph with the
    same inputs). The caller checks z0's shape (DecoderStep.decode)."""
    zero = z0.new_zeros(z0.shape[0], 1, *z0.shape[2:])
    where = {c: k for k, c in enumerate(channels)}
    return torch.cat([z0[:, where[c]:where[c] + 1] if c in where else zero
                      for c in range(full_ch)], dim=1)


class DecoderStep:
    """A latent Model's decoder step and data map, both the VAE's (mixed into the Models).
    With latent_channels set (`self.latent_channels`), the decoder step first rebuilds the VAE's
    full latent from the modelled channels."""

    latent_channels: tuple = ()

    def decode(self, z0: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        if self.latent_channels:
            if tuple(z0.shape[1:]) != tuple(self.latent_shape):
                raise ValueError(f"{self.family} decode: z0 has shape {tuple(z0.shape)}; "
                                 f"expected (N, {', '.join(map(str, self.latent_shape))}), the "
                                 f"modelled channels {self.latent_channels}")
            z0 = full_latent(z0, self.latent_channels, int(self.vae.latent_shape[0]))
        return self.vae.decode(z0, mode)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.to_data(x)


def vae_modules(cfg: VAEFields) -> dict:
    """The training run's encoder and decoder: fresh, or loaded from cfg.vae_init."""
    vae_cfg = lsgm.vae_config(cfg)
    mods = {"encoder": Encoder(vae_cfg), "decoder": Decoder(vae_cfg)}
    if cfg.vae_init:
        from fastsample import checkpoint as ck
        sd, _ = ck.load_checkpoint(cfg.vae_init)
        for name, m in mods.items():
            part = {k.partition(".")[2]: v.float() for k, v in sd.items()
                    if k.partition(".")[0] == name}
            try:
                m.load_state_dict(part)
            except RuntimeError as e:
                raise ValueError(f"vae_init {cfg.vae_init}: its {name} does not fit this "
                                 f"Config's VAE ({str(e).splitlines()[0]})") from None
    return mods


def vae_optimizer(modules: dict, cfg: VAEFields) -> torch.optim.Optimizer:
    params = list(modules["encoder"].parameters()) + list(modules["decoder"].parameters())
    return torch.optim.Adam(params, lr=cfg.lr_vae)


def vae_stage(ctx, cfg: VAEFields, batch: torch.Tensor) -> dict | None:
    """Stage 1's step (the VAE with a Normal prior, optimiser group "vae") while
    ctx.step <= vae_steps; None after it."""
    if ctx.step > cfg.vae_steps:
        return None
    x = lsgm.to_levels01(batch)
    mu, log_s, _, recon = lsgm.encode_sample(ctx, x)
    return lsgm.normal_prior_step(ctx, cfg, mu, log_s, recon, x[0].numel())


@torch.no_grad()
def encode_latents(ctx, batch: torch.Tensor, channels: tuple = ()) -> torch.Tensor:
    """Stage 2's data: z_0 ~ q(z_0 | x) from the frozen encoder, one draw per image, of the
    modelled channels (all by default)."""
    mu, log_s = ctx.m("encoder")(lsgm.to_levels01(batch))
    z0 = mu + torch.exp(log_s) * ctx.randn(*mu.shape)
    return z0[:, list(channels)] if channels else z0


def load_vae(vae: VAE, state_dict: dict, family: str, prior_keys: str) -> dict:
    """Load encoder./decoder. weights into `vae`; returns the rest (the prior's), keyed without
    `prior_keys.`. A key under neither is refused."""
    parts = lsgm.split_state(state_dict, family, ("encoder", "decoder", prior_keys))
    vae.encoder.load_state_dict(parts["encoder"])
    vae.decoder.load_state_dict(parts["decoder"])
    return parts[prior_keys]


def vae_card(cfg: VAEFields) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in lsgm.vae_config(cfg).to_dict().items()}


def vae_data_shape(cfg: VAEFields) -> list:
    v = lsgm.vae_config(cfg)
    return [v.in_ch, v.resolution, v.resolution]


def load_released(model: nn.Module, ema_modules: dict, prior: str) -> nn.Module:
    """A latent Model with the loop's EMA encoder, decoder and prior module `prior`, in eval
    mode on the prior's device (Family.evaluate)."""
    model.vae.encoder.load_state_dict(ema_modules["encoder"].state_dict())
    model.vae.decoder.load_state_dict(ema_modules["decoder"].state_dict())
    getattr(model, prior).load_state_dict(ema_modules[prior].state_dict())
    return model.to(next(ema_modules[prior].parameters()).device).eval()
