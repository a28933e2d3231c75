"""Variance-preserving SDEs and the discrete schedules derived from them.

References: reference/ddgan.md sec. 1 (VP-SDE with linear beta, DDGAN's T-step schedule and
posterior), reference/lsgm.md sec. 2 (geometric VP-SDE). Every scalar formula is evaluated in
float64; tensor maps (drifts, q_sample, posterior_sample) run in the dtype of their tensor input.

Time conventions used throughout fastsample.sde:
- forward time t in [0, T] (data at t = 0);
- reverse time tau = T - t, the clock of the samplers. `reverse_drift` and `ode_drift` return
  d x / d tau, so an Euler step of size h > 0 in tau is x + h * drift (cld.md sec. 4 uses the same
  convention for CLD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# Argument helpers shared by vp.py and cld.py.


def as_float64(t, name: str = "t") -> torch.Tensor:
    """t (python number or tensor) -> float64 tensor; NaN/inf raise ValueError naming `name`."""
    if isinstance(t, torch.Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name}: expected a real tensor, got dtype {t.dtype}")
        out = t.to(F64)
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        out = torch.tensor(float(t), dtype=F64)
    else:
        raise ValueError(f"{name}: expected a float or a float64 tensor, got {type(t).__name__}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name}: must be finite, got {out.tolist()}")
    return out


def check_time(t, T: float, name: str = "t") -> torch.Tensor:
    """as_float64 plus the range check 0 <= t <= T."""
    out = as_float64(t, name)
    if bool((out < 0).any()) or bool((out > T).any()):
        raise ValueError(f"{name}: must lie in [0, T={T}], got {out.tolist()}")
    return out


def batch_coeff(coef: torch.Tensor, x: torch.Tensor, name: str = "t") -> torch.Tensor:
    """Shape a float64 scalar or (N,) coefficient to broadcast over x (N, ...) in x's dtype."""
    if coef.dim() == 0:
        return coef.to(dtype=x.dtype, device=x.device)
    if coef.dim() != 1 or x.dim() == 0 or coef.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected a scalar or shape ({x.shape[0] if x.dim() else '?'},) "
                         f"matching the batch of x {tuple(x.shape)}, got shape {tuple(coef.shape)}")
    return coef.to(dtype=x.dtype, device=x.device).reshape((-1,) + (1,) * (x.dim() - 1))


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {tuple(b.shape)} must equal {name_a}'s {tuple(a.shape)}")


# ---------------------------------------------------------------------------------------------
# Continuous VP-SDEs: dx = -beta(t)/2 x dt + sqrt(beta(t)) dW.


class _VPMethods:
    """Methods shared by every VP-SDE; subclasses supply int_beta and std2 (sigma_t^2)."""

    T: float

    def log_mean_coeff(self, t) -> torch.Tensor:
        """log m_t = -B(t)/2."""
        return -0.5 * self.int_beta(t)

    def mean_coeff(self, t) -> torch.Tensor:
        """m_t = exp(-B(t)/2)."""
        return torch.exp(self.log_mean_coeff(t))

    def std(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - m_t^2)."""
        return torch.sqrt(self.std2(t))

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_t, sigma_t) of q(x_t | x_0) = N(m_t x_0, sigma_t^2 I)."""
        return self.mean_coeff(t), self.std(t)

    def diffusion(self, t) -> torch.Tensor:
        """g(t) = sqrt(beta(t))."""
        return torch.sqrt(self.beta(t))

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """Forward drift f(x, t) = -beta(t)/2 x. x: (N, ...); t: scalar or (N,)."""
        return -0.5 * batch_coeff(self.beta(t), x) * x

    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        """Reverse SDE drift d x / d tau = -f(x, t) + g(t)^2 score, tau = T - t (plus g dW)."""
        _check_same_shape(x, score, "x", "score")
        beta = batch_coeff(self.beta(t), x)
        return 0.5 * beta * x + beta * score

    def ode_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        """Probability-flow ODE d x / d tau = -f(x, t) + g(t)^2 score / 2, tau = T - t."""
        _check_same_shape(x, score, "x", "score")
        beta = batch_coeff(self.beta(t), x)
        return 0.5 * beta * (x + score)


