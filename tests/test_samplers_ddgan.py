"""DDGAN posterior sampler and the exact denoising distribution of a Gaussian mixture
(reference/ddgan.md sec. 1, 4, 6).

Oracles: q(x_{i-1} | x_i) and q(x_0 | x_i) of a Gaussian mixture in closed form (Bayes over
components; cross-checked against toy2d.GaussianMixture.ddgan_denoising_posterior), its
multimodality counted on a fine grid, Monte Carlo chains with MMD tolerances calibrated on the null (two independent sets of true samples).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastsample.data.toy2d import GaussianMixture
from fastsample.metrics import mmd_rbf
from fastsample.samplers import ddgan as S
from fastsample.sde import ddgan_schedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


# ---------------------------------------------------------------------------------------------
# Closed-form posteriors of an isotropic Gaussian mixture under the VP chain.

def mixture_posterior(mix: GaussianMixture, x: torch.Tensor, ab_target, ab_cond):
    """q(x_target | x_cond = x) per row of x (n, d), where x_target is at level alpha_bar
    ab_target, x_cond at ab_cond (< ab_target) and x_cond | x_target ~ N(sqrt(a) x_target, 1 - a),
    a = ab_cond / ab_target; the levels are floats or (n,) tensors (one pair per row).
    Returns weights (n, K), means (n, K, d), stds (n, K)."""
    x = x.to(F64)
    n = x.shape[0]
    ab_t = torch.as_tensor(ab_target, dtype=F64).reshape(-1, 1).expand(n, 1)
    ab_c = torch.as_tensor(ab_cond, dtype=F64).reshape(-1, 1).expand(n, 1)
    a = ab_c / ab_t                                                  # (n, 1)
    s2 = (mix.stds ** 2)[None]                                       # (1, K)
    prior_var = ab_t * s2 + (1 - ab_t)                               # (n, K)
    marg_var = ab_c * s2 + (1 - ab_c)                                # (n, K)
    sq = ((x[:, None, :] - ab_c.sqrt()[:, :, None] * mix.means[None]) ** 2).sum(-1)
    logw = torch.log(mix.weights) - 0.5 * sq / marg_var - 0.5 * mix.dim * torch.log(marg_var)
    post_prec = 1 / prior_var + a / (1 - a)                          # (n, K)
    post_mean = ((ab_t.sqrt()[:, :, None] * mix.means[None] / prior_var[:, :, None])
                 + (a.sqrt() * x / (1 - a))[:, None, :]) / post_prec[:, :, None]
    return torch.softmax(logw, dim=1), post_mean, torch.sqrt(1 / post_prec)


def draw_mixture(w, mu, std, u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """One draw per row from sum_k w[r,k] N(mu[r,k], std_k^2): component by inverse CDF of u
    (n_rows,) in [0,1), then mu + std * n (n_rows, d); std (n_rows, K)."""
    k = torch.searchsorted(torch.cumsum(w, 1), u.to(F64)[:, None]).clamp(max=w.shape[1] - 1)[:, 0]
    rows = torch.arange(len(u))
    return mu[rows, k] + std[rows, k, None] * n.to(F64)


def ring(K=8, r=1.0, std=0.08) -> GaussianMixture:
    ang = 2 * math.pi * torch.arange(K, dtype=F64) / K
    return GaussianMixture(torch.stack([r * ang.cos(), r * ang.sin()], 1), torch.full((K,), std),
                           torch.ones(K))


def test_closed_form_matches_toy2d_posterior():
    mix = ring()
    sch = ddgan_schedule(4)
    g = torch.Generator().manual_seed(0)
    for i in (1, 2, 4):
        x = torch.randn(3, 2, generator=g, dtype=F64)
        w, mu, std = mixture_posterior(mix, x, float(sch.alpha_bar[i - 1]), float(sch.alpha_bar[i]))
        for r in range(3):
            ref = mix.ddgan_denoising_posterior(x[r], i, sch)
            torch.testing.assert_close(w[r], ref.weights, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mu[r], ref.means, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(std[r], ref.stds, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Multimodality of q(x_{i-1} | x_i): T = 4 vs T = 1000 (ddgan.md sec. 1, 6).

BIMODAL_1D = GaussianMixture(torch.tensor([[-1.0], [1.0]], dtype=F64), torch.tensor([0.2, 0.2]),
                             torch.ones(2))


def count_modes(w, mu, std, grid: torch.Tensor) -> torch.Tensor:
    """Local maxima of each row's 1-D mixture density on `grid` (G,): (n,) counts."""
    z = (grid[None, None, :] - mu[:, :, 0, None]) / std[:, :, None]             # (n, K, G)
    dens = (w[:, :, None] * torch.exp(-0.5 * z ** 2) / std[:, :, None]).sum(1)  # (n, G)
    peak = (dens[:, 1:-1] > dens[:, :-2]) & (dens[:, 1:-1] > dens[:, 2:])
    return peak.sum(1)


