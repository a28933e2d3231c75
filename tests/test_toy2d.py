"""Gaussian-mixture densities/scores and the 2-D toys (fastsample.data.toy2d).

Oracles: autograd of the log densities, central finite differences, Monte Carlo of the
forward processes (x0 from the mixture, then the exact kernel), torch's MultivariateNormal,
brute-force Bayes on a 1-D grid, and sklearn's own swiss-roll sampler.
"""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll

from fastsample.data.toy2d import GaussianMixture, get_toy
from fastsample.sde.cld import CLD, CLDConfig
from fastsample.sde.vp import ddgan_schedule

F64 = torch.float64


def _mix2d():
    means = torch.tensor([[-1.0, 0.5], [0.8, 0.2], [0.1, -1.1]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.2, 0.35, 0.1], dtype=F64), torch.tensor([0.5, 0.3, 0.2]))


def _points(n=17, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.2


def _autograd(f, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


def test_mixture_score_vs_autograd_and_normalisation():
    mix = _mix2d()
    x = _points()
    assert torch.allclose(mix.score(x), _autograd(mix.log_prob, x), rtol=1e-10, atol=1e-12)
    # the density integrates to one (Riemann sum on a fine grid that covers all mass)
    g = torch.linspace(-3, 3, 601, dtype=F64)
    xy = torch.cartesian_prod(g, g)
    mass = float(mix.log_prob(xy).exp().sum()) * float(g[1] - g[0]) ** 2
    assert abs(mass - 1) < 1e-6
    assert mix.score(x.float()).dtype == torch.float32


def test_vp_score_limits_and_autograd():
    mix = _mix2d()
    x = _points()
    assert torch.allclose(mix.vp_score(x, 1.0, 0.0), mix.score(x), rtol=1e-13, atol=1e-13)
    assert torch.allclose(mix.vp_score(x, 1.0, 1e-7), mix.score(x), rtol=1e-9, atol=1e-9)
    m = torch.linspace(0.2, 0.9, 17, dtype=F64)
    s = torch.sqrt(1 - m ** 2)
    assert torch.allclose(mix.vp_score(x, m, s), _autograd(lambda z: mix.vp_log_prob(z, m, s), x),
                          rtol=1e-10, atol=1e-12)
    # m -> 0, s = 1: the standard normal
    assert torch.allclose(mix.vp_score(x, 0.0, 1.0), -x, rtol=1e-13, atol=1e-13)


def test_vp_marginal_vs_monte_carlo():
    mix = _mix2d()
    g = torch.Generator().manual_seed(5)
    n, m, s = 200000, 0.6, 0.8
    xt = m * mix.sample(n, g).double() + s * torch.randn(n, 2, generator=g, dtype=F64)
    # E[f(x_t)] for f = indicator of a box, vs the integral of the exact density over the box
    inside = ((xt[:, 0] > -0.5) & (xt[:, 0] < 0.3) & (xt[:, 1] > -0.2) & (xt[:, 1] < 0.9)).double().mean()
    gx, gy = torch.linspace(-0.5, 0.3, 161, dtype=F64), torch.linspace(-0.2, 0.9, 221, dtype=F64)
    dens = mix.vp_log_prob(torch.cartesian_prod(gx, gy), m, s).exp().reshape(161, 221)
    integral = float(torch.trapezoid(torch.trapezoid(dens, gy, dim=1), gx))
    p = float(inside)
    assert abs(p - integral) < 5 * math.sqrt(p * (1 - p) / n)


def test_cld_score_v_vs_autograd_and_finite_differences():
    mix = _mix2d()
    cld = CLD()
    x, v = _points(9, 1), _points(9, 2) * 0.5
    for t in (1e-4, 0.05, 0.3, 1.0):
        sv = mix.cld_score_v(x, v, t, cld)
        assert torch.allclose(sv, _autograd(lambda z: mix.cld_log_prob(x, z, t, cld), v), rtol=1e-9, atol=1e-9)
        h = 1e-6
        fd = torch.stack([(mix.cld_log_prob(x, v + h * e, t, cld) - mix.cld_log_prob(x, v - h * e, t, cld)) / (2 * h)
                          for e in torch.eye(2, dtype=F64)], dim=1)
        assert torch.allclose(sv, fd, rtol=1e-5, atol=1e-5 * float(sv.abs().max()))
    # per-sample t
    t = torch.linspace(0.01, 0.9, 9, dtype=F64)
    rows = torch.cat([mix.cld_score_v(x[i:i + 1], v[i:i + 1], float(t[i]), cld) for i in range(9)])
    assert torch.allclose(mix.cld_score_v(x, v, t, cld), rows, rtol=1e-13, atol=1e-13)


def test_cld_single_component_is_the_closed_form_gaussian():
    mu, std = torch.tensor([[0.6, -0.3]], dtype=F64), 0.25
    mix = GaussianMixture(mu, torch.tensor([std]), torch.ones(1))
    cld = CLD(CLDConfig(numerical_eps=0.0))
    t = 0.15
    Phi_xx, _, Phi_vx, _ = (float(z) for z in cld.Phi(cld.B(t)))
    Sxx, Sxv, Svv = (float(z) for z in cld.covariance(t, std ** 2, None, eps=0.0))
    # (a) the density is the 2x2-per-dimension Gaussian with the closed-form moments
    mvn = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64),
                                                 torch.tensor([[Sxx, Sxv], [Sxv, Svv]], dtype=F64))
    x, v = _points(7, 3) * 0.5, _points(7, 4) * 0.5
    want = sum(mvn.log_prob(torch.stack([x[:, d] - Phi_xx * mu[0, d], v[:, d] - Phi_vx * mu[0, d]], 1))
               for d in range(2))
    assert torch.allclose(mix.cld_log_prob(x, v, t, cld), want, rtol=1e-12, atol=1e-12)
    # (b) and those moments are what x0 ~ mixture, then the HSM kernel, produces (Monte Carlo)
    g = torch.Generator().manual_seed(6)
    n = 100000
    x0 = mix.sample(n, g).double()
    xt, vt = cld.perturb(x0, t, torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64))
    for d in range(2):
        cov = torch.cov(torch.stack([xt[:, d], vt[:, d]]))
        assert abs(float(xt[:, d].mean()) - Phi_xx * float(mu[0, d])) < 5 * math.sqrt(Sxx / n)
        assert abs(float(vt[:, d].mean()) - Phi_vx * float(mu[0, d])) < 5 * math.sqrt(Svv / n)
        assert abs(float(cov[0, 0]) / Sxx - 1) < 5 * math.sqrt(2 / n)
        assert abs(float(cov[1, 1]) / Svv - 1) < 5 * math.sqrt(2 / n)
        assert abs(float(cov[0, 1]) - Sxv) < 5 * math.sqrt((Sxx * Svv + Sxv ** 2) / n)