@dataclass(frozen=True)
class VPSDE(_VPMethods):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (ddgan.md sec. 1)."""

    beta_min: float = 0.1   # beta(0)
    beta_max: float = 20.0  # beta(1); beta is linear in t
    T: float = 1.0          # end of forward time

    def __post_init__(self):
        for name in ("beta_min", "beta_max", "T"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"VPSDE.{name}: must be a finite positive number, got {v!r}")
        if self.beta_max < self.beta_min:
            raise ValueError(f"VPSDE: beta_max={self.beta_max} must be >= beta_min={self.beta_min}")

    def beta(self, t) -> torch.Tensor:
        t = check_time(t, self.T)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t) -> torch.Tensor:
        """B(t) = integral_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2."""
        t = check_time(t, self.T)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def std2(self, t) -> torch.Tensor:
        """sigma_t^2 = 1 - exp(-B) via -expm1, exact to fp64 rounding even for tiny t."""
        return -torch.expm1(-self.int_beta(t))


@dataclass(frozen=True)
class GeometricVPSDE(_VPMethods):
    """VP-SDE whose variance grows geometrically (lsgm.md sec. 2).

    sigma^2(t) = sigma2_min (sigma2_max / sigma2_min)^t and m_t = sqrt(1 - sigma^2(t)). The matching
    rate is beta(t) = d/dt [-log(1 - sigma^2(t))] = sigma^2(t) log(sigma2_max/sigma2_min) / (1 - sigma^2(t)).
    B(t) := -log(1 - sigma^2(t)) is the rate integrated from the (virtual) time where sigma^2 = 0,
    so B(0) = -log(1 - sigma2_min) > 0: the process at t = 0 already carries variance sigma2_min,
    and the transition from s to t is N(m_t/m_s x_s, 1 - m_t^2/m_s^2), as for any VP-SDE.
    """

    sigma2_min: float = 3e-5   # sigma^2(0)
    sigma2_max: float = 0.999  # sigma^2(T)
    T: float = 1.0             # end of forward time

    def __post_init__(self):
        for name in ("sigma2_min", "sigma2_max"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"GeometricVPSDE.{name}: must lie in (0, 1), got {v!r}")
        if not self.sigma2_min < self.sigma2_max:
            raise ValueError(f"GeometricVPSDE: sigma2_min={self.sigma2_min} must be < "
                             f"sigma2_max={self.sigma2_max}")
        if not (isinstance(self.T, (int, float)) and math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"GeometricVPSDE.T: must be a finite positive number, got {self.T!r}")

    @property
    def log_ratio(self) -> float:
        """log(sigma2_max / sigma2_min) per unit of t/T."""
        return math.log(self.sigma2_max / self.sigma2_min)

    def std2(self, t) -> torch.Tensor:
        t = check_time(t, self.T)
        return self.sigma2_min * torch.exp(self.log_ratio * t / self.T)

    def int_beta(self, t) -> torch.Tensor:
        """B(t) = -log(1 - sigma^2(t)) (see the class docstring for the origin of B)."""
        return -torch.log1p(-self.std2(t))

    def beta(self, t) -> torch.Tensor:
        s2 = self.std2(t)
        return s2 * (self.log_ratio / self.T) / (1.0 - s2)


# ---------------------------------------------------------------------------------------------
# Discrete schedules (DDPM notation): alpha_bar[i] = prod_{j<=i} alpha[j], x_0 = clean data.
# Arrays are indexed by the step number i = 0..N directly. Per-step quantities (alpha, beta,
# c0, c1, sigma2_post, log_sigma2_post) belong to the transition i-1 -> i and exist for
# i = 1..N; their index 0 holds NaN so that an off-by-one shows up loudly.

LOG_VAR_CLAMP = 1e-20  # ddgan.md sec. 1: the posterior log-variance is clamped at log(1e-20)


def _posterior_tables(alpha_bar: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step alpha, beta and q(x_{i-1} | x_i, x_0) coefficients from alpha_bar (N+1,)."""
    nan = torch.full((1,), float("nan"), dtype=F64)
    ab, ab_prev = alpha_bar[1:], alpha_bar[:-1]
    alpha = ab / ab_prev
    beta = 1.0 - alpha
    c0 = beta * torch.sqrt(ab_prev) / (1.0 - ab)
    c1 = (1.0 - ab_prev) * torch.sqrt(alpha) / (1.0 - ab)
    sigma2_post = beta * (1.0 - ab_prev) / (1.0 - ab)
    log_sigma2_post = torch.log(torch.clamp(sigma2_post, min=LOG_VAR_CLAMP))
    return {k: torch.cat([nan, v]) for k, v in dict(
        alpha=alpha, beta=beta, c0=c0, c1=c1, sigma2_post=sigma2_post,
        log_sigma2_post=log_sigma2_post).items()}


