"""Latent DDGAN posterior sampler: DDGAN's T-step posterior plan (samplers/ddgan.py,
reference/ddgan.md sec. 4) run on a VAE latent, then one decoder call (the decoder step).

A model here is a DDGAN sampler's model (denoise, schedule, T, z_dim, data_shape, dataset) plus
latent_shape, decode(z_0, mode), to_data and `vae.mode`. x_T and the latents z are drawn as
DDGAN draws them (x_T from manual_seed(seed), z from its salted stream), x_T of the latent's
shape. NFE = T generator calls; the decoder call is not counted, as for LSGM.
"""

from __future__ import annotations

import functools

import torch

from fastsample import samplers as _driver
from fastsample.samplers import Sampler, Sampling
from fastsample.samplers import ddgan as _ddgan
from fastsample.samplers import plan as plans

FAMILY = "latent-ddgan"
SAMPLERS = ("posterior",)


def table(model, sampler: str = "posterior", steps: int | None = None, **opts) -> plans.Table:
    """DDGAN's posterior plan in latent space, with the decoder step."""
    return plans.as_latent(_ddgan.table(model, sampler, steps, **opts), FAMILY,
                           model.latent_shape, model.vae.mode)


def prior(model, num: int, seed: int, device):
    return _ddgan.prior_of_shape(model, model.latent_shape, num, seed, device)


def finish(model, z0: torch.Tensor, decode: str | None = None) -> torch.Tensor:
    """The decoder step, then the data grid (not counted in the NFE)."""
    return model.to_data(model.decode(z0, decode))


SAMPLING = Sampling(
    family=FAMILY, samplers={"posterior": Sampler("posterior", None)},
    prior=prior, plan=table, bind=_ddgan.bind, adaptive=_driver.adaptive_samplers(FAMILY),
    finish=finish, finish_options=("decode",), model_steps=lambda model, name: int(model.T))

__all__ = ["SAMPLERS", "SAMPLING", "table", "prior", "finish"]

# sample(model, name, steps, num, seed, device, batch=None, progress=False, **opts): the one driver.
sample = functools.partial(_driver.sample, SAMPLING)
