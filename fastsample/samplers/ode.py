"""Adaptive probability-flow ODE solves (torchdiffeq dopri5) with an exact NFE count."""

from __future__ import annotations

from typing import Callable

import torch
from torchdiffeq import odeint

from fastsample.samplers import SamplingError

METHODS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")


def solve(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor,
          t0: float, t1: float, rtol: float = 1e-5, atol: float = 1e-5,
          method: str = "dopri5") -> tuple[torch.Tensor, int]:
    """Integrate dy/dt = f(t, y) from t0 to t1; returns (y(t1), number of f evaluations).

    f receives t as a 0-d float64 tensor; the count includes the solver's rejected steps and
    its initial step-size probe, i.e. every network call actually made."""
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {'|'.join(METHODS)}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    nfe = 0

    def counted(t, y):
        nonlocal nfe
        nfe += 1
        # A non-finite field makes the step-size control produce NaN times, which then fail
        # deep inside the SDE's scalar formulas; stop at the first bad evaluation instead. The
        # adaptive solver syncs on its error norm anyway, so this check costs no extra sync.
        if not bool(torch.isfinite(t)):
            raise SamplingError(f"the ODE solver reached a non-finite time after {nfe - 1} "
                                f"network calls: the network returned non-finite values")
        out = f(t.to(torch.float64), y)
        if not bool(torch.isfinite(out).all()):
            raise SamplingError(f"the ODE's drift is non-finite at t = {float(t):.6g} (network "
                                f"call {nfe}): the checkpoint may be broken")
        return out

    ts = torch.tensor([t0, t1], dtype=torch.float64, device=y0.device)
    ys = odeint(counted, y0, ts, rtol=rtol, atol=atol, method=method)
    return ys[-1], nfe