def _table_field():
    return field(init=False, repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class _DiscreteMethods:
    """Tables and tensor maps shared by DDGANSchedule and DDPMSchedule (float64 tables of
    length N+1 filled by each subclass's __post_init__; any-dtype tensor maps)."""

    t: torch.Tensor = _table_field()
    alpha_bar: torch.Tensor = _table_field()
    alpha: torch.Tensor = _table_field()
    beta: torch.Tensor = _table_field()
    c0: torch.Tensor = _table_field()
    c1: torch.Tensor = _table_field()
    sigma2_post: torch.Tensor = _table_field()
    log_sigma2_post: torch.Tensor = _table_field()

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.shape[0] - 1

    def _index(self, i, x: torch.Tensor, lo: int, name: str = "i") -> torch.Tensor:
        """Validate step index i (int or (N,) integer tensor) in [lo, num_steps]."""
        if isinstance(i, bool) or not isinstance(i, (int, torch.Tensor)):
            raise ValueError(f"{name}: expected an int or an integer tensor, got {type(i).__name__}")
        idx = torch.as_tensor(i)
        if idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"{name}: expected integer step indices, got dtype {idx.dtype}")
        if bool((idx < lo).any()) or bool((idx > self.num_steps).any()):
            raise ValueError(f"{name}: step index must lie in [{lo}, {self.num_steps}], "
                             f"got {idx.tolist()}")
        if idx.dim() > 1 or (idx.dim() == 1 and (x.dim() == 0 or idx.shape[0] != x.shape[0])):
            raise ValueError(f"{name}: expected an int or shape ({x.shape[0]},) for x of shape "
                             f"{tuple(x.shape)}, got shape {tuple(idx.shape)}")
        return idx.to(torch.long).cpu()

    def q_sample(self, x0: torch.Tensor, i, noise: torch.Tensor) -> torch.Tensor:
        """x_i = sqrt(alpha_bar_i) x0 + sqrt(1 - alpha_bar_i) noise; i in 0..N (int or (N,))."""
        _check_same_shape(x0, noise, "x0", "noise")
        idx = self._index(i, x0, 0)
        ab = self.alpha_bar[idx]
        return batch_coeff(torch.sqrt(ab), x0, "i") * x0 + batch_coeff(torch.sqrt(1 - ab), x0, "i") * noise

    def q_step(self, x_prev: torch.Tensor, i, noise: torch.Tensor) -> torch.Tensor:
        """x_i ~ q(x_i | x_{i-1}) = N(sqrt(alpha_i) x_{i-1}, beta_i I); i in 1..N."""
        _check_same_shape(x_prev, noise, "x_prev", "noise")
        idx = self._index(i, x_prev, 1)
        return (batch_coeff(torch.sqrt(self.alpha[idx]), x_prev, "i") * x_prev
                + batch_coeff(torch.sqrt(self.beta[idx]), x_prev, "i") * noise)

    def posterior_mean(self, x0: torch.Tensor, x_i: torch.Tensor, i) -> torch.Tensor:
        """Mean c0_i x0 + c1_i x_i of q(x_{i-1} | x_i, x0); i in 1..N."""
        _check_same_shape(x0, x_i, "x0", "x_i")
        idx = self._index(i, x0, 1)
        return batch_coeff(self.c0[idx], x0, "i") * x0 + batch_coeff(self.c1[idx], x0, "i") * x_i

    def posterior_sample(self, x0: torch.Tensor, x_i: torch.Tensor, i, noise: torch.Tensor) -> torch.Tensor:
        """x_{i-1} ~ q(x_{i-1} | x_i, x0); i in 1..N. At i = 1 the mean is returned (no noise)."""
        _check_same_shape(x0, noise, "x0", "noise")
        idx = self._index(i, x0, 1)
        # sigma2_post_1 = 0 exactly since alpha_bar_0 = 1; the mask makes the last step noise-free
        # regardless of the log clamp.
        std = torch.exp(0.5 * self.log_sigma2_post[idx]) * (idx > 1).to(F64)
        return self.posterior_mean(x0, x_i, i) + batch_coeff(std, x0, "i") * noise


