"""DDPM / VP-SDE samplers against oracles: the exact score of a 2D Gaussian mixture (grid25), the
closed-form probability-flow map of a Gaussian, and the DDPM posterior of Ho et al. (Alg. 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastsample.data.toy2d import GaussianMixture, get_toy
from fastsample.metrics import mmd_rbf, sliced_wasserstein
from fastsample.samplers import ddpm as S
from fastsample.sde.vp import VPSDE, DDPMSchedule

N_SAMPLES = 2000


# Small per-step tensors: threads only add contention on the shared CPU (conftest's fixture).
# No one_thread here: no check compares across thread counts, and the Monte-Carlo runs (exact
# scores on 2k-120k points) are ~1.4-1.5x faster on 2 threads than on 1 (2 idle cores).


class ExactMixture:
    """A fake model with the sampler interface whose eps is exact: eps = -sigma_t * score_t."""

    def __init__(self, mixture: GaussianMixture, t_eps: float = 1e-3, N: int = 1000):
        self.mixture, self.sde, self.t_eps, self.N = mixture, VPSDE(), t_eps, N
        self.shape = (mixture.dim,)
        self.calls = 0

    def eps(self, x, t):
        self.calls += 1
        m, sigma = self.sde.marginal(t.double())
        return (-sigma[:, None] * self.mixture.vp_score(x.double(), m, sigma)).to(x.dtype)

    def to_data(self, x):
        return x.float()


@pytest.fixture(scope="module")
def grid():
    toy = get_toy("grid25")
    model = ExactMixture(toy.mixture)
    y = toy.sample(N_SAMPLES, torch.Generator().manual_seed(100))
    # Null distribution: the metrics between independent true samples of the same size.
    null = np.array([(mmd_rbf(r, y), sliced_wasserstein(r, y)) for r in
                     (toy.sample(N_SAMPLES, torch.Generator().manual_seed(200 + i)) for i in range(5))])
    tol = null.max(0) + 3 * null.std(0)
    return model, y, tol


def _metrics(x, y):
    return np.array([mmd_rbf(x, y), sliced_wasserstein(x, y)])


@pytest.mark.parametrize("name,steps,opts", [
    ("ancestral", 1000, {}),
    ("ddim", 100, {}),
    ("ddim", 100, {"schedule": "quadratic"}),
    ("em", 500, {}),
    ("ode", None, {"rtol": 1e-5, "atol": 1e-5}),
])
def test_exact_score_samples_match_mixture(grid, name, steps, opts):
    model, y, tol = grid
    x, nfe = S.sample(model, name, steps, N_SAMPLES, seed=1, **opts)
    assert x.shape == (N_SAMPLES, 2) and x.dtype == torch.float32
    got = _metrics(x, y)
    assert (got <= tol).all(), f"{name}: (mmd, swd) = {got}, null tolerance {tol}"
    if steps is not None:
        assert nfe == steps
    else:
        assert nfe > 10


def test_ddim_few_steps_measurably_worse(grid):
    model, y, tol = grid
    m3 = _metrics(S.sample(model, "ddim", 3, N_SAMPLES, seed=1)[0], y)
    m100 = _metrics(S.sample(model, "ddim", 100, N_SAMPLES, seed=1)[0], y)
    assert (m3 > tol).all() and (m3 > m100).all(), (m3, m100, tol)


def test_ode_nfe_grows_as_tolerance_tightens(grid):
    model = grid[0]
    nfes = [S.sample(model, "ode", None, 200, seed=0, rtol=tol, atol=tol)[1]
            for tol in (1e-2, 1e-4, 1e-6)]
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_nfe_is_counted_calls():
    model = ExactMixture(get_toy("diamond").mixture)
    for name, steps in (("ancestral", 37), ("ddim", 5), ("em", 11)):
        model.calls = 0
        _, nfe = S.sample(model, name, steps, 10, seed=0, batch=4)
        assert nfe == steps and model.calls == 3 * steps  # three batches of (4, 4, 2)
    model.calls = 0
    _, nfe = S.sample(model, "ode", None, 10, seed=0)
    assert nfe == model.calls


#-----------------------------------------------------------------------------------------------
# Pathwise oracle: Gaussian data N(mu, s^2 I) has the closed-form probability-flow map
# x_t = m_t mu + std_t (x_1 - m_1 mu) / std_1 with std_t^2 = m_t^2 s^2 + sigma_t^2.

def _gaussian(mu=(0.7, -0.4), s=0.3):
    mix = GaussianMixture(torch.tensor([mu], dtype=torch.float64), torch.tensor([s]), torch.ones(1))
    return ExactMixture(mix), torch.tensor(mu, dtype=torch.float64), s


def test_ode_follows_gaussian_flow_map():
    model, mu, s = _gaussian()
    sde = model.sde
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    out = S.sample_ode(model, x_T, rtol=1e-7, atol=1e-7)
    m1, sig1 = (float(v) for v in sde.marginal(1.0))
    me, sige = (float(v) for v in sde.marginal(model.t_eps))
    std1, stde = math.hypot(m1 * s, sig1), math.hypot(me * s, sige)
    want = me * mu + stde * (x_T.double() - m1 * mu) / std1
    torch.testing.assert_close(out.x0.double(), want, rtol=0, atol=1e-4)


def test_ddim_converges_to_gaussian_flow_map():
    model, mu, s = _gaussian()
    sched = DDPMSchedule(1000)
    ab = float(sched.alpha_bar[-1])
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    want = mu + s * (x_T.double() - math.sqrt(ab) * mu) / math.sqrt(ab * s * s + 1 - ab)
    errs = [(S.sample_ddim(model, x_T, k).x0.double() - want).abs().max().item() for k in (10, 100, 1000)]
    assert errs[2] < 2e-2 and errs[0] > errs[1] > errs[2], errs


def test_ancestral_matches_ddpm_posterior_coefficients():
    """Ho et al. Alg. 2: x_{i-1} = (x_i - beta_i / sqrt(1 - ab_i) eps) / sqrt(alpha_i) + sigma_i z,
    sigma_i^2 = beta_i (1 - ab_{i-1}) / (1 - ab_i); the last step has no noise."""
    model = ExactMixture(get_toy("diamond").mixture)
    plan = S.ddim_plan(model, 1000, "uniform", eta=1.0)
    sched = DDPMSchedule(1000)
    assert len(plan) == 1000
    for k, i in enumerate((1000, 500, 2, 1)):
        t, c_x, c_e, sigma = plan[1000 - i]
        a, b, ab, ab_prev = (float(v) for v in (sched.alpha[i], sched.beta[i],
                                                sched.alpha_bar[i], sched.alpha_bar[i - 1]))
        assert c_x == pytest.approx(1 / math.sqrt(a), rel=1e-12)
        assert c_e == pytest.approx(-b / math.sqrt(1 - ab) / math.sqrt(a), rel=1e-9)
        assert sigma == pytest.approx(math.sqrt(b * (1 - ab_prev) / (1 - ab)), rel=1e-9, abs=1e-12)
        # The net's time reproduces the discrete alpha_bar (except the clamped top end).
        if i < 1000:
            assert float(model.sde.mean_coeff(t)) ** 2 == pytest.approx(ab, rel=1e-9)
    assert plan[-1][3] == 0.0


def test_em_plan_is_euler_maruyama_of_reverse_sde():
    model = ExactMixture(get_toy("diamond").mixture)
    plan = S.em_plan(model, 4)
    h = (1 - model.t_eps) / 4
    for k, (t, c_x, c_e, noise) in enumerate(plan):
        assert t == pytest.approx(1 - k * h)
        beta, sigma = float(model.sde.beta(t)), float(model.sde.std(t))
        # x + h (beta x / 2 + beta score) + sqrt(beta h) z with score = -eps / sigma
        assert (c_x, c_e) == (pytest.approx(1 + beta * h / 2), pytest.approx(-beta * h / sigma))
        assert noise == (0.0 if k == 3 else pytest.approx(math.sqrt(beta * h)))


def test_subsequences():
    for steps in (1, 3, 7, 100, 1000):
        for sch in S.SCHEDULES:
            idx = S.subsequence(1000, steps, sch)
            assert idx[0] == 0 and idx[-1] == 1000 and len(idx) == steps + 1
            assert all(b > a for a, b in zip(idx, idx[1:]))
    q, u = S.subsequence(1000, 10, "quadratic"), S.subsequence(1000, 10, "uniform")
    assert q[1] < u[1] and q[-1] - q[-2] > u[-1] - u[-2]  # quadratic: dense near the data


#-----------------------------------------------------------------------------------------------
# Seeds, batching, bad inputs.

@pytest.mark.parametrize("name", ["ancestral", "em", "ddim"])
def test_seeds(name):
    model = ExactMixture(get_toy("diamond").mixture)
    a = S.sample(model, name, 20, 50, seed=3)[0]
    b = S.sample(model, name, 20, 50, seed=3)[0]
    c = S.sample(model, name, 20, 50, seed=4)[0]
    assert torch.equal(a, b)
    assert (a - c).abs().min() > 0


def test_deterministic_sampler_independent_of_batch():
    model = ExactMixture(get_toy("diamond").mixture)
    a = S.sample(model, "ddim", 10, 50, seed=3)[0]
    b = S.sample(model, "ddim", 10, 50, seed=3, batch=7)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_inputs():
    model = ExactMixture(get_toy("diamond").mixture)
    with pytest.raises(ValueError, match="unknown sampler 'foo' for family ddpm; choose ancestral|ddim|em|ode"):
        S.sample(model, "foo", 10, 4, seed=0)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an int"):
            S.sample(model, "ddim", steps, 4, seed=0)
    with pytest.raises(ValueError, match="steps must be an int"):
        S.sample_ancestral(model, torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="steps=1001 exceeds the 1000-step"):
        S.sample(model, "ddim", 1001, 4, seed=0)
    with pytest.raises(ValueError, match="unknown schedule 'cubic'"):
        S.sample(model, "ddim", 10, 4, seed=0, schedule="cubic")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rtol'\]"):
        S.sample(model, "em", 10, 4, seed=0, rtol=1e-3)
    with pytest.raises(ValueError, match="num must be an int"):
        S.sample(model, "em", 10, 0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        S.sample(model, "em", 10, 4, seed=-1)
    with pytest.raises(ValueError, match=r"x_T has shape \(4, 3\); expected \(B, 2\)"):
        S.sample_em(model, torch.zeros(4, 3), 5)


def test_ancestral_more_steps_than_schedule():
    model = ExactMixture(get_toy("diamond").mixture)
    x, nfe = S.sample(model, "ancestral", 1200, 8, seed=0)
    assert nfe == 1200 and torch.isfinite(x).all()
