"""DDGAN posterior sampler (reference/ddgan.md sec. 4).

x_T ~ N(0, I); for i = T..1: z ~ N(0, I), x_0' = G(x_i, z, i), x_{i-1} ~ q(x_{i-1} | x_i, x_0')
(sec. 1), the last step (i = 1) returning the posterior mean. NFE = T generator calls, counted.

Randomness: x_T and the latents z are drawn by the caller (z is a net input, not kernel noise);
the posterior noise is the kernels' Philox stream keyed by `seed`, with counters
[offset + k * stride, + numel) at the k-th step, so a batch that starts at sample s of a larger
run passes offset = s * numel_per_sample and stride = total numel to reuse the run's counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastsample.kernels import dispatch
from fastsample.samplers import (SampleResult, batch_starts, check_request, check_steps,
                                 seed_tensor)

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


def draw_latents(T: int, num: int, z_dim: int, seed: int, device) -> torch.Tensor:
    """z for a whole run, (T, num, z_dim) float32; z[k] feeds the k-th step (i = T - k)."""
    g = torch.Generator(device=device).manual_seed((seed + Z_SEED_SALT) % (1 << 63))
    return torch.randn(T, num, z_dim, generator=g, device=device)


@torch.no_grad()
def sample_posterior(G: Callable, x_T: torch.Tensor, schedule, *, seed: int,
                     z: torch.Tensor, offset: int = 0, stride: int | None = None,
                     callback: Callable | None = None) -> SampleResult:
    """Posterior sampling (sec. 4) from x_T (N, ...) with generator G(x_i, z, i_float (N,)).

    z: (T, N, z_dim) latents, z[k] used at step i = T - k. Returns x_0 (model space, x_T's
    dtype) and nfe = number of G calls per sample (T). callback({'i', 'x', 'x0_pred'}) is called
    after each step. x_T is not modified.
    """
    plan = posterior_plan(schedule)
    T, N = len(plan), x_T.shape[0]
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[:2]) != (T, N):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z has shape {shape}; expected ({T}, {N}, z_dim) for T={T} steps and "
                         f"N={N} samples")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating tensor, got dtype {x_T.dtype}")
    stride = x_T.numel() if stride is None else stride
    seed_t = seed_tensor(seed, x_T.device)
    x = x_T.clone().contiguous()
    # Step-index inputs built before the loop: nothing in the loop allocates from host values.
    times = [torch.full((N,), float(s.i), device=x.device, dtype=torch.float32) for s in plan]
    nfe = 0
    for k, s in enumerate(plan):
        x0_pred = G(x, z[k], times[k]).to(x.dtype).contiguous()
        nfe += 1
        dispatch.ddgan_posterior_step_(x, x0_pred, s.c0, s.c1, s.sigma, seed_t,
                                       offset + k * stride)
        if callback is not None:
            callback({"i": s.i, "x": x, "x0_pred": x0_pred})
    return SampleResult(x, nfe)


def sample(model, name: str, steps: int, num: int, seed: int, device="cpu",
           batch: int | None = None, progress: bool = False, **opts) -> tuple[torch.Tensor, int]:
    """`num` samples in data space (float32) and the NFE per sample, from a DDGAN Model.

    x_T comes from torch.Generator(device).manual_seed(seed) for all `num` samples at once and z
    from draw_latents, so the samples do not depend on `batch` (the kernels' Philox noise does
    not either; the CPU twins' noise does).
    """
    batch = check_request("ddgan", name, SAMPLERS, num, batch, seed, opts)
    check_steps(steps)
    if steps != model.T:
        raise ValueError(f"this DDGAN checkpoint was trained with T={model.T}; --steps must be "
                         f"{model.T}, got {steps}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = torch.randn((num, *model.data_shape), generator=g, device=device)
    z = draw_latents(model.T, num, model.z_dim, seed, device)
    per = x_T[0].numel()
    outs, nfe = [], 0
    for s in batch_starts(num, batch, progress, f"ddgan {name}"):
        res = sample_posterior(model.denoise, x_T[s:s + batch], model.schedule, seed=seed,
                               z=z[:, s:s + batch], offset=s * per, stride=num * per)
        outs.append(model.to_data(res.x0))
        nfe = res.nfe
    return torch.cat(outs), nfe