@dataclass(frozen=True, eq=False)
class DDGANSchedule(_DiscreteMethods):
    """DDGAN's T-step discretisation of the linear VP-SDE (ddgan.md sec. 1).

    t[i] = eps + (1 - eps) (i / T)^t_power for i = 0..T (t_power = 1: ddgan.md's uniform grid;
    > 1 moves the steps towards the data, so the last step starts from a less noisy x_1).
    alpha_bar[0] = 1 (x_0 is the clean data) and, for i >= 1,
    alpha_bar[i] = (1 - sigma^2(t_i)) / (1 - sigma^2(t_0)). This is ddgan.md's
    1 - sigma^2(t_i) renormalised by 1 - sigma^2(eps) (~1 - 1e-4), so that alpha_bar is exactly the
    product of the per-step alphas and q(x_i | x_0) agrees with the chain of q(x_j | x_{j-1});
    the per-step alpha_i = alpha_bar_i / alpha_bar_{i-1} for i >= 2 are exactly the doc's.
    Tables (float64, length T+1; index 0 of the per-step tables is NaN): t, alpha_bar, alpha,
    beta, c0, c1, sigma2_post, log_sigma2_post (log clamped at log 1e-20).
    """

    T: int = 4              # number of denoising steps (the generator is called T times)
    eps: float = 1e-3       # forward time of the least-noisy level x_0
    beta_min: float = 0.1   # VP-SDE beta(0)
    beta_max: float = 20.0  # VP-SDE beta(1)
    t_power: float = 1.0    # grid warp: t_i = eps + (1 - eps) (i / T)^t_power

    def __post_init__(self):
        if isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"DDGANSchedule.T: must be an int >= 1, got {self.T!r}")
        if isinstance(self.t_power, bool) or not isinstance(self.t_power, (int, float)) \
                or not 0 < self.t_power < math.inf:
            raise ValueError(f"DDGANSchedule.t_power: must be a finite number > 0, "
                             f"got {self.t_power!r}")
        if not (isinstance(self.eps, (int, float)) and 0 <= self.eps < 1):
            raise ValueError(f"DDGANSchedule.eps: must lie in [0, 1), got {self.eps!r}")
        sde = VPSDE(self.beta_min, self.beta_max, 1.0)
        if self.t_power == 1:
            # The expression every released checkpoint's tables were built with, bit for bit.
            t = self.eps + (1.0 - self.eps) * torch.arange(self.T + 1, dtype=F64) / self.T
        else:
            u = torch.arange(self.T + 1, dtype=F64) / self.T
            t = self.eps + (1.0 - self.eps) * u ** float(self.t_power)
        # log(1 - sigma^2(t)) = -B(t), so the renormalised alpha_bar is exp(-(B(t_i) - B(t_0))).
        alpha_bar = torch.exp(-(sde.int_beta(t) - sde.int_beta(t[0])))
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "alpha_bar", alpha_bar)
        for k, v in _posterior_tables(alpha_bar).items():
            object.__setattr__(self, k, v)


