"""LSGM samplers: on the exact N(0, I) prior (alpha = 0) the latent flow maps N(0, I) to itself
(the oracle); the ODE/EM agree with it, NFE is counted, seeds reproduce, bad input is refused."""

import math

import pytest
import torch

from fastsample.models import lsgm
from fastsample.samplers import lsgm as S

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


def _model(alpha_logit=-math.inf):
    cfg = lsgm.Config(vae_base_ch=8, prior_base_ch=8)
    m = lsgm.Model(cfg).eval()
    with torch.no_grad():
        m.prior.mixing_logit.fill_(alpha_logit)
    return m


def test_ode_on_normal_prior_is_the_identity_flow():
    # With eps = sigma_t z the drift is -beta/2 (z - z) = 0: the ODE is exactly stationary, so
    # z_0 = z_T up to float32 rounding (amplified by beta ~ 1e4 near t = 1).
    # Measured over 20 seeded draws: worst |z_0 - z_T| = 1.34 (1e-5 + 1e-5 |z|); the bound below
    # keeps 2x room. A flow that is not the identity moves z by O(1).
    m = _model()
    z = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    res = S.sample_ode(m, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.x0, z, rtol=3e-5, atol=3e-5)
    assert res.nfe >= 2


def test_ode_transports_a_scaled_normal_exactly():
    # A prior whose residual eps' is the exact eps of N(0, v I) latents, mixed with alpha = 1:
    # for VP, z_t ~ N(0, (m^2 v + sigma^2) I), eps* = sigma z_t / (m^2 v + sigma^2). The ODE maps
    # z_1 to z_0 by the scalar factor sqrt(s_0^2 / s_1^2) with s_t^2 = m_t^2 v + sigma_t^2.
    m = _model(alpha_logit=math.inf)  # alpha = 1
    v = 0.3
    sde = m.sde

    class ExactNet(torch.nn.Module):
        def forward(self, z, t):
            s2 = sde.sigma2_min * math.exp(1) ** (sde.log_ratio * t.double())
            sigma = torch.sqrt(s2)
            var = (1 - s2) * v + s2
            return (sigma / var).float()[:, None, None, None] * z

    m.prior.net = ExactNet()
    z1 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    res = S.sample_ode(m, z1, rtol=1e-7, atol=1e-7)
    s0 = (1 - sde.sigma2_min) * v + sde.sigma2_min
    s1 = (1 - sde.sigma2_max) * v + sde.sigma2_max
    torch.testing.assert_close(res.x0, z1 * math.sqrt(s0 / s1), rtol=1e-4, atol=1e-5)
    # EM with many steps agrees in distribution: per-dim variance of z_0 ~ s0 (Monte Carlo).
    zs = torch.randn(4000, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * math.sqrt(s1)
    out = S.sample_em(m, zs, 200, seed=3).x0
    var = float(out.var())
    n = out.numel()
    assert abs(var - s0) < 5 * s0 * math.sqrt(2 / n) + 0.02 * s0, (var, s0)


class _ConstantNet(torch.nn.Module):
    """A finite stand-in for the prior's U-Net: at alpha = 0 its output is multiplied by 0, so
    the prior's eps (and every sample) is bit-identical to the U-Net's, without its cost (225
    U-Net calls at batch 1000 were ~12 s). A prior that ignored alpha would add 7 to eps."""

    def forward(self, z, t):
        return torch.full_like(z, 7.0)


def test_em_on_normal_prior_keeps_normal_and_converges_in_steps():
    # N(0, I) is invariant; EM's only error is its step bias, which must shrink with more steps.
    m = _model()
    m.prior.net = _ConstantNet()
    z = torch.randn(1000, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    errs = []
    for steps in (25, 200):
        res = S.sample_em(m, z, steps, seed=1)
        assert res.nfe == steps
        x = res.x0.double()
        n = x.numel()
        assert abs(float(x.mean())) < 5 / math.sqrt(n)
        errs.append(abs(float(x.var()) - 1))
    mc = 5 * math.sqrt(2 / n)  # Monte Carlo tolerance of a variance estimate
    assert errs[1] < mc, errs
    assert errs[0] > errs[1]


def test_em_grid():
    sde = lsgm.sde_of(lsgm.Config())
    t = S.em_grid(10, sde)
    assert t[0] == 1.0 and t[-1] == 0.0 and bool((t[1:] < t[:-1]).all())
    s2 = sde.std2(t)
    lam = torch.log((1 - s2) / s2)
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, d[0].expand_as(d), rtol=1e-9, atol=1e-9)
    # stability: at 50 steps every h beta_t (beta at the step's start) stays below 1
    t = S.em_grid(50, sde)
    assert float(((t[:-1] - t[1:]) * sde.beta(t[:-1])).max()) < 1.0


def test_sample_same_seed_same_samples_and_data_space():
    m = _model(alpha_logit=-3.0)
    for name, steps in (("ode", 1), ("em", 5)):
        a, nfe_a = S.sample(m, name, steps, 6, seed=7, device="cpu", rtol=1e-3, atol=1e-3) \
            if name == "ode" else S.sample(m, name, steps, 6, seed=7, device="cpu")
        b, nfe_b = S.sample(m, name, steps, 6, seed=7, device="cpu", rtol=1e-3, atol=1e-3) \
            if name == "ode" else S.sample(m, name, steps, 6, seed=7, device="cpu")
        assert torch.equal(a, b) and nfe_a == nfe_b
        assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32
        k = a * 16
        assert torch.equal(k, torch.round(k)) and float(a.min()) >= 0 and float(a.max()) <= 1
    e1, _ = S.sample(m, "em", 5, 6, seed=7, device="cpu")
    e2, _ = S.sample(m, "em", 5, 6, seed=8, device="cpu")
    z1 = torch.randn((6, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    z2 = torch.randn((6, 4, 4, 4), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(z1, z2)
    # batching changes nothing for the ODE with a deterministic prior: same x_T, same solve per batch
    full, nfe_full = S.sample(m, "em", 4, 6, seed=2, device="cpu")
    halves, nfe_h = S.sample(m, "em", 4, 6, seed=2, device="cpu", batch=3)
    assert full.shape == halves.shape and nfe_full == nfe_h == 4


def test_decode_inverts_to_levels():
    m = _model()
    z = torch.randn(4, 4, 4, 4)
    for mode in ("mode", "mean"):
        x = m.to_data(m.decode(z, mode))
        # fresh decoder: uniform categorical -> mode level 0, mean 0.5
        want = 0.0 if mode == "mode" else 0.5
        torch.testing.assert_close(x, torch.full_like(x, want))
    with pytest.raises(ValueError, match="decode mode"):
        m.decode(z, "median")


def test_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="unknown sampler 'sscs' for family lsgm; choose ode|em"):
        S.sample(m, "sscs", 10, 2, seed=0, device="cpu")
    for steps in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps"):
            S.sample(m, "em", steps, 2, seed=0, device="cpu")
    with pytest.raises(ValueError, match="num"):
        S.sample(m, "em", 2, 0, seed=0, device="cpu")
    with pytest.raises(ValueError, match="seed"):
        S.sample(m, "em", 2, 2, seed=-1, device="cpu")
    with pytest.raises(ValueError, match="z_T has shape"):
        S.sample_ode(m, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="t_end"):
        S.sample_em(m, torch.randn(2, 4, 4, 4), 3, seed=0, t_end=1.0)
