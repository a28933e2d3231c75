"""Samplers, one module per family (ddgan, cld, lsgm, ddpm); ode.py is the shared adaptive solver.

Every sampler is a pure function

    sample_<name>(model, x_T, <schedule / steps>, *, seed, ...) -> SampleResult(x0, nfe)

- `x_T`: the initial noise, drawn by the caller (so "same seed, same samples" holds end to end);
- `seed`: the int that drives every later noise draw (in-kernel Philox through
  fastsample.kernels.dispatch: a one-element int64 tensor on the device + a per-step offset);
- `nfe`: network evaluations per sample, counted at the call sites, never computed from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def check_request(family: str, name: str, samplers, num: int, batch: int | None, seed: int,
                  opts: dict, allowed=()) -> int:
    """Validate the arguments every family's `sample()` shares, once, before any work; returns
    the batch size (all `num` at once when batch is None)."""
    if name not in samplers:
        raise ValueError(f"unknown sampler {name!r} for family {family}; "
                         f"choose {'|'.join(samplers)}")
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    batch = num if batch is None else batch
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    seed_tensor(seed, "cpu")
    bad = sorted(set(opts) - set(allowed))
    if bad:
        takes = f"takes options {list(allowed)}" if allowed else "takes no options"
        raise ValueError(f"sampler {name!r} of family {family} {takes}; unknown option(s) {bad}")
    return batch


def batch_starts(num: int, batch: int, progress: bool, desc: str):
    """Start index of each batch; with progress=True a tqdm bar over the batches (stderr)."""
    starts = range(0, num, batch)
    if not progress or len(starts) < 2:
        return starts
    from tqdm import tqdm
    return tqdm(starts, desc=desc, unit="batch", leave=False)
