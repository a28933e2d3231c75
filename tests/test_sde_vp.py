"""VP-SDEs and discrete schedules (fastsample.sde.vp) against independent oracles.

Oracles: Monte Carlo of the forward SDE (Euler–Maruyama, statistical tolerances), scipy quadrature
of beta, mpmath derivatives, ddgan.md's formula for log m(t), and Bayes' rule written with
precisions for the DDGAN/DDPM posteriors.
"""

import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import torch

from fastsample.sde.vp import DDGANSchedule, DDPMSchedule, GeometricVPSDE, VPSDE, ddgan_schedule

F64 = torch.float64


def _euler_forward(sde, x, t0, t1, steps, g):
    """dx = -beta/2 x dt + sqrt(beta) dW with the rate at each step's midpoint."""
    dt = (t1 - t0) / steps
    for k in range(steps):
        beta = float(sde.beta(t0 + (k + 0.5) * dt))
        x = x - 0.5 * beta * x * dt + math.sqrt(beta * dt) * torch.randn(x.shape, generator=g, dtype=F64)
    return x


def _check_moments(x, mean, var, bias_rel):
    n = x.numel()
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n) + bias_rel * math.sqrt(var)
    assert abs(float(x.var()) / var - 1) < 5 * math.sqrt(2 / n) + bias_rel


def test_vp_marginals_vs_monte_carlo():
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    n, x0 = 20000, 1.5
    x = torch.full((n,), x0, dtype=F64)
    t_prev = 0.0
    for t in (0.1, 0.4, 1.0):
        # beta_max dt <= 0.02 per step: the EM bias in the variance stays under ~1%.
        x = _euler_forward(sde, x, t_prev, t, int(round((t - t_prev) * 1000)), g)
        t_prev = t
        m, s = (float(z) for z in sde.marginal(t))
        _check_moments(x, m * x0, s * s, 0.02)


def test_geometric_vp_marginals_vs_monte_carlo():
    # Start from the process's own law at t = 0 (variance sigma2_min around m_0 x0) and check
    # that beta(t) moves it onto (m_t, sigma_t). Beyond t ~ 0.9 beta explodes (~1e4 at t = 1)
    # and plain EM would need ~1e6 steps, so the check stops at 0.9.
    sde = GeometricVPSDE()
    g = torch.Generator().manual_seed(1)
    n, z0 = 20000, -0.8
    m0, s0 = (float(z) for z in sde.marginal(0.0))
    x = m0 * z0 + s0 * torch.randn(n, generator=g, dtype=F64)
    t_prev = 0.0
    for t in (0.6, 0.9):
        x = _euler_forward(sde, x, t_prev, t, int(round((t - t_prev) * 1500)), g)
        t_prev = t
        m, s = (float(z) for z in sde.marginal(t))
        # x0 = z0 / ... : the mean is m_t/m_0 times the t=0 mean
        _check_moments(x, m * z0, s * s, 0.02)


def test_int_beta_vs_quadrature():
    sde = VPSDE(0.1, 20.0)
    geo = GeometricVPSDE()
    for t in (1e-4, 0.3, 0.77, 1.0):
        q, _ = scipy.integrate.quad(lambda s: float(sde.beta(s)), 0, t, epsabs=0, epsrel=1e-13)
        assert abs(float(sde.int_beta(t)) - q) < 1e-12 * q
        q, _ = scipy.integrate.quad(lambda s: float(geo.beta(s)), 0, t, epsabs=0, epsrel=1e-12)
        assert abs(float(geo.int_beta(t) - geo.int_beta(0.0)) - q) < 1e-10 * q


def test_ddgan_doc_mean_formula_and_stable_std():
    sde = VPSDE()
    for t in (1e-9, 1e-3, 0.25, 1.0):
        log_m = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1  # ddgan.md sec. 1
        assert abs(float(sde.log_mean_coeff(t)) - log_m) < 1e-15 * max(1.0, abs(log_m))
        with mpmath.workdps(40):
            s_ref = float(mpmath.sqrt(1 - mpmath.exp(2 * mpmath.mpf(log_m))))
        assert abs(float(sde.std(t)) / s_ref - 1) < 1e-14


def test_geometric_beta_vs_finite_differences():
    geo = GeometricVPSDE()
    with mpmath.workdps(40):
        smin, smax = mpmath.mpf(geo.sigma2_min), mpmath.mpf(geo.sigma2_max)
        f = lambda t: -mpmath.log(1 - smin * (smax / smin) ** t)  # noqa: E731
        for t in (0.0, 0.2, 0.5, 0.9, 0.999):
            ref = float(mpmath.diff(f, t))
            assert abs(float(geo.beta(t)) / ref - 1) < 1e-12
            assert abs(float(geo.std(t)) ** 2 / float(smin * (smax / smin) ** t) - 1) < 1e-14
    assert abs(float(geo.std(1.0)) ** 2 - 0.999) < 1e-15


