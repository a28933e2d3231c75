"""Samplers: the plan and its one loop (plan.py), the one `sample()` driver (below), the shared
adaptive solver (ode.py), and per family (ddgan, cld, lsgm, ddpm) the math that builds its plans,
its prior and its adaptive samplers, declared as one `Sampling` object (`SAMPLING` in each module).

Samplers never import fastsample.models: they run on any object with the documented methods, so
a trained Model and a test's exact-score oracle run the same code. The per-sampler functions are
thin views of the plan loop:

    sample_<name>(model, x_T, <schedule / steps>, *, seed, ...) -> SampleResult(x0, nfe)

- `x_T`: the initial noise, drawn by the caller (so "same seed, same samples" holds end to end);
- `seed`: the int that drives every later noise draw (in-kernel Philox through
  fastsample.kernels.dispatch: a one-element int64 tensor on the device + a per-step offset);
- `nfe`: network evaluations per sample, counted at the call sites, never computed from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SampleResult:
    x0: torch.Tensor        # samples in the model's space (the family maps them to data space)
    nfe: int                # network evaluations per sample, counted


def seed_tensor(seed: int, device) -> torch.Tensor:
    """The kernels read their Philox seed from device memory (graph-replayable)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_steps(steps: int, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{name} must be an int >= 1, got {steps!r}")
    return steps


class MissingExtra(ImportError):
    """A sampler whose optional dependency is not installed; the message names the extra."""


class SamplingError(ValueError):
    """A sampling run that produced no usable samples (non-finite output): one clear line."""


# Bounds that keep an absurd request from exhausting memory or time before it fails.
MAX_NUM = 1_000_000
MAX_STEPS = 100_000


@dataclass(frozen=True)
class Sampler:
    """One named sampler of a family.

    steps: the default step budget (None: adaptive; a DDGAN's is its trained T, see Sampling);
    options: the keyword options it accepts; plan: True when it is a fixed plan (run by
    plan.run), False when Sampling.adaptive runs it: an adaptive solve (steps None) or a
    fixed-step sampler outside the plan loop (steps not None; it is passed `steps`), such as a
    peer library's scheduler; needs: called on validation, raises ImportError when an optional
    dependency the sampler runs on is missing."""
    name: str
    steps: int | None
    options: tuple = ()
    plan: bool = True
    needs: Callable | None = None


@dataclass(frozen=True)
class Sampling:
    """What the driver needs from a family (each samplers/<family>.py defines one).

    prior(model, num, seed, device) -> tuple of tensors, batch on axis 0 (the initial state and
        any per-sample inputs such as DDGAN's latents), drawn once for all `num` samples;
    plan(model, sampler, steps, **opts) -> plan.Table (fixed samplers);
    bind(model, parts) -> (state, net): the loop's state tensors (x,) or (x, v), fresh copies,
        and the network callable plan.run calls;
    adaptive(model, sampler, parts, **opts) -> SampleResult (adaptive samplers);
    finish(model, x, **opts) -> data-space samples (to_data, a decoder first for latent models);
    default_steps(model, sampler) -> int | None: the default budget for this model."""
    family: str
    samplers: dict
    prior: Callable
    plan: Callable
    bind: Callable
    adaptive: Callable
    finish: Callable
    finish_options: tuple = ()
    model_steps: Callable | None = None
    prior_scales: Callable | None = None

    def scales(self, model, n: int) -> tuple:
        """Per prior tensor, the std its N(0, 1) draw is scaled by (the Engine's Philox fill)."""
        return tuple(self.prior_scales(model)) if self.prior_scales else (1.0,) * n

    def sampler(self, name: str) -> Sampler:
        if name not in self.samplers:
            raise ValueError(f"unknown sampler {name!r} for family {self.family}; "
                             f"choose {'|'.join(self.samplers)}")
        return self.samplers[name]

    def default_steps(self, model, name: str) -> int | None:
        if self.model_steps is not None:
            return self.model_steps(model, name)
        return self.sampler(name).steps


#-----------------------------------------------------------------------------------------------
# Building blocks for a family whose state is one tensor x ~ N(0, I) and whose network is an
# eps(x, t) (DDPM in pixels, LSGM in its latent space).

def eps_net(eps: Callable) -> Callable:
    """An eps(x, t) network as the loop's net(x, t, k)."""
    return lambda x, t, k: eps(x, t)


def normal_prior(shape_of: Callable) -> Callable:
    """prior(model, num, seed, device): (x_T,) ~ N(0, I) of shape (num, *shape_of(model)),
    drawn from torch.Generator(device).manual_seed(seed)."""
    def prior(model, num: int, seed: int, device):
        g = torch.Generator(device).manual_seed(seed)
        return (torch.randn((num,) + tuple(shape_of(model)), generator=g, device=device),)
    return prior


def bind_eps(model, parts):
    """bind for a one-tensor state and the model's eps network."""
    return (parts[0].clone(),), eps_net(model.eps)


def adaptive_samplers(family: str, **fns: Callable) -> Callable:
    """adaptive(model, name, parts, **opts) dispatching to fns[name](model, *parts, **opts)."""
    def adaptive(model, name: str, parts, **opts) -> SampleResult:
        if name not in fns:
            raise ValueError(f"{family} sampler {name!r} is not adaptive")
        return fns[name](model, *parts, **opts)
    return adaptive


def _check_int(name: str, v, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def sample(sampling: Sampling, model, name: str, steps: int | None, num: int, seed: int,
           device="cpu", batch: int | None = None, progress: bool = False,
           **opts) -> tuple[torch.Tensor, int | float]:
    """`num` samples in data space (float32) and the network evaluations per sample.

    The one driver for every family: validates everything before any work; draws the prior for
    all `num` samples at once from `seed` (so sample j does not depend on `batch`); builds a
    fixed sampler's plan once and runs it on each batch of `batch` samples (default: all) with
    Philox offset = the batch's first element and stride = all samples' numel; maps to data
    space; refuses a non-finite result. steps None: the sampler's default (ignored by adaptive
    samplers, whose NFE is the solver's). NFE: the per-sample mean over batches (an int when it
    is one; adaptive batches may differ)."""
    spec = sampling.sampler(name)
    _check_int("num", num, 1, MAX_NUM)
    batch = num if batch is None else batch
    _check_int("batch", batch, 1, MAX_NUM)
    seed_tensor(seed, "cpu")
    allowed = spec.options + sampling.finish_options
    bad = sorted(set(opts) - set(allowed))
    if bad:
        takes = f"takes options {list(allowed)}" if allowed else "takes no options"
        raise ValueError(f"sampler {name!r} of family {sampling.family} {takes}; "
                         f"unknown option(s) {bad}")
    if spec.needs is not None:
        spec.needs()
    fin = {k: v for k, v in opts.items() if k in sampling.finish_options}
    run_opts = {k: v for k, v in opts.items() if k not in sampling.finish_options}
    if steps is None:
        steps = sampling.default_steps(model, name)
    if steps is not None:
        _check_int("steps", steps, 1, MAX_STEPS)
    from fastsample.samplers import plan as plans
    table = sampling.plan(model, name, steps, **run_opts) if spec.plan else None
    device = torch.device(device)
    prior = sampling.prior(model, num, seed, device)
    per = prior[0][0].numel()
    seed_t = seed_tensor(seed, device)
    outs, nfe_sum = [], 0
    for s in batch_starts(num, batch, progress, f"{sampling.family} {name}"):
        parts = tuple(p[s:s + batch] for p in prior)
        if table is not None:
            state, net = sampling.bind(model, parts)
            nfe = plans.run(table, net, *state, seed=seed_t, offset=s * per, stride=num * per)
            x0 = state[0]
        else:
            stepped = {"steps": steps} if spec.steps is not None else {}
            res = sampling.adaptive(model, name, parts, **stepped, **run_opts)
            x0, nfe = res.x0, res.nfe
        # Checked in model space: a data-space map may clamp an inf into range.
        if not bool(torch.isfinite(x0).all()):
            raise SamplingError(f"{sampling.family} sampler {name!r} produced non-finite "
                                f"samples (steps={steps}, seed={seed}); the checkpoint may be "
                                f"broken")
        with torch.no_grad():
            outs.append(sampling.finish(model, x0, **fin))
        nfe_sum += nfe * parts[0].shape[0]
    samples = torch.cat(outs).float()
    mean = nfe_sum / num
    return samples, int(mean) if mean == int(mean) else mean


def batch_starts(num: int, batch: int, progress: bool, desc: str):
    """Start index of each batch; with progress=True a tqdm bar over the batches (stderr)."""
    starts = range(0, num, batch)
    if not progress or len(starts) < 2:
        return starts
    from tqdm import tqdm
    return tqdm(starts, desc=desc, unit="batch", leave=False)
