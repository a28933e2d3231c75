"""Adaptive probability-flow ODE solves (torchdiffeq dopri5) with an exact NFE count."""

from __future__ import annotations

from typing import Callable

import torch
from torchdiffeq import odeint

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
        return f(t.to(torch.float64), y)

    ts = torch.tensor([t0, t1], dtype=torch.float64, device=y0.device)
    ys = odeint(counted, y0, ts, rtol=rtol, atol=atol, method=method)
    return ys[-1], nfe