def test_exact_denoising_distribution_is_multimodal_for_T4():
    sch = ddgan_schedule(4)
    x = torch.zeros(1, 1, dtype=F64)   # halfway between the two data modes (scaled)
    w, mu, std = mixture_posterior(BIMODAL_1D, x, float(sch.alpha_bar[0]), float(sch.alpha_bar[1]))
    grid = torch.linspace(-2, 2, 4001, dtype=F64)
    assert int(count_modes(w, mu, std, grid)[0]) == 2
    assert float(w.min()) > 0.4
    # Two separated bumps: mean gap in units of the component std.
    assert float((mu[0, 1, 0] - mu[0, 0, 0]).abs() / std[0, 0]) > 6
    # And for typical x_1 ~ q(x_1), a non-negligible fraction of posteriors is bimodal.
    g = torch.Generator().manual_seed(1)
    ab1 = float(sch.alpha_bar[1])
    x1 = math.sqrt(ab1) * BIMODAL_1D.sample(4000, g).to(F64) + math.sqrt(1 - ab1) * torch.randn(4000, 1, generator=g, dtype=F64)
    w, mu, std = mixture_posterior(BIMODAL_1D, x1, 1.0, ab1)
    modes = count_modes(w, mu, std, grid)
    bimodal = ((modes == 2) & (w.min(1).values > 0.1)).double().mean()
    assert bimodal > 0.05, f"only {float(bimodal):.3f} of typical x_1 give a bimodal q(x_0 | x_1)"


def test_exact_denoising_distribution_is_unimodal_for_T1000():
    sch = ddgan_schedule(1000)
    grid = torch.linspace(-2.5, 2.5, 801, dtype=F64)
    xs = torch.linspace(-2.0, 2.0, 41, dtype=F64)   # covers the x_i of every level
    # Every (level i, x_i) pair as one row.
    i = torch.arange(1, 1001).repeat_interleave(len(xs))
    x = xs.repeat(1000)[:, None]
    w, mu, std = mixture_posterior(BIMODAL_1D, x, sch.alpha_bar[i - 1], sch.alpha_bar[i])
    for rows in torch.arange(len(x)).split(8192):
        modes = count_modes(w[rows], mu[rows], std[rows], grid)
        assert bool((modes == 1).all()), "q(x_{i-1} | x_i) is multimodal at T=1000"
    # Closed form: equal-variance components with mean gap < 2 std are unimodal for any weights.
    assert float(((mu[:, 1, 0] - mu[:, 0, 0]).abs() / std[:, 0]).max()) < 2.0


# ---------------------------------------------------------------------------------------------
# Chains with exact vs Gaussian (moment-matched) denoisers.

def _chain(mix, sch, n, g, denoiser: str) -> torch.Tensor:
    """Ancestral chain x_T ~ N(0,I) -> x_0 with exact or moment-matched q(x_{i-1} | x_i)."""
    x = torch.randn(n, mix.dim, generator=g, dtype=F64)
    for i in range(sch.num_steps, 0, -1):
        w, mu, std = mixture_posterior(mix, x, float(sch.alpha_bar[i - 1]), float(sch.alpha_bar[i]))
        noise = torch.randn(n, mix.dim, generator=g, dtype=F64)
        if denoiser == "exact":
            x = draw_mixture(w, mu, std, torch.rand(n, generator=g, dtype=F64), noise)
        else:
            m = (w[:, :, None] * mu).sum(1)
            # Per-coordinate variance of the mixture: within + between components.
            var = (w * std ** 2).sum(1)[:, None] + (w[:, :, None] * (mu - m[:, None]) ** 2).sum(1)
            x = m + var.sqrt() * noise
    return x.float()


def _null_tolerance(mix, truth, g, reps=6) -> float:
    """MMD^2 tolerance from the null: |mean| + 6 sd of MMD^2(fresh true set, truth). At n = 1000
    on the ring the null sd is ~0.0015 (12 reps), the Gaussian denoiser chain reads ~0.09."""
    null = torch.tensor([mmd_rbf(mix.sample(len(truth), g), truth) for _ in range(reps)])
    return float(null.mean().abs() + 6 * null.std())


def test_gaussian_denoiser_is_measurably_worse_than_exact_posterior_at_T4():
    mix = ring()
    sch = ddgan_schedule(4)
    n = 1000
    g = torch.Generator().manual_seed(2)
    truth = mix.sample(n, g)
    tol = _null_tolerance(mix, truth, g)
    m_exact = mmd_rbf(_chain(mix, sch, n, g, "exact"), truth)
    m_gauss = mmd_rbf(_chain(mix, sch, n, g, "gaussian"), truth)
    assert m_exact < tol, (m_exact, tol)
    assert m_gauss > 5 * tol, (m_gauss, tol)


