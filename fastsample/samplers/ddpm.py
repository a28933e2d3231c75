"""Samplers of the VP-SDE / DDPM baseline: ancestral, DDIM, Euler–Maruyama, probability-flow ODE,
and the peer samplers (diffusers' DPM-Solver++ 2M, UniPC, Euler, Heun) driving the same net.

References: Ho et al. 2020 (ancestral sampling, Algorithm 2), Song et al. 2021a (DDIM, eq. 12),
Song et al. 2021b (reverse VP-SDE and its probability-flow ODE); the VP-SDE formulas are those of
fastsample.sde.vp (reference/ddgan.md sec. 1). Every stochastic or deterministic step has the one
affine form x <- c_x x + c_e eps_theta + sigma n and goes through dispatch.vp_em_step_.

The model interface the samplers need (fastsample.models.ddpm.Model, or a test's exact-score fake):
    model.eps(x, t)   eps-prediction, x (B, ...) and t (B,) float32 continuous time -> like x;
                      the score is -eps / sigma_t
    model.sde         the VPSDE (beta_min, beta_max) the model was trained with
    model.t_eps       smallest training time; EM and ODE integrate from t = 1 down to it
    model.N           size of the discrete DDPM schedule (1000): DDPMSchedule(N) from the same SDE
    model.shape       shape of one sample, e.g. (1, 8, 8) or (2,)
    model.to_data(x)  model space [-1, 1] -> data space

Time of the net on the discrete schedule: DDPMSchedule's alpha_bar_i is not exactly m(i/N)^2 of the
continuous SDE (sigma differs by ~5% at i = 1), while the net was trained on continuous (m_t,
sigma_t). We therefore query the net at the continuous time whose m_t^2 equals alpha_bar_i
(`matched_times`), so eps_theta(x, t) is the noise the discrete update assumes; it lies within
1/(2N) of i/N.

Noise: every step with noise draws from the Philox stream (seed, offset + k * stride + element),
so within one call the steps use disjoint counter ranges; `sample` passes stride = all samples'
numel and offset = the batch's first element, so sample j's noise does not depend on the batch
size (on the Triton path; the CPU twins key a generator by (seed, offset) instead).
"""

from __future__ import annotations

import functools
import math

import torch

from fastsample import samplers as _driver
from fastsample.samplers import (MissingExtra, SampleResult, Sampler, Sampling, check_steps,
                                 seed_tensor)
from fastsample.samplers import ode as ode_solver
from fastsample.samplers import plan as plans
from fastsample.sde.vp import VPSDE, DDPMSchedule

SAMPLERS = ("ancestral", "ddim", "em", "ode")
SCHEDULES = ("uniform", "quadratic")

#-----------------------------------------------------------------------------------------------
# Schedules and per-step scalars (float64, on the host, once per call).


