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

Noise counters: a launch on a batch covering samples [s, s + B) of a run of `total` samples uses
counters offset_k + s * per_sample + i, with offset_k = k * total * per_sample. So on the Triton
path sample i gets the same noise whatever the batch size. The torch twins draw from a
generator keyed by (seed, offset) instead, which keeps the law but not this invariance.
"""

from __future__ import annotations

import math

import torch

from fastsample.kernels import dispatch
from fastsample.samplers import (SampleResult, batch_starts, check_request, check_steps,
                                 seed_tensor)

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


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"schedule {kind!r}; choose {'|'.join(KINDS)}")


def _nfe_budget(steps: int) -> int:
    check_steps(steps)
    if steps < 2:
        raise ValueError(f"steps (NFE) must be >= 2 for CLD: N - 1 >= 1 steps plus the "
                         f"denoising call, got {steps!r}")
    return steps - 1


def _t_column(values: list[float], n: int, x: torch.Tensor) -> torch.Tensor:
    """Per-step forward times as an (S, n) device table built once, so the loop reads a row."""
    t = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    return t.to(x.device)[:, None].expand(len(values), n)


def _A(step) -> tuple[tuple, tuple]:
    """A LinearStep as the kernels' (T, K) tuples."""
    return (step.T_xx, step.T_xv, step.T_vx, step.T_vv), (step.K11, step.K21, step.K22)


def _em(c) -> dispatch.CLDEMCoeffs:
    """sde.cld's EMStep (x' = x + a_xv v, v' = a_vx x + a_vv v + a_valpha alpha + g n)."""
    assert c.a_xx == 1.0 and c.a_xalpha == 0.0, "CLD's EM step leaves x's own coefficient at 1"
    return dispatch.CLDEMCoeffs(x_v=c.a_xv, v_x=c.a_vx, v_v=c.a_vv, v_alpha=c.a_valpha, noise=c.g)


class _Counter:
    """Philox counter bookkeeping (see the module docstring)."""

    def __init__(self, x: torch.Tensor, noise_offset: int, noise_stride: int | None):
        self.next = noise_offset
        self.stride = x.numel() if noise_stride is None else noise_stride
        if self.stride < x.numel():
            raise ValueError(f"noise_stride {self.stride} must be >= the batch numel {x.numel()}")

    def take(self) -> int:
        off = self.next
        self.next += self.stride
        return off


def _denoise(model, x, v, t_table, seed) -> None:
    """Final EM mean step from forward time sampling_eps to 0 (sec. 5.1): one network call."""
    alpha = model.alpha(x, v, t_table[-1])
    dispatch.cld_em_step_(x, v, alpha, _em(model.cld.denoise_coeffs(model.mixed_score)), seed, 0)


#-----------------------------------------------------------------------------------------------
# SSCS (sec. 5.3).

@torch.no_grad()
def sample_sscs(model, x: torch.Tensor, v: torch.Tensor, steps: int, *, seed: int,
                kind: str = "quadratic", midpoint: bool = False, fused: bool = True,
                num_stab: float = 0.0, noise_offset: int = 0,
                noise_stride: int | None = None) -> SampleResult:
    """Symmetric Splitting CLD Sampler with NFE = steps: steps - 1 SSCS steps + the denoising call.

    x, v: (N, ...) x_T (not modified). fused=True runs S + the composed A halves in one kernel
    per step; fused=False is the reference path A(h/2), S, A(h/2) as separate launches (4 normals
    per element per step instead of 2: same law, other numbers).
    """
    n = _nfe_budget(steps)
    _check_kind(kind)
    _check_state(x, v)
    cld = model.cld
    plan = cld.sscs_plan(n, kind, midpoint=midpoint, mixed_score=model.mixed_score,
                         num_stab=num_stab)
    t_table = _t_column([s.t_s for s in plan.steps] + [plan.denoise.t], x.shape[0], x)
    halves = None
    if not fused:
        T, tau = cld.T, plan.tau

        def half(lo, hi):
            return cld.A_step(float(cld.b_int(T - hi, T - lo)), num_stab)

        halves = [(half(tau[k], tau[k] + 0.5 * s.h), half(tau[k] + 0.5 * s.h, tau[k + 1]))
                  for k, s in enumerate(plan.steps)]
    x, v = x.clone(), v.clone()
    seed_t = seed_tensor(seed, x.device)
    ctr = _Counter(x, noise_offset, noise_stride)
    nfe = 0
    if fused:
        # Lone first half step A(h_0/2).
        dispatch.cld_linear_(x, v, *_A(plan.first_half), seed_t, ctr.take())
        for k, s in enumerate(plan.steps):
            alpha = model.alpha(x, v, t_table[k])
            nfe += 1
            # S update, then A(h_k/2) composed with A(h_{k+1}/2) (the last step: its lone half).
            dispatch.sscs_step_(x, v, alpha, s.k_v, s.k_alpha, *_A(s.A), seed_t, ctr.take())
    else:
        identity = ((1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0))
        for k, s in enumerate(plan.steps):
            dispatch.cld_linear_(x, v, *_A(halves[k][0]), seed_t, ctr.take())
            alpha = model.alpha(x, v, t_table[k])
            nfe += 1
            dispatch.sscs_step_(x, v, alpha, s.k_v, s.k_alpha, *identity, None, 0)
            dispatch.cld_linear_(x, v, *_A(halves[k][1]), seed_t, ctr.take())
    _denoise(model, x, v, t_table, seed_t)
    nfe += 1
    return SampleResult(x, nfe)