def ddgan_schedule(T: int, eps: float = 1e-3, beta_min: float = 0.1,
                   beta_max: float = 20.0, t_power: float = 1.0) -> DDGANSchedule:
    """DDGAN schedule with T steps (ddgan.md sec. 1); see DDGANSchedule."""
    return DDGANSchedule(T=T, eps=eps, beta_min=beta_min, beta_max=beta_max, t_power=t_power)


@dataclass(frozen=True, eq=False)
class DDPMSchedule(_DiscreteMethods):
    """Discrete linear-beta DDPM schedule from the same VP-SDE (Ho et al. / Song et al. convention).

    beta_i = (beta_min + (beta_max - beta_min) (i - 1) / (N - 1)) / N for i = 1..N, i.e. beta(t)/N
    sampled on the grid t = (i - 1)/(N - 1); at N = 1000 this is DDPM's linspace(1e-4, 0.02).
    alpha_i = 1 - beta_i, alpha_bar[i] = prod_{j<=i} alpha_j, alpha_bar[0] = 1. The network sees
    t[i] = i / N. Tables as in DDGANSchedule (length N+1, index 0 of per-step tables NaN).
    """

    num_steps: int = 1000   # N (shadows the base-class property with the same meaning)
    beta_min: float = 0.1   # N * beta_1
    beta_max: float = 20.0  # N * beta_N

    def __post_init__(self):
        N = self.num_steps
        if isinstance(N, bool) or not isinstance(N, int) or N < 2:
            raise ValueError(f"DDPMSchedule.num_steps: must be an int >= 2, got {N!r}")
        if not (0 < self.beta_min <= self.beta_max < N):
            raise ValueError(f"DDPMSchedule: need 0 < beta_min={self.beta_min} <= "
                             f"beta_max={self.beta_max} < num_steps={N}")
        beta = (self.beta_min + (self.beta_max - self.beta_min)
                * torch.arange(N, dtype=F64) / (N - 1)) / N
        alpha_bar = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1.0 - beta, 0)])
        object.__setattr__(self, "t", torch.arange(N + 1, dtype=F64) / N)
        object.__setattr__(self, "alpha_bar", alpha_bar)
        for k, v in _posterior_tables(alpha_bar).items():
            object.__setattr__(self, k, v)

    def ddim_coeffs(self, i: int, j: int, eta: float = 0.0) -> tuple[float, float, float]:
        """DDIM step x_i -> x_j (j < i) given eps_hat: x_j = a x_i + b eps_hat + c z.

        From x0_hat = (x_i - sqrt(1 - ab_i) eps_hat) / sqrt(ab_i) and
        x_j = sqrt(ab_j) x0_hat + sqrt(1 - ab_j - s^2) eps_hat + s z with
        s = eta sqrt((1 - ab_j)/(1 - ab_i)) sqrt(1 - ab_i/ab_j) (Song et al. 2021, eq. 12/16).
        """
        if not (isinstance(i, int) and isinstance(j, int) and 0 <= j < i <= self.num_steps):
            raise ValueError(f"ddim_coeffs: need ints 0 <= j < i <= {self.num_steps}, got i={i!r}, j={j!r}")
        if not (0.0 <= eta <= 1.0):
            raise ValueError(f"ddim_coeffs: eta must lie in [0, 1], got {eta!r}")
        ab_i, ab_j = float(self.alpha_bar[i]), float(self.alpha_bar[j])
        s = eta * math.sqrt((1 - ab_j) / (1 - ab_i) * (1 - ab_i / ab_j))
        a = math.sqrt(ab_j / ab_i)
        b = math.sqrt(max(1 - ab_j - s * s, 0.0)) - a * math.sqrt(1 - ab_i)
        return a, b, s
