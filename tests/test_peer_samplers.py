"""The peer samplers (diffusers' schedulers on our DDPM net, fastsample.samplers.ddpm PEERS)
against oracles: our own DDIM on the same x_T (DDIM is Euler on the VE ODE in sigma, so
EulerDiscreteScheduler fed our DDIM's sigmas, and DDIMScheduler where the steps divide N, must
reproduce it to float32 rounding), the closed-form probability-flow map of Gaussian data, and the
derived timestep -> t map. Without diffusers only the import tests run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsample import samplers
from fastsample.samplers import ddpm as S
from fastsample.sde.vp import VPSDE, DDPMSchedule

ROOT = Path(__file__).resolve().parents[1]
DDPM = ROOT / "checkpoints" / "digits" / "ddpm.safetensors"
needs_diffusers = pytest.mark.skipif(not S.has_diffusers(),
                                     reason="diffusers not installed (fastsample[baselines])")


class ExactGaussian:
    """A fake DDPM model for data N(0, s^2 I): eps(x, t) = sigma_t x / (m_t^2 s^2 + sigma_t^2)
    exactly, so a converged sampler lands on the closed-form probability-flow map."""

    def __init__(self, s: float = 0.5, dim: int = 3):
        self.s, self.sde, self.t_eps, self.N, self.shape = s, VPSDE(), 1e-3, 1000, (dim,)

    def eps(self, x, t):
        m, sigma = self.sde.marginal(t.double())
        return (sigma[:, None] * x.double() / (m[:, None] ** 2 * self.s ** 2
                                               + sigma[:, None] ** 2)).to(x.dtype)

    def flow_map(self, x_T):
        """The ODE keeps x / sqrt(ab s^2 + 1 - ab) fixed; from ab_N to ab_0 = 1 it scales by
        s / sqrt(ab_N s^2 + 1 - ab_N)."""
        ab = float(DDPMSchedule(self.N).alpha_bar[-1])
        return x_T * (self.s / (ab * self.s ** 2 + 1.0 - ab) ** 0.5)


def _x_T(shape, n=64, seed=0):
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def _ddim_sigmas(model, steps):
    """Our DDIM's noise levels i_steps .. i_1 as VE sigmas, then 0 (i_0: alpha_bar = 1)."""
    ab = DDPMSchedule(model.N, model.sde.beta_min, model.sde.beta_max).alpha_bar
    idx = S.subsequence(model.N, steps)[::-1]
    return [float(((1 - ab[i]) / ab[i]).sqrt()) for i in idx]


@pytest.fixture(scope="module")
def ddpm():
    from fastsample.models import load_model
    if not DDPM.exists():
        pytest.skip(f"no released checkpoint {DDPM}")
    return load_model(DDPM)[0]


# ---------------------------------------------------------------------------------------------
# Without diffusers: importable, and a clear error naming the extra.