# ---------------------------------------------------------------------------------------------
# The sampler itself.

class OracleGenerator:
    """x_0' drawn from the EXACT q(x_0 | x_i) of a mixture, driven by z (z_dim = d + 1): z[0]
    picks the component (through Phi), z[1:] is the Gaussian noise. Counts its calls."""

    def __init__(self, mix: GaussianMixture, schedule):
        self.mix, self.sch, self.calls = mix, schedule, 0
        self.z_dim = mix.dim + 1

    def __call__(self, x, z, t):
        self.calls += 1
        i = int(t[0].item())
        assert bool((t == i).all()), "one step index per call"
        w, mu, std = mixture_posterior(self.mix, x, 1.0, float(self.sch.alpha_bar[i]))
        u = 0.5 * (1 + torch.erf(z[:, 0].to(F64) / math.sqrt(2)))
        return draw_mixture(w, mu, std, u, z[:, 1:]).to(x.dtype)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_posterior_sampler_with_oracle_generator_reproduces_data(T):
    mix = ring()
    sch = ddgan_schedule(T)
    n = 1000
    G = OracleGenerator(mix, sch)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(n, 2, generator=g)
    z = S.draw_latents(T, n, G.z_dim, seed=5, device="cpu")
    res = S.sample_posterior(G, x_T, sch, seed=5, z=z)
    assert res.nfe == T and G.calls == T
    assert res.x0.shape == (n, 2) and res.x0.dtype == torch.float32
    truth = mix.sample(n, g)
    assert mmd_rbf(res.x0, truth) < _null_tolerance(mix, truth, g)


def test_posterior_step_moments_and_noise_free_last_step():
    """G returns a constant x_0' = m: x_{T-1} | x_T ~ N(c0 m + c1 x_T, sigma_post^2) exactly,
    and the last step returns x_0' itself (c0_1 = 1, c1_1 = 0, no noise)."""
    T, n, m = 4, 20000, 0.7
    sch = ddgan_schedule(T)
    seen = []
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))

    def G(x, z, t):
        return torch.full_like(x, m)

    res = S.sample_posterior(G, x_T, sch, seed=11, z=torch.zeros(T, n, 1),
                             callback=lambda d: seen.append(d["x"].clone()))
    resid = seen[0] - (float(sch.c0[T]) * m + float(sch.c1[T]) * x_T)
    sigma = math.sqrt(float(sch.sigma2_post[T]))
    se = sigma / math.sqrt(n)
    assert abs(float(resid.mean())) < 5 * se
    assert abs(float(resid.std()) - sigma) < 5 * sigma / math.sqrt(2 * n)
    torch.testing.assert_close(res.x0, torch.full_like(res.x0, m))
    assert not torch.equal(x_T, res.x0)  # x_T was copied, not written


def test_plan_is_float64_tables():
    sch = ddgan_schedule(4)
    plan = S.posterior_plan(sch)
    assert [s.i for s in plan] == [4, 3, 2, 1]
    assert plan[-1].sigma == 0.0 and plan[-1].c0 == 1.0 and plan[-1].c1 == 0.0
    for s in plan[:-1]:
        assert s.sigma == math.sqrt(float(sch.sigma2_post[s.i]))
        assert s.c0 == float(sch.c0[s.i]) and s.c1 == float(sch.c1[s.i])


def test_same_seed_same_samples_and_z_depends_on_seed():
    sch = ddgan_schedule(2)
    G = OracleGenerator(ring(), sch)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    z = S.draw_latents(2, 64, 3, seed=1, device="cpu")
    a = S.sample_posterior(G, x_T, sch, seed=1, z=z).x0
    b = S.sample_posterior(G, x_T, sch, seed=1, z=z).x0
    c = S.sample_posterior(G, x_T, sch, seed=2, z=z).x0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(z, S.draw_latents(2, 64, 3, seed=2, device="cpu"))


def test_bad_inputs():
    sch = ddgan_schedule(4)
    G = OracleGenerator(ring(), sch)
    x_T = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"z has shape \(3, 8, 3\); expected \(4, 8, z_dim\)"):
        S.sample_posterior(G, x_T, sch, seed=0, z=torch.zeros(3, 8, 3))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        S.sample_posterior(G, x_T, sch, seed=-1, z=torch.zeros(4, 8, 3))
    with pytest.raises(ValueError, match="x_T must be a floating tensor"):
        S.sample_posterior(G, torch.zeros(8, 2, dtype=torch.long), sch, seed=0, z=torch.zeros(4, 8, 3))