def _log_normal(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


@pytest.mark.parametrize("i", [1, 2, 3, 4])
def test_ddgan_denoising_posterior_vs_grid_bayes(i):
    mix = GaussianMixture(torch.tensor([[-1.0], [0.3], [1.2]]), torch.tensor([0.08, 0.15, 0.05]),
                          torch.tensor([0.3, 0.5, 0.2]))
    sch = ddgan_schedule(4)
    ab_prev, alpha, beta = float(sch.alpha_bar[i - 1]), float(sch.alpha[i]), float(sch.beta[i])
    grid = torch.linspace(-8, 8, 16001, dtype=F64)[:, None]
    dx = float(grid[1] - grid[0])
    for xi in (-0.9, 0.1, 0.75):
        post = mix.ddgan_denoising_posterior(torch.tensor([xi], dtype=F64), i, sch)
        dens = post.log_prob(grid).exp()
        assert abs(float(dens.sum()) * dx - 1) < 1e-6
        # brute force: prior q(x_{i-1}) (the data pushed through the VP kernel) times q(x_i | x_{i-1})
        log_prior = mix.vp_log_prob(grid, math.sqrt(ab_prev), math.sqrt(1 - ab_prev))
        log_joint = log_prior + _log_normal(xi, math.sqrt(alpha) * grid[:, 0], beta)
        brute = (log_joint - torch.logsumexp(log_joint, 0)).exp() / dx
        assert float((dens - brute).abs().max()) < 1e-5 * float(brute.max())


def test_ddgan_posterior_is_multimodal_at_T4():
    # the point of DDGAN (ddgan.md sec. 1): with 4 steps the true denoiser has several modes
    mix = get_toy("grid25").mixture
    sch = ddgan_schedule(4)
    # x_1 halfway between four grid modes (spacing 0.707), seen through sqrt(alpha_bar_1) ~ 0.72
    x1 = math.sqrt(float(sch.alpha_bar[1])) * torch.tensor([0.354, 0.354], dtype=F64)
    post = mix.ddgan_denoising_posterior(x1, 1, sch)
    big = post.weights > 0.05
    assert int(big.sum()) >= 4
    # separated modes: the heavy components' means are many posterior stds apart
    d = torch.cdist(post.means[big], post.means[big])
    assert float(d[d > 0].min()) > 10 * float(post.stds[big].max())


def test_toys_sample_shapes_and_scales():
    g = torch.Generator().manual_seed(7)
    for name in ("grid25", "swissroll", "cld_multimodal_swissroll", "diamond"):
        toy = get_toy(name)
        x = toy.sample(4000, g)
        assert x.shape == (4000, 2) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
        assert float(x.abs().max()) < 5.0, name  # order-1 data, as VP and CLD assume
    grid = get_toy("grid25")
    x = grid.sample(100000, g).double()
    assert torch.allclose(x.var(0), torch.ones(2, dtype=F64), atol=0.02)
    assert grid.mixture.num_components == 25
    dia = get_toy("diamond").mixture
    r = dia.means.norm(dim=1).sort().values
    assert torch.allclose(r, torch.tensor([0.0] + [0.5] * 4 + [math.sqrt(0.5)] * 4, dtype=F64), atol=1e-12)
    # rotated 45 degrees: the side neighbours of the centre sit on the diagonals
    side = dia.means[(dia.means.norm(dim=1) - 0.5).abs() < 1e-9]
    assert torch.allclose(side[:, 0].abs(), side[:, 1].abs(), atol=1e-12)
    assert get_toy("swissroll").mixture is None


def test_swissroll_matches_sklearn_sampler():
    n = 60000
    ours = get_toy("swissroll").sample(n, torch.Generator().manual_seed(8)).double().numpy()
    ref = make_swiss_roll(n, noise=1.0, random_state=0)[0][:, [0, 2]] / 5
    # compare a few moments and the radial quantiles (the roll's shape), statistically
    for f in (lambda z: z.mean(0), lambda z: np.cov(z.T).ravel(),
              lambda z: np.quantile(np.linalg.norm(z, axis=1), [0.1, 0.5, 0.9])):
        a, b = f(ours), f(ref)
        assert np.allclose(a, b, atol=0.05, rtol=0.02), (a, b)


def test_multimodal_swissroll_modes():
    x = get_toy("cld_multimodal_swissroll").sample(50000, torch.Generator().manual_seed(9)).double()
    centres = torch.tensor([[0.0, 0.0], [0.8, 0.8], [0.8, -0.8], [-0.8, -0.8], [-0.8, 0.8]], dtype=F64)
    k = torch.cdist(x, centres).argmin(1)
    frac = torch.bincount(k, minlength=5).double() / x.shape[0]
    assert torch.allclose(frac, torch.full((5,), 0.2, dtype=F64), atol=5 * math.sqrt(0.16 / 50000))
    assert float(torch.cdist(x, centres).min(1).values.max()) < 0.2  # each roll has radius ~0.15


def test_mixture_sample_moments():
    mix = _mix2d()
    x = mix.sample(100000, torch.Generator().manual_seed(10)).double()
    mean = (mix.weights[:, None] * mix.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match="stds: expected shape"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="stds: must be > 0"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="means: contains NaN"):
        GaussianMixture(torch.full((2, 2), float("nan")), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([-1.0, 2.0]))
    mix = _mix2d()
    with pytest.raises(ValueError, match=r"x: expected a tensor of shape \(n, 2\)"):
        mix.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x: contains NaN"):
        mix.score(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="m: expected a scalar or shape"):
        mix.vp_score(torch.zeros(4, 2), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="i: expected an int in"):
        mix.ddgan_denoising_posterior(torch.zeros(2), 5, ddgan_schedule(4))
    with pytest.raises(ValueError, match="toy name: unknown 'moons'"):
        get_toy("moons")
    with pytest.raises(ValueError, match="n: expected an int"):
        get_toy("grid25").sample(-3)