@pytest.mark.parametrize("sde", [VPSDE(), GeometricVPSDE()], ids=["vp", "geometric"])
def test_ode_drift_transports_gaussian_quantiles(sde):
    """For N(0, s0^2) data the flow keeps x / sqrt(v(t)) fixed, v = m^2 s0^2 + sigma^2; compare the
    drift with a finite difference of that curve (marginals only, no drift code)."""
    s0, z = 0.3, torch.tensor([-1.2, 0.4, 2.0], dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)

    def x_of(tt):
        m, s = sde.marginal(tt)
        return z * torch.sqrt(m * m * s0 * s0 + s * s)
    h = 1e-6
    dx_dtau = -(x_of(t + h) - x_of(t - h)) / (2 * h)
    m, s = sde.marginal(t)
    score = -x_of(t) / (m * m * s0 * s0 + s * s)
    assert torch.allclose(sde.ode_drift(x_of(t), t, score), dx_dtau, rtol=1e-6, atol=1e-9)
    # reverse SDE drift = ODE drift + g^2 score / 2; the N(0, I) score -x gives ODE drift 0.
    x = torch.randn(3, 4, dtype=F64)
    assert torch.allclose(sde.ode_drift(x, t, -x), torch.zeros_like(x), atol=1e-15)
    assert torch.allclose(sde.reverse_drift(x, t, score[:, None] * x),
                          sde.ode_drift(x, t, score[:, None] * x)
                          + 0.5 * sde.beta(t)[:, None] * score[:, None] * x, rtol=1e-14)
    assert torch.allclose(sde.drift(x, 0.3), -0.5 * sde.beta(0.3) * x)
    assert sde.drift(x.float(), t).dtype == torch.float32


def _bayes_posterior(ab_prev, alpha, beta):
    """Posterior of x_{i-1} given x_i, x0 from N(sqrt(ab_prev) x0, 1 - ab_prev) x N(x_i; sqrt(alpha) x_{i-1}, beta),
    by precisions; returns (c0, c1, var)."""
    if ab_prev == 1.0:  # x_{i-1} = x0 exactly
        return 1.0, 0.0, 0.0
    prec = 1 / (1 - ab_prev) + alpha / beta
    return math.sqrt(ab_prev) / (1 - ab_prev) / prec, math.sqrt(alpha) / beta / prec, 1 / prec


@pytest.mark.parametrize("t_power", [1.0, 1.5])
@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_ddgan_posterior_vs_bayes(T, t_power):
    sch = ddgan_schedule(T, t_power=t_power)
    assert sch.num_steps == T and len(sch.t) == T + 1
    assert math.isnan(sch.alpha[0]) and math.isnan(sch.c0[0])
    # alpha_bar is the product of the per-step alphas, and proportional to ddgan.md's 1 - sigma^2(t_i)
    assert torch.allclose(sch.alpha_bar[1:], torch.cumprod(sch.alpha[1:], 0), rtol=1e-14, atol=0)
    # 1 - sigma^2(t) = exp(2 log m(t)) with ddgan.md's log m (not 1 - sigma^2, which cancels)
    doc = torch.exp(2 * (-0.25 * sch.t ** 2 * (20.0 - 0.1) - 0.5 * sch.t * 0.1))
    assert torch.allclose(sch.alpha_bar, doc / doc[0], rtol=1e-13, atol=0)
    u = torch.arange(T + 1, dtype=F64) / T
    assert torch.allclose(sch.t, 1e-3 + (1 - 1e-3) * u ** t_power, rtol=0, atol=1e-16)
    # The warp moves every inner level towards the data (less noise) and keeps both ends.
    if t_power > 1 and T > 1:
        flat = ddgan_schedule(T)
        assert (sch.alpha_bar[1:T] > flat.alpha_bar[1:T]).all()
        assert sch.alpha_bar[T] == flat.alpha_bar[T]
    for i in range(1, T + 1):
        c0, c1, var = _bayes_posterior(float(sch.alpha_bar[i - 1]), float(sch.alpha[i]), float(sch.beta[i]))
        assert abs(float(sch.c0[i]) - c0) < 1e-13 and abs(float(sch.c1[i]) - c1) < 1e-13
        assert abs(float(sch.sigma2_post[i]) - var) < 1e-13 * max(var, 1e-300) + 1e-300
        assert float(sch.log_sigma2_post[i]) == pytest.approx(math.log(max(var, 1e-20)), rel=1e-12)


