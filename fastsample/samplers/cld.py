"""CLD samplers: SSCS, Euler–Maruyama and the probability-flow ODE (reference/cld.md sec. 4, 5).

A model here is anything with
    cld          fastsample.sde.CLD (float64 scalars)
    mixed_score  bool: s = -v/SigmaRef_vv - ell alpha, else s = -ell alpha (sec. 3.2)
    alpha(x, v, t) -> (N, ...)   the net, t (N,) forward time
    to_data(x)   model space -> data space (only `sample` uses it)
so a trained fastsample.models.cld.Model and a test's exact-score oracle run the same code.

Conventions (samplers/__init__.py): x_T = (x, v) is drawn by the caller (prior x ~ N(0, I),
v ~ N(0, M I)); `seed` drives every later draw through the fused kernels' Philox stream; NFE is
counted at the call sites and equals N exactly for sscs/em (N - 1 steps + the denoising call,
sec. 5.1); per-step scalars are float64 on the host before the loop, which reads no tensor.

Every fixed-step sampler here is an affine2 plan (samplers/plan.py: rows, noise counters) run
by the one loop; `sample_sscs` / `sample_em` are thin views of it. The ODE is the shared adaptive
solver plus the same denoising row.
"""

from __future__ import annotations

import functools
import math

import torch

from fastsample.kernels import dispatch
from fastsample import samplers as _driver
from fastsample.samplers import SampleResult, Sampler, Sampling, check_steps, seed_tensor
from fastsample.samplers import plan as plans

SAMPLERS = ("sscs", "em", "ode")
KINDS = ("uniform", "quadratic")


#-----------------------------------------------------------------------------------------------
# Shared helpers.