#-----------------------------------------------------------------------------------------------
# Euler–Maruyama (sec. 5.2).

@torch.no_grad()
def sample_em(model, x: torch.Tensor, v: torch.Tensor, steps: int, *, seed: int,
              kind: str = "quadratic", noise_offset: int = 0,
              noise_stride: int | None = None) -> SampleResult:
    """Euler–Maruyama on the reverse SDE with NFE = steps: steps - 1 EM steps + denoising."""
    n = _nfe_budget(steps)
    _check_kind(kind)
    _check_state(x, v)
    cld = model.cld
    tau = cld.time_grid(n, kind).tolist()
    coeffs = [cld.em_step_coeffs(tau[k], tau[k + 1] - tau[k], model.mixed_score)
              for k in range(n)]
    t_table = _t_column([c.t for c in coeffs] + [cld.config.sampling_eps], x.shape[0], x)
    em = [_em(c) for c in coeffs]
    x, v = x.clone(), v.clone()
    seed_t = seed_tensor(seed, x.device)
    ctr = _Counter(x, noise_offset, noise_stride)
    nfe = 0
    for k in range(n):
        alpha = model.alpha(x, v, t_table[k])
        nfe += 1
        dispatch.cld_em_step_(x, v, alpha, em[k], seed_t, ctr.take())
    _denoise(model, x, v, t_table, seed_t)
    nfe += 1
    return SampleResult(x, nfe)


#-----------------------------------------------------------------------------------------------
# Probability-flow ODE (sec. 4, 5.4).

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
    t_table = _t_column([cld.config.sampling_eps], N, x1)
    _denoise(model, x1, v1, t_table, seed_tensor(0, x1.device))
    return SampleResult(x1, nfe + 1)


#-----------------------------------------------------------------------------------------------
# One entry point for the CLI.

_OPTS = {"sscs": ("schedule", "midpoint", "fused", "num_stab"),
         "em": ("schedule",),
         "ode": ("rtol", "atol", "method")}


def sample(model, name: str, steps: int, num: int, seed: int, device, batch: int | None = None,
           progress: bool = False, **opts) -> tuple[torch.Tensor, int]:
    """`num` samples in data space (float32) and the NFE per sample.

    x_T comes from torch.Generator(device).manual_seed(seed); batches of `batch` share one
    Philox stream (see the module docstring). steps is the NFE budget N for sscs/em; the ODE is
    adaptive and ignores it. opts: schedule (uniform|quadratic, default quadratic), midpoint,
    fused, num_stab (sscs); rtol, atol, method (ode).
    """
    batch = check_request("cld", name, SAMPLERS, num, batch, seed, opts, _OPTS.get(name, ()))
    check_steps(steps)
    kw = dict(opts)
    if "schedule" in kw:
        kw["kind"] = kw.pop("schedule")
        _check_kind(kw["kind"])
    if name != "ode":
        _nfe_budget(steps)
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    x_T, v_T = prior(model.cld, num, model.data_shape, gen, device)
    per = math.prod(model.data_shape)
    outs, nfe = [], None
    for s in batch_starts(num, batch, progress, f"cld {name}"):
        x, v = x_T[s:s + batch], v_T[s:s + batch]
        if name == "ode":
            res = sample_ode(model, x, v, **kw)
        else:
            fn = sample_sscs if name == "sscs" else sample_em
            res = fn(model, x, v, steps, seed=seed, noise_offset=s * per,
                     noise_stride=num * per, **kw)
        outs.append(model.to_data(res.x0))
        # Adaptive ODE batches may take different step counts: report the largest.
        nfe = res.nfe if nfe is None else max(nfe, res.nfe)
    return torch.cat(outs), nfe
