"""LSGM samplers (reference/lsgm.md sec. 5): solve in the 4x4 latent from t = 1 down to t_end,
then decode once.

ode: the probability-flow ODE of the geometric VP-SDE with the mixed score,
         dz/dt = -beta_t/2 z - beta_t/2 score = -beta_t/2 (z - eps_theta(z, t) / sigma_t),
     integrated backwards in t by samplers/ode.py (dopri5, adaptive, rtol/atol).
em:  Euler-Maruyama on the reverse SDE, dz = [beta_t/2 z + beta_t score] d tau + sqrt(beta_t) dW,
     on a grid uniform in the log-SNR (see `em_grid`). A grid uniform in t is unusable for this
     SDE: beta(1) = sigma^2 c / (1 - sigma^2) ~ 1e4, so h beta >> 1 near t = 1; uniform in the
     integrated rate B(t) crowds all steps near t = 1 (B ~ sigma^2 is tiny below). The last step
     adds no noise.

NFE counts prior (eps network) calls per sample; the single decoder call is not counted (it is
the same one network call for every sampler and every tolerance, like a VAE decoder anywhere).
The geometric SDE has sigma_0^2 = sigma2_min > 0, so t_end = 0 is regular (default).
"""

from __future__ import annotations

import functools
import math

import torch

from fastsample import samplers as _driver
from fastsample.samplers import SampleResult, Sampler, Sampling, check_steps, seed_tensor
from fastsample.samplers import plan as plans
from fastsample.samplers.ode import solve

SAMPLERS = ("ode", "em")


def _check_z(model, z_T: torch.Tensor) -> None:
    want = tuple(model.latent_shape)
    if not isinstance(z_T, torch.Tensor) or z_T.dim() != 4 or tuple(z_T.shape[1:]) != want:
        shape = tuple(z_T.shape) if isinstance(z_T, torch.Tensor) else type(z_T).__name__
        raise ValueError(f"z_T has shape {shape}; expected (N, {', '.join(map(str, want))})")


def _check_t_end(t_end: float) -> float:
    if not (isinstance(t_end, (int, float)) and 0.0 <= t_end < 1.0):
        raise ValueError(f"t_end = {t_end!r}; must lie in [0, 1)")
    return float(t_end)


@torch.no_grad()
def sample_ode(model, z_T: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
               t_end: float = 0.0, method: str = "dopri5") -> SampleResult:
    """Latent probability-flow ODE from t = 1 to t_end; returns latents z_0 and the counted NFE.

    z_T: (N, C, 4, 4) float32 ~ N(0, I). The drift's scalars beta_t, sigma_t are computed from the
    solver's float64 t on the device (the adaptive solver picks t, so they cannot be tabled)."""
    _check_z(model, z_T)
    t_end = _check_t_end(t_end)
    sde = model.sde
    c = sde.log_ratio / sde.T
    s2min = sde.sigma2_min
    N = z_T.shape[0]

    def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        sigma2 = s2min * torch.exp(c * t)
        beta = sigma2 * c / (1 - sigma2)
        t_z = t.to(z.dtype).expand(N)
        eps = model.eps(z, t_z)
        # Divide by the very sigma_t the mixed score multiplied by (same dtype, same rounding):
        # z - eps/sigma cancels to alpha (z - eps'/sigma), and beta ~ 1e4 near t = 1 would amplify
        # a float64-vs-float32 sigma mismatch into a visible drift.
        sigma = model.prior.sigma(t_z)[:, None, None, None]
        return (-0.5 * beta * (z - eps / sigma)).to(z.dtype)

    z0, nfe = solve(f, z_T, 1.0, t_end, rtol=rtol, atol=atol, method=method)
    return SampleResult(z0, nfe)