def matched_times(sde: VPSDE, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Continuous t with m_t^2 = alpha_bar, i.e. B(t) = -log alpha_bar, B(t) = b0 t + (b1-b0) t^2/2.

    Root of the quadratic in the cancellation-free form t = 2B / (b0 + sqrt(b0^2 + 2 (b1-b0) B)).
    Clamped to T = 1: the discrete chain's last alpha_bar is a little below m_1^2 (its
    -log(1 - beta_i) exceeds beta_i), which would ask for t ~ 1.003, outside training; at that
    noise level (m ~ 0.006) the difference is invisible."""
    B = -torch.log(alpha_bar.to(torch.float64))
    b0, db = sde.beta_min, sde.beta_max - sde.beta_min
    return (2.0 * B / (b0 + torch.sqrt(b0 * b0 + 2.0 * db * B))).clamp(max=sde.T)


def subsequence(N: int, steps: int, schedule: str = "uniform") -> list[int]:
    """Increasing step indices 0 = i_0 < i_1 < ... < i_steps = N of the N-step DDPM schedule.

    uniform: i_k = round(k N / steps); quadratic (DDIM's, denser near the data):
    i_k = k + round((k / steps)^2 (N - steps)), strictly increasing for any steps <= N."""
    check_steps(steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose {'|'.join(SCHEDULES)}")
    if steps > N:
        raise ValueError(f"steps={steps} exceeds the {N}-step DDPM schedule; choose steps <= {N}")
    if schedule == "uniform":
        return [round(k * N / steps) for k in range(steps + 1)]
    return [k + round((k / steps) ** 2 * (N - steps)) for k in range(steps + 1)]


def ddim_plan(model, steps: int, schedule: str = "uniform", eta: float = 0.0,
              N: int | None = None) -> list[tuple[float, float, float, float]]:
    """Per step (t_net, c_x, c_e, sigma) from index i_{k} down to i_{k-1}, first step first.

    eta = 0: DDIM; eta = 1: the DDPM ancestral posterior q(x_j | x_i, x0_hat) (Song et al. 2021a,
    sec. 4.1), whose last step (to alpha_bar_0 = 1) has sigma = 0 and returns x0_hat."""
    N = model.N if N is None else N
    sched = DDPMSchedule(N, model.sde.beta_min, model.sde.beta_max)
    t_net = matched_times(model.sde, sched.alpha_bar)
    idx = subsequence(N, steps, schedule)
    plan = []
    for i, j in zip(idx[:0:-1], idx[-2::-1]):
        a, b, s = sched.ddim_coeffs(i, j, eta)
        plan.append((float(t_net[i]), a, b, s))
    return plan


def em_plan(model, steps: int) -> list[tuple[float, float, float, float]]:
    """Euler–Maruyama on the reverse VP-SDE, uniform grid t_k = 1 - k h, h = (1 - t_eps)/steps:
    x <- x + h (beta/2 x + beta score) + sqrt(beta h) n with score = -eps/sigma_t, i.e.
    c_x = 1 + beta h / 2, c_e = -beta h / sigma_t, noise sqrt(beta h). The last step omits the
    noise (its mean is the sample, as in Song et al. 2021b), so the output is not blurred by the
    step's own sqrt(beta h) ~ 0.5% of noise."""
    check_steps(steps)
    sde, t_eps = model.sde, float(model.t_eps)
    h = (1.0 - t_eps) / steps
    t = 1.0 - h * torch.arange(steps, dtype=torch.float64)
    beta = sde.beta(t)
    sigma_t = sde.std(t)
    plan = []
    for k in range(steps):
        bk, sk = float(beta[k]), float(sigma_t[k])
        noise = 0.0 if k == steps - 1 else math.sqrt(bk * h)
        plan.append((float(t[k]), 1.0 + 0.5 * bk * h, -bk * h / sk, noise))
    return plan


#-----------------------------------------------------------------------------------------------
# The samplers: one loop over a precomputed plan, and the ODE.


def _check_x(model, x_T: torch.Tensor) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating tensor, got {type(x_T).__name__}")
    shape = tuple(model.shape)
    if x_T.dim() != len(shape) + 1 or tuple(x_T.shape[1:]) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected (B, {', '.join(map(str, shape))})")


def as_table(model, sampler: str, plan) -> plans.Table:
    """A list of (t, c_x, c_e, sigma) steps as an affine1 plan."""
    shape = tuple(model.shape)
    header = {"family": ("ddpm",), "sampler": (sampler,), "nfe": (len(plan),),
              "data_shape": shape,
              "postprocess": (plans.postprocess_name(shape, getattr(model, "dataset", "")),)}
    return plans.Table(header, plans.AFFINE1_COLUMNS,
                       [tuple(float(c) for c in p) for p in plan])


@torch.no_grad()
def run_plan(model, x_T: torch.Tensor, plan, *, seed: int = 0, offset: int = 0,
             stride: int | None = None, sampler: str = "plan") -> SampleResult:
    """x <- c_x x + c_e eps_theta(x, t) + sigma n for each (t, c_x, c_e, sigma) of `plan`, by
    the one plan loop (samplers/plan.py); nfe = len(plan), counted."""
    _check_x(model, x_T)
    x = x_T.clone()
    nfe = plans.run(as_table(model, sampler, plan), _driver.eps_net(model.eps), x,
                    seed=seed_tensor(seed, x.device), offset=offset, stride=stride)
    return SampleResult(x, nfe)


def ancestral_plan(model, steps: int | None = None):
    """DDPM ancestral steps (Ho et al. 2020, Alg. 2) on DDPMSchedule(model.N): steps = N the
    full chain; steps < N the posterior between the indices of a uniform subsequence (DDIM with
    eta = 1); steps > N the full chain of DDPMSchedule(steps)."""
    steps = model.N if steps is None else check_steps(steps)
    if steps > model.N:
        return ddim_plan(model, steps, "uniform", eta=1.0, N=steps)
    return ddim_plan(model, steps, "uniform", eta=1.0)


def table(model, sampler: str, steps: int | None, schedule: str = "uniform",
          eta: float = 0.0) -> plans.Table:
    """The plan of a fixed-step DDPM sampler (ancestral | ddim | em)."""
    if sampler == "ancestral":
        return as_table(model, sampler, ancestral_plan(model, steps))
    if sampler == "ddim":
        return as_table(model, sampler, ddim_plan(model, check_steps(steps), schedule, eta))
    if sampler == "em":
        return as_table(model, sampler, em_plan(model, check_steps(steps)))
    raise ValueError(f"ddpm sampler {sampler!r} has no fixed plan; choose ancestral|ddim|em")


def sample_ancestral(model, x_T: torch.Tensor, steps: int | None = None, *, seed: int = 0,
                     offset: int = 0, stride: int | None = None) -> SampleResult:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on DDPMSchedule(model.N).

    steps = model.N (default): the full chain. steps < N: the posterior between the indices of a
    uniform subsequence (DDIM with eta = 1). steps > N: the full chain of DDPMSchedule(steps)."""
    return run_plan(model, x_T, ancestral_plan(model, steps), seed=seed, offset=offset,
                    stride=stride)


def sample_ddim(model, x_T: torch.Tensor, steps: int, *, schedule: str = "uniform",
                eta: float = 0.0, seed: int = 0, offset: int = 0,
                stride: int | None = None) -> SampleResult:
    """DDIM (Song et al. 2021a, eq. 12) on a uniform or quadratic subsequence of DDPMSchedule(N);
    eta = 0 (default) is deterministic given x_T."""
    plan = ddim_plan(model, check_steps(steps), schedule, eta)
    return run_plan(model, x_T, plan, seed=seed, offset=offset, stride=stride)


def sample_em(model, x_T: torch.Tensor, steps: int, *, seed: int = 0, offset: int = 0,
              stride: int | None = None) -> SampleResult:
    """Euler–Maruyama on the reverse VP-SDE from t = 1 to model.t_eps (see em_plan)."""
    return run_plan(model, x_T, em_plan(model, check_steps(steps)), seed=seed, offset=offset,
                    stride=stride)


@torch.no_grad()
def sample_ode(model, x_T: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
               method: str = "dopri5") -> SampleResult:
    """Probability-flow ODE dx/dt = -beta(t)/2 (x + score) = -beta(t)/2 (x - eps/sigma_t), solved
    adaptively from t = 1 to model.t_eps; nfe = the solver's counted net calls (incl. rejected
    steps). Adaptive stepping reads the error norm on the host: this sampler syncs by nature."""
    _check_x(model, x_T)
    B = x_T.shape[0]
    b0, db = model.sde.beta_min, model.sde.beta_max - model.sde.beta_min

    t_lo, t_hi = float(model.t_eps), float(model.sde.T)

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # t: 0-d float64 on x's device; the scalars stay float64 until they meet x. The solver
        # probes outside [t_eps, 1]: its initial step-size guess 0.01 |x| / |f| is huge at t = 1,
        # where p_1 ~ N(0, I) makes the drift nearly 0, and its last step may overshoot t_eps
        # before interpolating back. Freezing the field at the ends keeps those probes finite
        # (sigma_t -> 0 below t_eps) and leaves the ODE on [t_eps, 1] unchanged.
        t = t.clamp(t_lo, t_hi)
        beta_t = b0 + db * t
        sigma_t = torch.sqrt(-torch.expm1(-(b0 * t + 0.5 * db * t * t)))
        eps = model.eps(x, t.to(torch.float32).expand(B)).to(x.dtype)
        return (-0.5 * beta_t * x + 0.5 * (beta_t / sigma_t) * eps).to(x.dtype)

    x0, nfe = ode_solver.solve(f, x_T.clone(), 1.0, float(model.t_eps), rtol=rtol, atol=atol,
                               method=method)
    return SampleResult(x0, nfe)


#-----------------------------------------------------------------------------------------------
# Peer samplers: diffusers' schedulers driving the same eps-net (the optional `baselines` extra).
#
# The samplers users would pick instead of ours. diffusers is called, never copied; this block
# only maps our model onto a scheduler:
# - schedule: trained_betas = DDPMSchedule(model.N)'s betas, so diffusers' alphas_cumprod[tau]
#   is our alpha_bar[tau + 1] (diffusers' timestep tau = our index i - 1);
# - time of the net: every scheduler here keeps a noise level sigma_k = sqrt((1 - ab) / ab) per
#   model call k, and the solver's update assumes eps at exactly that sigma; our net is
#   continuous in t, so it is queried at the t with m_t^2 = ab = 1 / (1 + sigma_k^2)
#   (matched_times). At an integer timestep tau that is matched_times(alpha_bar[tau + 1]), the
#   time our DDIM uses at index tau + 1; at the fractional timesteps of Euler / Heun and of Karras
#   sigmas it is exact where interpolating tau would not be;
# - state: DPM-Solver++ and UniPC step x itself (the VP state); Euler and Heun step the VE state
#   x / sqrt(ab) (`ve`), and scale_model_input hands the net x again. Our x_T is mapped to
#   sigma_0's VE state exactly (x_T sqrt(1 + sigma_0^2)), not by init_noise_sigma, which is
#   sigma_0 for linspace spacing.
# DDIM is Euler on the VE ODE dx/dsigma = eps (Song et al. 2021a, sec. 4.3), so Euler with our
# DDIM's sigmas, or diffusers' DDIMScheduler where the steps divide N, reproduces sample_ddim on
# the same x_T to float32 rounding (tests/test_peer_samplers.py). NFE is counted per net call:
# Heun's N steps make 2N - 1 (its last step, to sigma = 0, is Euler).

PEERS = {  # our name: (diffusers scheduler class, its config beyond the schedule, ve state)
    "dpmpp2m": ("DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2}, False),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}, False),
    "euler": ("EulerDiscreteScheduler", {}, True),
    "heun": ("HeunDiscreteScheduler", {}, True),
}
BASELINES_HINT = "pip install fastsample[baselines]"


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise MissingExtra(f"the peer samplers ({'|'.join(PEERS)}) drive diffusers' schedulers; "
                          f"diffusers is not installed ({e}); {BASELINES_HINT}") from None
    return diffusers


def has_diffusers() -> bool:
    try:
        _diffusers()
    except MissingExtra:
        return False
    return True


def peer_scheduler(model, name: str, steps: int, karras: bool = False):
    """The diffusers scheduler of peer sampler `name` on model's DDPM schedule, with
    set_timesteps(steps) done; karras: Karras et al. (2022) sigmas between the schedule's ends."""
    if name not in PEERS:
        raise ValueError(f"unknown peer sampler {name!r}; choose {'|'.join(PEERS)}")
    check_steps(steps)
    if not isinstance(karras, bool):
        raise ValueError(f"karras must be True or False, got {karras!r}")
    cls_name, config, _ = PEERS[name]
    sched = DDPMSchedule(model.N, model.sde.beta_min, model.sde.beta_max)
    betas = 1.0 - sched.alpha_bar[1:] / sched.alpha_bar[:-1]
    cls = getattr(_diffusers(), cls_name)
    scheduler = cls(num_train_timesteps=model.N, trained_betas=betas.numpy(),
                    prediction_type="epsilon", use_karras_sigmas=karras, **config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def run_scheduler(model, x_T: torch.Tensor, scheduler, ve: bool) -> SampleResult:
    """x_T (VP state at the scheduler's first noise level) through every timestep of a
    set-up diffusers scheduler with eps = model.eps at the continuous time of the step's noise
    level (the mapping above). Schedulers without per-step sigmas (DDIMScheduler) are mapped by
    their integer timestep: ab = alphas_cumprod[tau]. nfe = net calls, counted."""
    _check_x(model, x_T)
    timesteps = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        # sigmas[k] is the noise level of timesteps[k] (one extra, final sigma); Heun repeats
        # each interior sigma for its corrector call, keeping the same alignment.
        assert len(sigmas) == len(timesteps) + 1, (len(sigmas), len(timesteps))
        alpha_bar = 1.0 / (1.0 + sigmas[:-1].to(torch.float64) ** 2)
    else:
        alpha_bar = scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()]
    t_net = matched_times(model.sde, alpha_bar).to(torch.float32)
    B = x_T.shape[0]
    x = x_T * math.sqrt(1.0 / float(alpha_bar[0])) if ve else x_T.clone()
    nfe = 0
    for k, tau in enumerate(timesteps):
        eps = model.eps(scheduler.scale_model_input(x, tau), t_net[k].expand(B).to(x.device))
        nfe += 1
        x = scheduler.step(eps, tau, x).prev_sample
    return SampleResult(x, nfe)


