"""DDGAN posterior sampler (reference/ddgan.md sec. 4).

x_T ~ N(0, I); for i = T..1: z ~ N(0, I), x_0' = G(x_i, z, i), x_{i-1} ~ q(x_{i-1} | x_i, x_0')
(sec. 1), the last step (i = 1) returning the posterior mean. NFE = T generator calls, counted.
The T steps are a posterior plan (samplers/plan.py) run by the one loop.

Randomness: x_T and the latents z are drawn by the caller (z is a net input, not kernel noise);
the posterior noise is the kernels' Philox stream keyed by `seed` (plan.py: counters).

A model here is anything with denoise(x_i, z, i), schedule (a DDGANSchedule), T, z_dim,
data_shape, dataset and to_data(x).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastsample import samplers as _driver
from fastsample.samplers import SampleResult, Sampler, Sampling, check_steps, seed_tensor
from fastsample.samplers import plan as plans

SAMPLERS = ("posterior",)
# The latents come from their own generator, seeded from `seed` by a fixed salt, so they never
# share a stream with x_T (drawn from manual_seed(seed)).
Z_SEED_SALT = 0x5DD6A9


@dataclass(frozen=True)
class PosteriorStep:
    """One step i -> i-1: x_{i-1} = c0 x_0' + c1 x_i + sigma n (python floats from float64)."""
    i: int
    c0: float
    c1: float
    sigma: float


def posterior_plan(schedule) -> tuple[PosteriorStep, ...]:
    """The T steps i = T..1 of a DDGANSchedule, computed once on the host; sigma = 0 at i = 1."""
    steps = []
    for i in range(schedule.num_steps, 0, -1):
        sigma = math.sqrt(max(float(schedule.sigma2_post[i]), 0.0)) if i > 1 else 0.0
        steps.append(PosteriorStep(i, float(schedule.c0[i]), float(schedule.c1[i]), sigma))
    return tuple(steps)


def posterior_table(schedule, data_shape, z_dim: int, postprocess: str = "none") -> plans.Table:
    """The plan of posterior sampling with a T-step DDGANSchedule."""
    steps = posterior_plan(schedule)
    header = {"family": ("ddgan",), "sampler": ("posterior",), "nfe": (len(steps),),
              "data_shape": tuple(data_shape), "z_dim": (int(z_dim),),
              "postprocess": (postprocess,)}
    rows = [(float(s.i), s.c0, s.c1, s.sigma) for s in steps]
    return plans.Table(header, plans.POSTERIOR_COLUMNS, rows)


def table(model, sampler: str = "posterior", steps: int | None = None, **opts) -> plans.Table:
    """The plan of a DDGAN Model: its trained T steps (steps, when given, must equal T)."""
    if sampler != "posterior":
        raise ValueError(f"unknown sampler {sampler!r} for family ddgan; choose posterior")
    if opts:
        raise ValueError(f"sampler 'posterior' of family ddgan takes no options; got "
                         f"{sorted(opts)}")
    if steps is not None:
        check_steps(steps)
        if steps != model.T:
            raise ValueError(f"this DDGAN checkpoint was trained with T={model.T}; --steps must "
                             f"be {model.T}, got {steps}")
    return posterior_table(model.schedule, model.data_shape, model.z_dim,
                           plans.postprocess_name(model.data_shape,
                                                  getattr(model, "dataset", "digits")))


def draw_latents(T: int, num: int, z_dim: int, seed: int, device) -> torch.Tensor:
    """z for a whole run, (T, num, z_dim) float32; z[k] feeds the k-th step (i = T - k)."""
    g = torch.Generator(device=device).manual_seed((seed + Z_SEED_SALT) % (1 << 63))
    return torch.randn(T, num, z_dim, generator=g, device=device)


def bind_latents(G: Callable, z: torch.Tensor) -> Callable:
    """The loop's net(x, t, k) for a generator G(x_i, z, i) and latents z (T, N, z_dim)."""
    return lambda x, t, k: G(x, z[k], t)


@torch.no_grad()
def sample_posterior(G: Callable, x_T: torch.Tensor, schedule, *, seed: int,
                     z: torch.Tensor, offset: int = 0, stride: int | None = None,
                     callback: Callable | None = None) -> SampleResult:
    """Posterior sampling (sec. 4) from x_T (N, ...) with generator G(x_i, z, i_float (N,)).

    z: (T, N, z_dim) latents, z[k] used at step i = T - k. Returns x_0 (model space, x_T's
    dtype) and nfe = number of G calls per sample (T). callback({'i', 'x', 'x0_pred'}) is called
    after each step. x_T is not modified.
    """
    T, N = schedule.num_steps, x_T.shape[0]
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[:2]) != (T, N):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z has shape {shape}; expected ({T}, {N}, z_dim) for T={T} steps and "
                         f"N={N} samples")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating tensor, got dtype {x_T.dtype}")
    tab = posterior_table(schedule, tuple(x_T.shape[1:]), z.shape[-1])
    seed_t = seed_tensor(seed, x_T.device)
    x = x_T.clone().contiguous()
    hook = None
    if callback is not None:
        def hook(k, x, out):
            callback({"i": int(tab.rows[k][0]), "x": x, "x0_pred": out})
    nfe = plans.run(tab, bind_latents(G, z), x, seed=seed_t, offset=offset, stride=stride,
                    callback=hook)
    return SampleResult(x, nfe)


#-----------------------------------------------------------------------------------------------
# The family's sampling declaration (samplers/__init__.py Sampling).

def prior(model, num: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T from manual_seed(seed) and z from draw_latents, as (num, ...) and (num, T, z_dim)
    (a transposed view of the (T, num, z_dim) draw, so batches slice it on axis 0)."""
    return prior_of_shape(model, model.data_shape, num, seed, device)


def prior_of_shape(model, shape: tuple, num: int, seed: int, device):
    """`prior` with x_T of shape (num, *shape) (a latent DDGAN's x is the VAE latent)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn((num, *shape), generator=g, device=device)
    z = draw_latents(model.T, num, model.z_dim, seed, device)
    return x_T, z.transpose(0, 1)


def bind(model, parts) -> tuple[tuple, Callable]:
    x_T, z = parts
    return (x_T.clone().contiguous(),), bind_latents(model.denoise, z.transpose(0, 1))


def finish(model, x):
    return model.to_data(x)


SAMPLING = Sampling(
    family="ddgan", samplers={"posterior": Sampler("posterior", None)},
    prior=prior, plan=table, bind=bind, adaptive=_driver.adaptive_samplers("ddgan"), finish=finish,
    model_steps=lambda model, name: int(model.T))

__all__ = ["SAMPLERS", "SAMPLING", "posterior_plan", "posterior_table", "table", "draw_latents",
           "sample_posterior", "prior", "prior_of_shape", "bind", "Z_SEED_SALT"]

# sample(model, name, steps, num, seed, device, batch=None, progress=False, **opts): the one driver.
sample = functools.partial(_driver.sample, SAMPLING)