def em_grid(steps: int, sde, t_end: float = 0.0) -> torch.Tensor:
    """steps + 1 float64 times from 1 down to t_end, uniform in the log-SNR
    lambda(t) = log(m_t^2 / sigma_t^2). With d lambda/dt = -c / m_t^2 (c = log(s2max/s2min)),
    a step of d lambda has h beta_t = d lambda sigma_t^2 < d lambda and h beta_t / sigma_t =
    d lambda sigma_t: both bounded at every t."""
    def lam(t: float) -> float:
        s2 = float(sde.std2(t))
        return math.log((1 - s2) / s2)

    l1, l0 = lam(sde.T), lam(t_end)
    lams = l1 + (l0 - l1) * torch.arange(steps + 1, dtype=torch.float64) / steps
    sigma2 = torch.sigmoid(-lams)
    t = torch.log(sigma2 / sde.sigma2_min) / (sde.log_ratio / sde.T)
    t[0], t[-1] = sde.T, t_end  # exact ends, free of the log/exp round trip
    return t


def em_table(model, steps: int, t_end: float = 0.0) -> plans.Table:
    """Reverse-SDE Euler-Maruyama in latent space as an affine1 plan (grid: `em_grid`); NFE =
    steps. Step i (t_i -> t_{i+1}, h = t_i - t_{i+1} > 0), with score = -eps/sigma:
        z <- (1 + h beta/2) z - (h beta / sigma) eps + sqrt(h beta) n,
    coefficients in float64; the last step adds no noise (it returns the mean)."""
    check_steps(steps)
    t_end = _check_t_end(t_end)
    sde = model.sde
    t = em_grid(steps, sde, t_end)
    h, t0 = t[:-1] - t[1:], t[:-1]
    beta, sigma = sde.beta(t0), sde.std(t0)
    c_x = (1 + 0.5 * h * beta).tolist()
    c_e = (-h * beta / sigma).tolist()
    noise = torch.sqrt(h * beta)
    noise[-1] = 0.0
    rows = [(float(a), float(b), float(c), float(d))
            for a, b, c, d in zip(t0.tolist(), c_x, c_e, noise.tolist())]
    vae = model.vae_cfg
    header = {"family": ("lsgm",), "sampler": ("em",), "nfe": (steps,),
              "data_shape": (vae.in_ch, vae.resolution, vae.resolution),
              "latent_shape": tuple(model.latent_shape), "decode": (model.cfg.decode,),
              "postprocess": ("quantize17",)}
    return plans.Table(header, plans.AFFINE1_COLUMNS, rows)


def table(model, sampler: str, steps: int, t_end: float = 0.0) -> plans.Table:
    if sampler != "em":
        raise ValueError(f"lsgm sampler {sampler!r} has no fixed plan (the ODE is adaptive); "
                         f"choose em")
    return em_table(model, steps, t_end)


@torch.no_grad()
def sample_em(model, z_T: torch.Tensor, steps: int, *, seed: int, offset: int = 0,
              stride: int | None = None, t_end: float = 0.0) -> SampleResult:
    """EM in latent space (see em_table) from z_T (not modified); returns z_0 and the NFE."""
    tab = em_table(model, steps, t_end)
    _check_z(model, z_T)
    z = z_T.clone()
    nfe = plans.run(tab, _driver.eps_net(model.eps), z, seed=seed_tensor(seed, z.device),
                    offset=offset, stride=stride)
    return SampleResult(z, nfe)


#-----------------------------------------------------------------------------------------------
# The family's sampling declaration (samplers/__init__.py Sampling).

def finish(model, z0: torch.Tensor, decode: str | None = None) -> torch.Tensor:
    """Latents to data space: one decoder call (not counted in the NFE: the same one call for
    every sampler and tolerance), then the digits grid."""
    return model.to_data(model.decode(z0, decode))


SAMPLING = Sampling(
    family="lsgm",
    samplers={"ode": Sampler("ode", None, ("rtol", "atol", "t_end", "method"), plan=False),
              "em": Sampler("em", 100, ("t_end",))},
    prior=_driver.normal_prior(lambda model: model.latent_shape), plan=table,
    bind=_driver.bind_eps, adaptive=_driver.adaptive_samplers("lsgm", ode=sample_ode),
    finish=finish,
    finish_options=("decode",))

__all__ = ["SAMPLERS", "SAMPLING", "sample_ode", "sample_em", "em_grid", "em_table", "table"]

# sample(model, name, steps, num, seed, device, batch=None, progress=False, **opts): the one driver.
sample = functools.partial(_driver.sample, SAMPLING)