def prior(cld, num: int, shape: tuple, generator: torch.Generator, device,
          dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T = (x, v) ~ N(0, I) x N(0, M I), each (num, *shape), from `generator`."""
    x = torch.randn((num,) + tuple(shape), generator=generator, device=device, dtype=dtype)
    v = torch.randn((num,) + tuple(shape), generator=generator, device=device, dtype=dtype)
    return x, v * math.sqrt(cld.M)


def _check_state(x: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise ValueError("x and v must be tensors")
    if x.shape != v.shape or x.dim() < 2:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must share one (N, ...) shape")
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(v).all()):
        raise ValueError("x_T contains NaN or inf")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"schedule {kind!r}; choose {'|'.join(KINDS)}")
    return kind


def nfe_budget(steps: int) -> int:
    """The number of SSCS/EM steps for an NFE budget: steps - 1 (+ the denoising call)."""
    check_steps(steps)
    if steps < 2:
        raise ValueError(f"steps (NFE) must be >= 2 for CLD: N - 1 >= 1 steps plus the "
                         f"denoising call, got {steps!r}")
    return steps - 1


def _linear_row(A) -> tuple:
    """A lone exact A step (a LinearStep): no network, noise K."""
    return (0.0, 0.0, 1.0, 0.0, A.T_xx, A.T_xv, A.T_vx, A.T_vv, A.K11, A.K21, A.K22, 0.0)


def em_row(t: float, c) -> tuple:
    """sde.cld's EMStep (x' = x + a_xv v, v' = a_vx x + a_vv v + a_valpha alpha + g n) as a row:
    x's update reads the pre-step v, hence D_xv."""
    if c.a_xx != 1.0 or c.a_xalpha != 0.0:
        raise ValueError("CLD's EM step leaves x's own coefficient at 1 and x free of alpha")
    return (1.0, float(t), c.a_vv, c.a_valpha, 1.0, 0.0, c.a_vx, 1.0, 0.0, 0.0, c.g, c.a_xv)


def _table(model, sampler: str, grid: str, rows: list) -> plans.Table:
    header = {"family": ("cld",), "sampler": (sampler,), "nfe": (0,),
              "data_shape": tuple(model.data_shape), "grid": (grid,),
              "prior_v_scale": (math.sqrt(model.cld.M),),
              "postprocess": (plans.postprocess_name(model.data_shape,
                                                     getattr(model, "dataset", "digits")),)}
    tab = plans.Table(header, plans.AFFINE2_COLUMNS, [tuple(float(v) for v in r) for r in rows])
    tab.header["nfe"] = (plans.net_calls(tab),)
    return tab


def denoise_row(model) -> tuple:
    """Final EM mean step from forward time sampling_eps to 0 (sec. 5.1): one network call."""
    return em_row(model.cld.config.sampling_eps, model.cld.denoise_coeffs(model.mixed_score))


#-----------------------------------------------------------------------------------------------
# Plans.

def sscs_table(model, steps: int, kind: str = "quadratic", midpoint: bool = False,
               fused: bool = True, num_stab: float = 0.0) -> plans.Table:
    """Symmetric Splitting CLD Sampler (sec. 5.3) with NFE = steps: steps - 1 SSCS steps + the
    denoising call. fused=True: S + the composed A halves in one row per step (after a lone
    first half step); fused=False: the reference A(h/2), S, A(h/2) as separate rows (4 normals
    per element per step instead of 2: same law, other numbers)."""
    n = nfe_budget(steps)
    check_kind(kind)
    cld = model.cld
    plan = cld.sscs_plan(n, kind, midpoint=midpoint, mixed_score=model.mixed_score,
                         num_stab=num_stab)
    rows = []
    if fused:
        rows.append(_linear_row(plan.first_half))
        for s in plan.steps:
            A = s.A
            rows.append((1.0, float(s.t_s), s.k_v, s.k_alpha, A.T_xx, A.T_xv, A.T_vx, A.T_vv,
                         A.K11, A.K21, A.K22, 0.0))
    else:
        T, tau = cld.T, plan.tau

        def half(lo, hi):
            return cld.A_step(float(cld.b_int(T - hi, T - lo)), num_stab)

        for k, s in enumerate(plan.steps):
            rows.append(_linear_row(half(tau[k], tau[k] + 0.5 * s.h)))
            rows.append((1.0, float(s.t_s), s.k_v, s.k_alpha, 1.0, 0.0, 0.0, 1.0,
                         0.0, 0.0, 0.0, 0.0))
            rows.append(_linear_row(half(tau[k] + 0.5 * s.h, tau[k + 1])))
    # The denoising row's time is sampling_eps exactly (plan.denoise.t carries the grid's
    # rounding, 1e-3 + 9e-19: the same float32).
    rows.append(denoise_row(model))
    return _table(model, "sscs", kind, rows)


def em_table(model, steps: int, kind: str = "quadratic") -> plans.Table:
    """Euler–Maruyama on the reverse SDE (sec. 5.2) with NFE = steps: steps - 1 EM steps +
    the denoising call."""
    n = nfe_budget(steps)
    check_kind(kind)
    cld = model.cld
    tau = cld.time_grid(n, kind).tolist()
    rows = []
    for k in range(n):
        c = cld.em_step_coeffs(tau[k], tau[k + 1] - tau[k], model.mixed_score)
        rows.append(em_row(c.t, c))
    rows.append(denoise_row(model))
    return _table(model, "em", kind, rows)


def table(model, sampler: str, steps: int, schedule: str = "quadratic", midpoint: bool = False,
          fused: bool = True, num_stab: float = 0.0) -> plans.Table:
    """The plan of a fixed-step CLD sampler (sscs | em) with `steps` network calls."""
    if sampler == "sscs":
        return sscs_table(model, steps, schedule, midpoint=midpoint, fused=fused,
                          num_stab=num_stab)
    if sampler == "em":
        if midpoint or not fused or num_stab:
            raise ValueError("midpoint, fused and num_stab are options of sscs, not em")
        return em_table(model, steps, schedule)
    raise ValueError(f"cld sampler {sampler!r} has no fixed plan; choose sscs|em")


def _run(model, tab: plans.Table, x, v, seed: int, noise_offset: int,
         noise_stride: int | None) -> SampleResult:
    _check_state(x, v)
    x, v = x.clone(), v.clone()
    nfe = plans.run(tab, model.alpha, x, v, seed=seed_tensor(seed, x.device),
                    offset=noise_offset, stride=noise_stride)
    return SampleResult(x, nfe)


#-----------------------------------------------------------------------------------------------
# The samplers: views of the plan loop, and the ODE.

@torch.no_grad()
def sample_sscs(model, x: torch.Tensor, v: torch.Tensor, steps: int, *, seed: int,
                kind: str = "quadratic", midpoint: bool = False, fused: bool = True,
                num_stab: float = 0.0, noise_offset: int = 0,
                noise_stride: int | None = None) -> SampleResult:
    """SSCS with NFE = steps (see sscs_table); x, v: (N, ...) x_T (not modified)."""
    tab = sscs_table(model, steps, kind, midpoint=midpoint, fused=fused, num_stab=num_stab)
    return _run(model, tab, x, v, seed, noise_offset, noise_stride)


@torch.no_grad()
def sample_em(model, x: torch.Tensor, v: torch.Tensor, steps: int, *, seed: int,
              kind: str = "quadratic", noise_offset: int = 0,
              noise_stride: int | None = None) -> SampleResult:
    """Euler–Maruyama with NFE = steps (see em_table); x, v: (N, ...) x_T (not modified)."""
    return _run(model, em_table(model, steps, kind), x, v, seed, noise_offset, noise_stride)


@torch.no_grad()
def sample_ode(model, x: torch.Tensor, v: torch.Tensor, *, rtol: float = 1e-5,
               atol: float = 1e-5, method: str = "dopri5") -> SampleResult:
    """Adaptive solve of the probability-flow ODE over reverse time [0, T - sampling_eps], then
    the EM denoising mean step; NFE = the solver's count + 1."""
    from fastsample.samplers.ode import solve

    _check_state(x, v)
    cld = model.cld
    Gamma, Minv, T = cld.Gamma, cld.Minv, cld.T
    N = x.shape[0]

    def f(tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xx, vv = y[0], y[1]
        # The adaptive solver already syncs on its error norm; reading tau here costs nothing more.
        # dopri5's initial step-size probe may evaluate past the end (tau > T - eps_s): clamp
        # into the model's time range; the probe only sizes the first step.
        t = min(max(T - float(tau), cld.config.sampling_eps), T)
        b = float(cld.beta(t))
        s = model.cld.score_from_alpha(
            vv, t, model.alpha(xx, vv, torch.full((N,), t, dtype=torch.float32, device=x.device)),
            model.mixed_score)
        return torch.stack([-b * Minv * vv, b * xx + b * Gamma * Minv * vv + Gamma * b * s])

    y1, nfe = solve(f, torch.stack([x, v]), 0.0, T - cld.config.sampling_eps, rtol=rtol,
                    atol=atol, method=method)
    x1, v1 = y1[0].contiguous(), y1[1].contiguous()
    last = _table(model, "ode", "adaptive", [denoise_row(model)])
    nfe += plans.run(last, model.alpha, x1, v1, seed=None)
    return SampleResult(x1, nfe)


#-----------------------------------------------------------------------------------------------
# The family's sampling declaration (samplers/__init__.py Sampling).

def _prior(model, num: int, seed: int, device):
    return prior(model.cld, num, model.data_shape, torch.Generator(device).manual_seed(seed),
                 device)


def _bind(model, parts):
    x, v = parts
    return (x.clone(), v.clone()), model.alpha


SAMPLING = Sampling(
    family="cld",
    samplers={"sscs": Sampler("sscs", 50, ("schedule", "midpoint", "fused", "num_stab")),
              "em": Sampler("em", 50, ("schedule",)),
              "ode": Sampler("ode", None, ("rtol", "atol", "method"), plan=False)},
    prior=_prior, plan=table, bind=_bind,
    adaptive=_driver.adaptive_samplers("cld", ode=sample_ode),
    finish=lambda model, x: model.to_data(x),
    prior_scales=lambda model: (1.0, math.sqrt(model.cld.M)))

# sample(model, name, steps, num, seed, device, batch=None, progress=False, **opts): the one driver.
sample = functools.partial(_driver.sample, SAMPLING)