def test_importable_and_clear_error_without_diffusers(tmp_path):
    """diffusers blocked in a fresh interpreter: the package, the CLI and the sampler listing
    import; running a peer sampler fails with the install hint (exit 2 from the CLI)."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import fastsample.samplers.ddpm as S, fastsample.cli as cli\n"
        "assert not S.has_diffusers() and 'dpmpp2m' in S.SAMPLING.samplers\n"
        "from fastsample.samplers import MissingExtra\n"
        "class M: N, sde, t_eps, shape = 1000, S.VPSDE(), 1e-3, (2,)\n"
        "try:\n"
        "    S.sample(M(), 'dpmpp2m', 4, 2, 0)\n"
        "except MissingExtra as e:\n"
        "    print('ERR', e)\n"
        f"rc = cli.main(['sample', {str(DDPM)!r}, '--sampler', 'unipc', '--num', '2', "
        f"'--out', {str(tmp_path / 'x.npz')!r}])\n"
        "print('RC', rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "pip install fastsample[baselines]" in r.stdout
    assert "RC 2" in r.stdout
    assert "pip install fastsample[baselines]" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# With diffusers.

@needs_diffusers
@pytest.mark.parametrize("steps", [1, 3, 6, 10, 50])
def test_euler_on_our_ddim_sigmas_is_our_ddim(steps):
    """DDIM = Euler on dx/dsigma = eps in the VE state x / sqrt(ab): same x_T, same steps."""
    from diffusers import EulerDiscreteScheduler

    model = ExactGaussian()
    x_T = _x_T(model.shape)
    ref = S.sample_ddim(model, x_T, steps).x0
    sched = S.peer_scheduler(model, "euler", 2)     # for its trained betas only
    euler = EulerDiscreteScheduler(num_train_timesteps=model.N, trained_betas=sched.betas.numpy(),
                                   prediction_type="epsilon")
    euler.set_timesteps(sigmas=_ddim_sigmas(model, steps))
    out = S.run_scheduler(model, x_T, euler, ve=True)
    assert out.nfe == steps
    # diffusers keeps sigmas and the VE state in float32; x_T sqrt(1 + 157^2) carries ~1e-5
    assert (out.x0 - ref).abs().max() < 5e-5


@needs_diffusers
@pytest.mark.parametrize("steps", [4, 10, 20])
def test_diffusers_ddim_is_our_ddim_on_the_released_net(ddpm, steps):
    """DDIMScheduler with trailing spacing visits diffusers timesteps N - 1 - k N / steps, our
    indices N - k N / steps: our uniform subsequence when steps divides N. No clipping of x0."""
    from diffusers import DDIMScheduler

    x_T = _x_T(ddpm.shape, n=16)
    ref = S.sample_ddim(ddpm, x_T, steps).x0
    betas = S.peer_scheduler(ddpm, "euler", 2).betas.numpy()
    ddim = DDIMScheduler(num_train_timesteps=ddpm.N, trained_betas=betas, clip_sample=False,
                         set_alpha_to_one=True, timestep_spacing="trailing",
                         prediction_type="epsilon")
    ddim.set_timesteps(steps)
    assert [t + 1 for t in ddim.timesteps.tolist()] == S.subsequence(ddpm.N, steps)[:0:-1]
    out = S.run_scheduler(ddpm, x_T, ddim, ve=False)
    assert out.nfe == steps
    assert (out.x0 - ref).abs().max() < 1e-4


@needs_diffusers
def test_schedule_and_timestep_to_time_map():
    """diffusers' alphas_cumprod[tau] is our alpha_bar[tau + 1]; the net time the adapter uses
    at an integer timestep tau (from the scheduler's sigma) is matched_times(alpha_bar[tau + 1]),
    the time our DDIM queries at index tau + 1."""
    model = ExactGaussian()
    sched = S.peer_scheduler(model, "dpmpp2m", 10)
    ab = DDPMSchedule(model.N).alpha_bar
    assert torch.allclose(sched.alphas_cumprod.double(), ab[1:], rtol=1e-5, atol=0)
    tau = sched.timesteps.long()
    assert tau[0] == model.N - 1
    from_sigma = S.matched_times(model.sde, 1 / (1 + sched.sigmas[:-1].double() ** 2))
    ours = S.matched_times(model.sde, ab[tau + 1])
    assert torch.allclose(from_sigma, ours, atol=2e-5, rtol=0)


@needs_diffusers
@pytest.mark.parametrize("name", list(S.PEERS))
@pytest.mark.parametrize("karras", [False, True])
def test_peers_converge_to_the_gaussian_flow_map(name, karras):
    """Exact eps of Gaussian data: every peer converges to the closed-form map (the ODE's own
    answer) as steps grow, the second-order ones to within 1.5% of the data scale at 50 steps
    (Euler, first order like DDIM, to ~0.1: our DDIM-50 reads 0.09 here), and counts its net
    calls (Heun: 2 per step, 1 for the last)."""
    model = ExactGaussian()
    x_T = _x_T(model.shape)
    exact = model.flow_map(x_T)
    err = {}
    for steps in (20, 50):
        out = S.sample_peer(model, x_T, steps, name=name, karras=karras)
        assert out.nfe == (2 * steps - 1 if name == "heun" else steps)
        err[steps] = float((out.x0 - exact).abs().max())
    assert err[50] < err[20] / 2
    assert err[50] < (0.12 if name == "euler" else 0.015), err


@needs_diffusers
def test_peer_sampler_through_the_cli(ddpm, tmp_path, capsys):
    from fastsample.cli import main

    out = tmp_path / "h.npz"
    assert main(["sample", str(DDPM), "--sampler", "heun", "--steps", "3", "--karras",
                 "--num", "4", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert int(f["nfe"]) == 5 and f["samples"].shape == (4, 1, 8, 8)
        assert str(f["sampler"]) == "heun"
    x, nfe = samplers.sample(S.SAMPLING, ddpm, "dpmpp2m", 4, 4, 0)
    assert nfe == 4 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="karras"):
        samplers.sample(S.SAMPLING, ddpm, "euler", 4, 2, 0, karras="yes")
    with pytest.raises(ValueError, match="unknown option"):
        samplers.sample(S.SAMPLING, ddpm, "euler", 4, 2, 0, rtol=1e-3)