def test_ddgan_helpers_sample_the_right_laws():
    sch = DDGANSchedule(T=4)
    g = torch.Generator().manual_seed(2)
    n, x0v = 40000, 0.9
    x0 = torch.full((n, 2), x0v)
    for i in (1, 2, 4):
        xi = sch.q_sample(x0, i, torch.randn(n, 2, generator=g))
        ab = float(sch.alpha_bar[i])
        _check_moments(xi.double(), math.sqrt(ab) * x0v, 1 - ab, 0.0)
        prev = sch.posterior_sample(x0, xi, i, torch.randn(n, 2, generator=g))
        ab_prev = float(sch.alpha_bar[i - 1])
        if i == 1:  # the last denoising step returns the mean, which is x0 itself
            assert torch.allclose(prev, x0, atol=1e-6)
        else:  # marginalising x_i must give back q(x_{i-1} | x0)
            _check_moments(prev.double(), math.sqrt(ab_prev) * x0v, 1 - ab_prev, 0.0)
            step = sch.q_step(prev, i, torch.randn(n, 2, generator=g))
            _check_moments(step.double(), math.sqrt(ab) * x0v, 1 - ab, 0.0)
    # per-sample step indices
    idx = torch.tensor([1, 2, 3, 4] * (n // 4))
    xi = sch.q_sample(x0, idx, torch.zeros(n, 2))
    assert torch.allclose(xi[:4, 0].double(), torch.sqrt(sch.alpha_bar[1:]) * x0v, rtol=1e-6)


def test_ddpm_schedule():
    sch = DDPMSchedule(1000)
    assert float(sch.beta[1]) == pytest.approx(1e-4, rel=1e-12)
    assert float(sch.beta[1000]) == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(sch.alpha_bar[1:], torch.cumprod(1 - sch.beta[1:], 0), rtol=1e-14, atol=0)
    # the same VP-SDE: sum_i beta_i = B(1) exactly (beta linear), and
    # log alpha_bar_N = -sum beta - sum beta^2/2 - R with 0 < R < sum beta^3 (all beta_i <= 0.02)
    B1 = float(VPSDE().int_beta(1.0))
    b = sch.beta[1:]
    assert abs(float(b.sum()) - B1) < 1e-12
    R = -math.log(float(sch.alpha_bar[-1])) - B1 - float((b ** 2).sum()) / 2
    assert 0 < R < float((b ** 3).sum())
    for i in (1, 2, 500, 1000):
        c0, c1, var = _bayes_posterior(float(sch.alpha_bar[i - 1]), float(sch.alpha[i]), float(sch.beta[i]))
        assert abs(float(sch.c0[i]) - c0) < 1e-12 and abs(float(sch.c1[i]) - c1) < 1e-12
        assert abs(float(sch.sigma2_post[i]) - var) < 1e-12 * max(var, 1e-300) + 1e-300
    # DDIM: eta = 0 with the true eps lands exactly on q(x_j | x0)'s deterministic point;
    # eta = 1, j = i - 1 has the ancestral posterior variance.
    x0, e = 0.7, -1.3
    for i, j in ((1000, 600), (37, 0), (500, 499)):
        ab_i, ab_j = float(sch.alpha_bar[i]), float(sch.alpha_bar[j])
        xi = math.sqrt(ab_i) * x0 + math.sqrt(1 - ab_i) * e
        a, b, s = sch.ddim_coeffs(i, j, 0.0)
        assert s == 0.0 and abs(a * xi + b * e - (math.sqrt(ab_j) * x0 + math.sqrt(1 - ab_j) * e)) < 1e-12
    _, _, s = sch.ddim_coeffs(500, 499, 1.0)
    assert s * s == pytest.approx(float(sch.sigma2_post[500]), rel=1e-10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma2_max"):
        GeometricVPSDE(sigma2_max=1.5)
    with pytest.raises(ValueError, match=r"t: must lie in \[0, T=1.0\]"):
        VPSDE().beta(1.2)
    with pytest.raises(ValueError, match="t: must be finite"):
        VPSDE().std(torch.tensor([0.1, float("nan")], dtype=F64))
    with pytest.raises(ValueError, match="t: expected a float"):
        VPSDE().beta("0.3")
    with pytest.raises(ValueError, match="DDGANSchedule.T"):
        ddgan_schedule(0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="DDGANSchedule.t_power"):
            ddgan_schedule(4, t_power=bad)
    with pytest.raises(ValueError, match="num_steps"):
        DDPMSchedule(1)
    sch = ddgan_schedule(4)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"i: step index must lie in \[1, 4\]"):
        sch.posterior_sample(x, x, 5, x)
    with pytest.raises(ValueError, match=r"i: step index must lie in \[0, 4\]"):
        sch.q_sample(x, -1, x)
    with pytest.raises(ValueError, match="integer"):
        sch.q_sample(x, torch.tensor([1.0, 2.0, 3.0]), x)
    with pytest.raises(ValueError, match="noise"):
        sch.q_sample(x, 2, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"t: expected a scalar or shape \(3,\)"):
        VPSDE().drift(x, torch.tensor([0.1, 0.2], dtype=F64))
