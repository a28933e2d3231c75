"""Whole-sampler equivalence of the fused kernels and their twins (issue #7): SSCS and the DDGAN
posterior chain run end to end through the Triton kernels (the interpreter on CPU, compiled on
CUDA) and through the torch twins. With the twins fed the kernels' own Philox noise the samples
are identical; with their own noise they follow the same law (cld.md sec. 5.5's exact table)."""

import pytest
import torch

from fastsample.kernels import affine
from fastsample.kernels._triton import HAS_TRITON, INTERPRETED, philox_normal
from fastsample.samplers import cld as S
from fastsample.sde.cld import CLD, CLDConfig
from test_samplers_cld import ExactScore, gaussian

pytestmark = pytest.mark.skipif(not (HAS_TRITON and (INTERPRETED or torch.cuda.is_available())),
                                reason="needs Triton (interpreter on CPU, or a CUDA device)")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
CLD_DEFAULT = CLD(CLDConfig())


def _kernel_noise(seed, offset, n_streams, like):
    """What the fused kernel injects for (seed, offset): streams of philox_normal."""
    return torch.stack([philox_normal(like.numel(), seed, offset, j).view(like.shape)
                        for j in range(n_streams)])


def _sscs(monkeypatch, backend, num, nfe, seed):
    monkeypatch.setenv("FASTSAMPLE_KERNELS", backend)
    model = ExactScore(gaussian(0.25), CLD_DEFAULT)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x, v = S.prior(CLD_DEFAULT, num, (2,), g, DEVICE)
    return S.sample_sscs(model, x, v, nfe, seed=seed, kind="quadratic").x0


def test_sscs_kernel_and_twin_fed_the_kernel_noise_give_identical_samples(monkeypatch):
    got = _sscs(monkeypatch, "triton", 48, 8, seed=3)
    monkeypatch.setattr(affine, "twin_normals", _kernel_noise)
    ref = _sscs(monkeypatch, "torch", 48, 8, seed=3)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _sscs(monkeypatch, "torch", 48, 8, seed=4), atol=1e-3)


def test_sscs_kernel_and_twin_have_the_same_law(monkeypatch):
    """Var(x_out)/s2 for Gaussian data, s2 = 0.25, SSCS-QS at NFE 20: 0.92 (cld.md table)."""
    n = 4000
    ratios = {b: float(_sscs(monkeypatch, b, n, 20, seed=0).double().var(0).mean()) / 0.25
              for b in ("triton", "torch")}
    # 2 dims x 4000 samples: the variance ratio's standard error is about 1.6%
    for b, r in ratios.items():
        assert r == pytest.approx(0.92, abs=0.07), (b, ratios)
    assert ratios["triton"] == pytest.approx(ratios["torch"], abs=0.08)


def _ddgan(monkeypatch, backend, num, seed):
    from fastsample.samplers.ddgan import draw_latents, sample_posterior
    from fastsample.sde.vp import ddgan_schedule
    monkeypatch.setenv("FASTSAMPLE_KERNELS", backend)
    sched = ddgan_schedule(4)

    def G(x, z, i):       # a fixed, nonlinear stand-in generator: the chain's plumbing is tested
        return torch.tanh(0.7 * x + 0.1 * z[:, :2]) * 0.9

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x_T = torch.randn(num, 2, generator=g, device=DEVICE)
    z = draw_latents(4, num, 8, seed, DEVICE)
    return sample_posterior(G, x_T, sched, seed=seed, z=z).x0


def test_ddgan_chain_kernel_and_twin_fed_the_kernel_noise_give_identical_samples(monkeypatch):
    got = _ddgan(monkeypatch, "triton", 64, seed=5)
    monkeypatch.setattr(affine, "twin_normals", _kernel_noise)
    ref = _ddgan(monkeypatch, "torch", 64, seed=5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
