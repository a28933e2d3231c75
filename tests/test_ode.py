"""The shared ODE solver: accuracy against a closed form, and the NFE count against a counter
kept outside the solver."""

import math

import pytest
import torch

from fastsample.samplers.ode import solve


def test_linear_ode_matches_closed_form_and_counts_every_call():
    calls = []
    lam = torch.tensor([-1.0, -3.0, 0.5], dtype=torch.float64)

    def f(t, y):
        calls.append(float(t))
        return lam * y * (1 + t)          # y(t) = y0 exp(lam (t + t^2/2))

    y0 = torch.ones(3, dtype=torch.float64)
    y1, nfe = solve(f, y0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    exact = torch.exp(lam * 1.5)
    assert torch.allclose(y1, exact, rtol=1e-7, atol=1e-9)
    assert nfe == len(calls) > 6


def test_tighter_tolerance_costs_more_evaluations():
    f = lambda t, y: -y * torch.cos(5 * t)    # noqa: E731
    y0 = torch.ones(4, dtype=torch.float64)
    _, loose = solve(f, y0, 0.0, 1.0, rtol=1e-3, atol=1e-3)
    y, tight = solve(f, y0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    assert tight > loose
    assert float(y[0]) == pytest.approx(math.exp(-math.sin(5.0) / 5), rel=1e-7)


def test_bad_arguments():
    y0 = torch.ones(2)
    with pytest.raises(ValueError, match="unknown ODE method"):
        solve(lambda t, y: y, y0, 0.0, 1.0, method="rk4x")
    with pytest.raises(ValueError, match="rtol and atol"):
        solve(lambda t, y: y, y0, 0.0, 1.0, rtol=0)