def sample_peer(model, x_T: torch.Tensor, steps: int, *, name: str,
                karras: bool = False) -> SampleResult:
    """Peer sampler `name` (PEERS) for `steps` scheduler steps from x_T ~ N(0, I)."""
    scheduler = peer_scheduler(model, name, steps, karras)
    return run_scheduler(model, x_T, scheduler, PEERS[name][2])


#-----------------------------------------------------------------------------------------------
# The family's sampling declaration (samplers/__init__.py Sampling).

SAMPLING = Sampling(
    family="ddpm",
    samplers={"ancestral": Sampler("ancestral", 1000), "ddim": Sampler("ddim", 50,
                                                                       ("schedule", "eta")),
              "em": Sampler("em", 1000), "ode": Sampler("ode", None, ("rtol", "atol", "method"),
                                                        plan=False),
              **{name: Sampler(name, 10, ("karras",), plan=False, needs=_diffusers)
                 for name in PEERS}},
    prior=_driver.normal_prior(lambda model: model.shape), plan=table, bind=_driver.bind_eps,
    adaptive=_driver.adaptive_samplers(
        "ddpm", ode=sample_ode,
        **{name: functools.partial(sample_peer, name=name) for name in PEERS}),
    finish=lambda model, x: model.to_data(x))

# sample(model, name, steps, num, seed, device, batch=None, progress=False, **opts): the one driver.
sample = functools.partial(_driver.sample, SAMPLING)
