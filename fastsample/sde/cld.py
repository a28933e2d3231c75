"""Critically-damped Langevin diffusion (CLD): exact kernel, HSM scalars and SSCS step coefficients.

Reference: reference/cld.md (Dockhorn, Vahdat, Kreis, ICLR 2022); section numbers below are cld.md's.
State u = (x, v) per dimension; every dimension is an independent copy of the same 2x2 system.

    forward:  dx = beta(t) Minv v dt,  dv = (-beta(t) x - beta(t) Gamma Minv v) dt + sqrt(2 Gamma beta(t)) dW

Critical damping Gamma = 2/sqrt(Minv) always (never a setting), a = sqrt(Minv) = Gamma Minv / 2.
All scalars (B, Phi, Sigma, Cholesky factors, ell, SSCS maps) are float64; the only tensor maps
here (`perturb`, `prior_sample`, `LinearStep.apply`, drifts) run in their input's dtype.
Forward time t in [0, T]; the samplers' reverse time is tau = T - t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .vp import F64, as_float64, batch_coeff, check_time, _check_same_shape

# E3 switches from expm1 to its Taylor series below this |y| (sec. 2.5).
E3_SERIES_CUTOFF = 0.1
_E3_SERIES_TERMS = 20  # y^3/6 * (1 + y/4 (1 + ... y/20)); truncation < 0.1^17/17!*6, far below fp64


@dataclass(frozen=True)
class CLDConfig:
    """CLD settings; defaults are the paper's CIFAR-10 values (cld.md sec. 1)."""

    Minv: float = 4.0              # inverse mass 1/M; Gamma follows as 2/sqrt(Minv)
    beta0: float = 4.0             # beta(t) = beta0 + beta1 t
    beta1: float = 0.0
    gamma: float = 0.04            # initial velocity v0 ~ N(0, gamma M I)
    numerical_eps: float = 1e-9    # added to Sigma_xx and Sigma_vv before every Cholesky (sec. 2.4)
    T: float = 1.0                 # end of forward time
    sampling_eps: float = 1e-3     # samplers stop at forward time sampling_eps, then denoise to 0
    loss_eps: float = 1e-5         # training draws t ~ U[loss_eps, T]

    def __post_init__(self):
        def finite(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"CLDConfig.{name}: must be a finite number, got {v!r}")
            return v

        for name in ("Minv", "gamma", "T", "beta0"):
            if finite(name) <= 0:
                raise ValueError(f"CLDConfig.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.beta0 + finite("beta1") * self.T <= 0:
            raise ValueError(f"CLDConfig: beta(T) = beta0 + beta1*T = {self.beta0 + self.beta1 * self.T}"
                             f" must be > 0 (beta0={self.beta0}, beta1={self.beta1}, T={self.T})")
        if finite("numerical_eps") < 0:
            raise ValueError(f"CLDConfig.numerical_eps: must be >= 0, got {self.numerical_eps!r}")
        for name in ("sampling_eps", "loss_eps"):
            if not 0 < finite(name) < self.T:
                raise ValueError(f"CLDConfig.{name}: must lie in (0, T={self.T}), got {getattr(self, name)!r}")

    @property
    def M(self) -> float:
        return 1.0 / self.Minv

    @property
    def Gamma(self) -> float:
        """Friction at critical damping, Gamma^2 = 4M."""
        return 2.0 / math.sqrt(self.Minv)

    @property
    def a(self) -> float:
        """Double eigenvalue -a of the per-unit-B drift matrix F."""
        return math.sqrt(self.Minv)


def E3(y) -> torch.Tensor:
    """E3(y) = e^y - 1 - y - y^2/2, by its Taylor series for |y| < 0.1 (sec. 2.5), else expm1."""
    y = as_float64(y, "y")
    small = y.abs() < E3_SERIES_CUTOFF
    ys = torch.where(small, y, torch.zeros_like(y))
    acc = torch.ones_like(y)
    for k in range(_E3_SERIES_TERMS, 3, -1):
        acc = 1.0 + ys / k * acc
    series = ys ** 3 / 6.0 * acc
    yl = torch.where(small, torch.ones_like(y), y)
    return torch.where(small, series, torch.expm1(yl) - yl - 0.5 * yl * yl)


def _noise_cov(y: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise covariance S0 (sec. 2.2) at y = 2 a B >= 0, written without e^{+y} so it never overflows."""
    ey = torch.exp(-y)
    big = y >= E3_SERIES_CUTOFF
    # e^{-y} E3(y) = 1 - e^{-y}(1 + y + y^2/2) for y >= cutoff; the series branch keeps small y exact.
    S0_xx = torch.where(big, -torch.expm1(-y) - ey * (y + 0.5 * y * y), ey * E3(torch.where(big, 0.0, y)))
    S0_xv = ey * y * y / (2.0 * a)
    S0_vv = (-torch.expm1(-y) + ey * (y - 0.5 * y * y)) / (a * a)
    return S0_xx, S0_xv, S0_vv


def _cholesky(Sxx, Sxv, Svv, what: str):
    if bool((Sxx <= 0).any()):
        raise ValueError(f"{what}: Sigma_xx must be > 0 for a Cholesky factor, got min "
                         f"{float(Sxx.min())} (raw kernel at t = 0? use eps > 0 or t > 0)")
    L11 = torch.sqrt(Sxx)
    L21 = Sxv / L11
    L22sq = Svv - L21 * L21
    if bool((L22sq <= 0).any()):
        raise ValueError(f"{what}: Sigma is not positive definite (Sigma_vv - L21^2 = {float(L22sq.min())})")
    return L11, L21, torch.sqrt(L22sq)


# ---------------------------------------------------------------------------------------------
# SSCS records: exact Gaussian linear maps and per-step scalars (sec. 5.3), all python floats
# (float64) so they can go to a kernel as scalars or into a manifest row.


@dataclass(frozen=True)
class LinearStep:
    """u' = T u + K n with n ~ N(0, I_2): x' = T_xx x + T_xv v + K11 n1, v' = T_vx x + T_vv v + K21 n1 + K22 n2.

    C = K K^T is the noise covariance (kept for composition and checks).
    """

    T_xx: float
    T_xv: float
    T_vx: float
    T_vv: float
    K11: float
    K21: float
    K22: float
    C_xx: float
    C_xv: float
    C_vv: float

    def apply(self, x: torch.Tensor, v: torch.Tensor, n1: torch.Tensor | None = None,
              n2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch reference of the map; n1 = n2 = None gives the mean."""
        _check_same_shape(x, v, "x", "v")
        x_new = self.T_xx * x + self.T_xv * v
        v_new = self.T_vx * x + self.T_vv * v
        if n1 is not None:
            _check_same_shape(x, n1, "x", "n1")
            x_new = x_new + self.K11 * n1
            v_new = v_new + self.K21 * n1
        if n2 is not None:
            _check_same_shape(x, n2, "x", "n2")
            v_new = v_new + self.K22 * n2
        return x_new, v_new


def _linear_step(T_xx, T_xv, T_vx, T_vv, C_xx, C_xv, C_vv) -> LinearStep:
    """Build a LinearStep, factoring C; a zero C (b = 0) gives K = 0."""
    if C_xx <= 0.0:
        if C_xx < 0.0 or C_xv != 0.0 or C_vv < 0.0:
            raise ValueError(f"noise covariance not PSD: C = ({C_xx}, {C_xv}, {C_vv})")
        K11, K21, K22 = 0.0, 0.0, math.sqrt(C_vv)
    else:
        K11 = math.sqrt(C_xx)
        K21 = C_xv / K11
        K22sq = C_vv - K21 * K21
        if K22sq < 0.0:
            raise ValueError(f"noise covariance not PSD: C_vv - K21^2 = {K22sq}")
        K22 = math.sqrt(K22sq)
    return LinearStep(T_xx, T_xv, T_vx, T_vv, K11, K21, K22, C_xx, C_xv, C_vv)


def compose(step1: LinearStep, step2: LinearStep) -> LinearStep:
    """step2 after step1 as one exact Gaussian map: T_12 = T_2 T_1, C_12 = T_2 C_1 T_2^T + C_2."""
    a, b, c, d = step2.T_xx, step2.T_xv, step2.T_vx, step2.T_vv
    T_xx = a * step1.T_xx + b * step1.T_vx
    T_xv = a * step1.T_xv + b * step1.T_vv
    T_vx = c * step1.T_xx + d * step1.T_vx
    T_vv = c * step1.T_xv + d * step1.T_vv
    p, q, r = step1.C_xx, step1.C_xv, step1.C_vv
    C_xx = a * a * p + 2 * a * b * q + b * b * r + step2.C_xx
    C_xv = a * c * p + (a * d + b * c) * q + b * d * r + step2.C_xv
    C_vv = c * c * p + 2 * c * d * q + d * d * r + step2.C_vv
    return _linear_step(T_xx, T_xv, T_vx, T_vv, C_xx, C_xv, C_vv)


@dataclass(frozen=True)
class EMStep:
    """Euler–Maruyama step of the reverse SDE with the score expanded (sec. 5.2):

        x' = a_xx x + a_xv v + a_xalpha alpha
        v' = a_vx x + a_vv v + a_valpha alpha + g n,    alpha = net(x, v, t)
    """

    t: float          # forward time the network sees
    a_xx: float
    a_xv: float
    a_xalpha: float   # always 0: the score enters v only
    a_vx: float
    a_vv: float
    a_valpha: float
    g: float          # noise scale; 0 for the final denoising mean step


@dataclass(frozen=True)
class SSCSStep:
    """One fused SSCS step k: S update at forward time t_s, then the A map `A`."""

    k: int
    t_s: float           # forward time given to the network (and to beta, ell, SigmaRef)
    h: float             # reverse-time step size tau_{k+1} - tau_k
    beta: float          # beta(t_s)
    ell: float           # HSM ell(t_s), eps included
    sigma_ref_vv: float  # mixed-score reference Sigma_vv(t_s), eps included
    k_v: float           # v <- k_v v + k_alpha alpha
    k_alpha: float
    A: LinearStep        # composed A(h_k/2) then A(h_{k+1}/2); the lone A(h_{n-1}/2) for the last step


@dataclass(frozen=True)
class SSCSPlan:
    """Everything a fused SSCS sampler consumes, in float64 (sec. 5.1, 5.3).

    Order of operations (u = (x, v) from the prior; n: fresh standard normals each time):
      1. (x, v) <- first_half.apply(x, v, n1, n2)                   # lone A(h_0/2)
      2. for step in steps:                                           # n_steps network calls
           alpha <- net(x, v, step.t_s)
           v <- step.k_v * v + step.k_alpha * alpha                    # S, x unchanged
           (x, v) <- step.A.apply(x, v, n1, n2)                        # fused A halves / last lone half
      3. alpha <- net(x, v, denoise.t)                                 # denoising call (counted in nfe)
         x <- denoise.a_xx * x + denoise.a_xv * v + denoise.a_xalpha * alpha; return x
    denoise.a_xalpha is 0: the returned x does not depend on that last network call. It is kept
    (and counted) to match the official NFE accounting (cld.md sec. 5.1, pitfall 6); a sampler
    may skip it if it reports nfe - 1 honestly.
    """

    kind: str
    midpoint: bool
    mixed_score: bool
    tau: tuple[float, ...]          # reverse-time grid tau_0 = 0 < ... < tau_n = T - sampling_eps
    first_half: LinearStep
    steps: tuple[SSCSStep, ...]
    denoise: EMStep
    nfe: int                        # n_steps + 1

    STEP_COLUMNS = ("t_s", "k_v", "k_alpha", "T_xx", "T_xv", "T_vx", "T_vv", "K11", "K21", "K22")

    def step_table(self) -> torch.Tensor:
        """(n_steps, len(STEP_COLUMNS)) float64 rows, one per fused step, for kernels and manifests."""
        return torch.tensor([[s.t_s, s.k_v, s.k_alpha, s.A.T_xx, s.A.T_xv, s.A.T_vx, s.A.T_vv,
                              s.A.K11, s.A.K21, s.A.K22] for s in self.steps], dtype=F64)


# ---------------------------------------------------------------------------------------------
# The process.

Objective = Literal["hsm", "dsm"]
GridKind = Literal["uniform", "quadratic"]


class CLD:
    """Exact float64 scalar formulas of CLD for one CLDConfig (cld.md sec. 2-5)."""

    def __init__(self, config: CLDConfig | None = None):
        if config is None:
            config = CLDConfig()
        if not isinstance(config, CLDConfig):
            raise ValueError(f"config: expected a CLDConfig, got {type(config).__name__}")
        self.config = config
        self.Minv = config.Minv
        self.M = config.M
        self.Gamma = config.Gamma
        self.a = config.a
        self.T = config.T

    def __repr__(self):
        return f"CLD({self.config!r})"

    # -- schedule -------------------------------------------------------------------------------
    def beta(self, t) -> torch.Tensor:
        t = check_time(t, self.T)
        return self.config.beta0 + self.config.beta1 * t

    def B(self, t) -> torch.Tensor:
        """Integrated rate B(t) = beta0 t + beta1 t^2 / 2."""
        t = check_time(t, self.T)
        return self.config.beta0 * t + 0.5 * self.config.beta1 * t * t

    def b_int(self, t_lo, t_hi) -> torch.Tensor:
        """Integral of beta over forward times [t_lo, t_hi] (the 'b' of an A step)."""
        return self.B(t_hi) - self.B(t_lo)

    # -- kernel (sec. 2) ------------------------------------------------------------------------
    def Phi(self, B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """exp(F B) = e^{-aB} [[1 + aB, Minv B], [-B, 1 - aB]] -> (Phi_xx, Phi_xv, Phi_vx, Phi_vv)."""
        B = as_float64(B, "B")
        a = self.a
        e = torch.exp(-a * B)
        return e * (1 + a * B), e * self.Minv * B, -e * B, e * (1 - a * B)

    E3 = staticmethod(E3)

    def covariance(self, t, s_x=0.0, s_v=None, eps=None):
        """Sigma(t) of u_t given u_0 with Var(x_0) = s_x, Var(v_0) = s_v independent (sec. 2.2).

        s_v=None means gamma*M (HSM). eps=None means config.numerical_eps, added to Sigma_xx and
        Sigma_vv only; eps=0 gives the raw kernel. t, s_x, s_v broadcast together.
        Returns (Sigma_xx, Sigma_xv, Sigma_vv) float64.
        """
        s_x = as_float64(s_x, "s_x")
        s_v = as_float64(self.config.gamma * self.M if s_v is None else s_v, "s_v")
        eps = self.config.numerical_eps if eps is None else eps
        if bool((s_x < 0).any()) or bool((s_v < 0).any()):
            raise ValueError(f"covariance: s_x, s_v must be >= 0, got s_x={s_x.tolist()}, s_v={s_v.tolist()}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"covariance: eps must be a finite float >= 0 or None, got {eps!r}")
        B = self.B(t)
        a = self.a
        S0_xx, S0_xv, S0_vv = _noise_cov(2 * a * B, a)
        e2 = torch.exp(-2 * a * B)
        Sigma_xx = S0_xx + s_v * (self.Minv * B) ** 2 * e2 + s_x * (1 + a * B) ** 2 * e2 + eps
        Sigma_xv = S0_xv + s_v * self.Minv * B * (1 - a * B) * e2 - s_x * B * (1 + a * B) * e2
        Sigma_vv = S0_vv + s_v * (1 - a * B) ** 2 * e2 + s_x * B * B * e2 + eps
        return Sigma_xx, Sigma_xv, Sigma_vv

    def hsm_covariance(self, t):
        """HSM training kernel: s_x = 0, s_v = gamma M, eps included."""
        return self.covariance(t, 0.0, None, None)

    def dsm_covariance(self, t):
        """DSM training kernel: s_x = 0, s_v = 0, eps included."""
        return self.covariance(t, 0.0, 0.0, None)

    def cholesky(self, Sxx, Sxv, Svv):
        """Sigma = L L^T, L = [[L11, 0], [L21, L22]] (sec. 2.3) -> (L11, L21, L22)."""
        return _cholesky(as_float64(Sxx, "Sxx"), as_float64(Sxv, "Sxv"), as_float64(Svv, "Svv"), "cholesky")

    def ell(self, t, objective: Objective = "hsm") -> torch.Tensor:
        """ell_t = 1/L22 of the training kernel, eps included; grad_v log p(u_t | .) = -ell_t eps_v."""
        Sigma = self._kernel(t, objective)
        return 1.0 / _cholesky(*Sigma, f"ell({objective})")[2]

    def sigma_ref_vv(self, t) -> torch.Tensor:
        """Sigma_vv of the mixed-score reference kernel (s_x = 1, s_v = gamma M), eps included (sec. 3.2)."""
        return self.covariance(t, 1.0, None, None)[2]

    def _kernel(self, t, objective):
        if objective == "hsm":
            return self.hsm_covariance(t)
        if objective == "dsm":
            return self.dsm_covariance(t)
        raise ValueError(f"objective: unknown {objective!r}; choose 'hsm' or 'dsm'")

    def perturb(self, x0: torch.Tensor, t, eps_x: torch.Tensor, eps_v: torch.Tensor,
                v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw u_t = mean + L eps from the training kernel (sec. 2.3, 3.1).

        v0=None: HSM (v0 integrated out, kernel s_v = gamma M). v0 given: DSM (kernel s_v = 0,
        mean includes Phi_xv v0, Phi_vv v0). x0, eps_x, eps_v (and v0): (N, ...); t: scalar or (N,).
        Scalars are float64, then cast to x0's dtype; returns (x_t, v_t) in x0's dtype.
        """
        _check_same_shape(x0, eps_x, "x0", "eps_x")
        _check_same_shape(x0, eps_v, "x0", "eps_v")
        for name, z in (("x0", x0), ("eps_x", eps_x), ("eps_v", eps_v)):
            if not bool(torch.isfinite(z).all()):
                raise ValueError(f"perturb: {name} contains NaN or inf")
        B = self.B(t)
        Phi_xx, Phi_xv, Phi_vx, Phi_vv = self.Phi(B)
        L11, L21, L22 = _cholesky(*self._kernel(t, "hsm" if v0 is None else "dsm"), "perturb")
        x_t = batch_coeff(Phi_xx, x0) * x0 + batch_coeff(L11, x0) * eps_x
        v_t = batch_coeff(Phi_vx, x0) * x0 + batch_coeff(L21, x0) * eps_x + batch_coeff(L22, x0) * eps_v
        if v0 is not None:
            _check_same_shape(x0, v0, "x0", "v0")
            x_t = x_t + batch_coeff(Phi_xv, x0) * v0
            v_t = v_t + batch_coeff(Phi_vv, x0) * v0
        return x_t, v_t

    def prior_sample(self, shape, generator: torch.Generator | None = None, dtype=torch.float32,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, v) ~ N(0, I) x N(0, M I), the stationary law (sec. 4)."""
        x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        v = torch.randn(shape, generator=generator, dtype=dtype, device=device) * math.sqrt(self.M)
        return x, v

    # -- scores and drifts (sec. 3.2, 4) --------------------------------------------------------
    def score_from_alpha(self, v: torch.Tensor, t, alpha: torch.Tensor, mixed_score: bool = True) -> torch.Tensor:
        """s = -v/SigmaRef_vv(t) - ell(t) alpha (mixed) or -ell(t) alpha. v, alpha: (N, ...)."""
        _check_same_shape(v, alpha, "v", "alpha")
        s = -batch_coeff(self.ell(t), v) * alpha
        if mixed_score:
            s = s - v / batch_coeff(self.sigma_ref_vv(t), v)
        return s

    def reverse_drift(self, x, v, t, score_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse SDE drift (dx/dtau, dv/dtau) at forward time t; noise sqrt(2 Gamma beta) on v."""
        _check_same_shape(x, v, "x", "v")
        _check_same_shape(v, score_v, "v", "score_v")
        b = batch_coeff(self.beta(t), x)
        return -b * self.Minv * v, b * x + b * self.Gamma * self.Minv * v + 2 * self.Gamma * b * score_v

    def ode_drift(self, x, v, t, score_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability-flow ODE (dx/dtau, dv/dtau) at forward time t (sec. 4)."""
        _check_same_shape(x, v, "x", "v")
        _check_same_shape(v, score_v, "v", "score_v")
        b = batch_coeff(self.beta(t), x)
        return -b * self.Minv * v, b * x + b * self.Gamma * self.Minv * v + self.Gamma * b * score_v

    # -- samplers (sec. 5) ----------------------------------------------------------------------
    def time_grid(self, n: int, kind: GridKind = "uniform") -> torch.Tensor:
        """Reverse-time grid tau_0 = 0 < ... < tau_n = T - sampling_eps, float64 (n+1,) (sec. 5.1)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: number of steps must be an int >= 1, got {n!r}")
        k = torch.arange(n + 1, dtype=F64)
        span = self.T - self.config.sampling_eps
        if kind == "uniform":
            return span * k / n
        if kind == "quadratic":
            return span * (1.0 - ((n - k) / n) ** 2)
        raise ValueError(f"kind: unknown time grid {kind!r}; choose 'uniform' or 'quadratic'")

    def A_step(self, b: float, num_stab: float = 0.0) -> LinearStep:
        """Exact flow of SSCS's linear part A over integrated rate b (sec. 5.3).

        T(b) = e^{-ab} [[1 + ab, -Minv b], [b, 1 - ab]]; C(b) uses the E3 series; num_stab is the
        official `sscs_num_stab`, added to C_xx and C_vv.
        """
        b = float(as_float64(b, "b"))
        if b < 0:
            raise ValueError(f"b: integrated rate of an A step must be >= 0, got {b}")
        a = self.a
        e = math.exp(-a * b)
        S0_xx, S0_xv, S0_vv = (float(z) for z in _noise_cov(torch.tensor(2 * a * b, dtype=F64), a))
        # A's drift is P F P with P = diag(-1, 1): same flow and noise as forward, off-diagonals flipped.
        return _linear_step(e * (1 + a * b), -e * self.Minv * b, e * b, e * (1 - a * b),
                            S0_xx + num_stab, -S0_xv, S0_vv + num_stab)

    compose = staticmethod(compose)

    def score_step_coeffs(self, t_s, h: float, mixed_score: bool = True) -> tuple[float, float]:
        """S part of SSCS: v <- k_v v + k_alpha alpha, c = 2 Gamma beta(t_s) h (sec. 5.3).

        mixed: k_v = 1 + c (Minv - 1/SigmaRef_vv(t_s)), k_alpha = -c ell(t_s);
        plain (toy config): k_v = 1 + c Minv, k_alpha = -c ell(t_s).
        """
        c = 2 * self.Gamma * float(self.beta(t_s)) * h
        ell = float(self.ell(t_s))
        k_v = 1 + c * self.Minv
        if mixed_score:
            k_v -= c / float(self.sigma_ref_vv(t_s))
        return k_v, -c * ell

    def em_step_coeffs(self, tau: float, h: float, mixed_score: bool = True) -> EMStep:
        """EM step of the reverse SDE from reverse time tau over h, score at t = T - tau (sec. 5.2).

        x' = x - h b Minv v;  v' = h b x + (1 + h b Gamma Minv) v + 2 Gamma b h s + sqrt(2 Gamma b h) n,
        with s = -v/SigmaRef_vv - ell alpha (mixed) or -ell alpha, b = beta(T - tau).
        """
        t = self.T - float(tau)
        b = float(self.beta(t))
        c = 2 * self.Gamma * b * h
        a_vv = 1 + h * b * self.Gamma * self.Minv
        if mixed_score:
            a_vv -= c / float(self.sigma_ref_vv(t))
        return EMStep(t=t, a_xx=1.0, a_xv=-h * b * self.Minv, a_xalpha=0.0, a_vx=h * b, a_vv=a_vv,
                      a_valpha=-c * float(self.ell(t)), g=math.sqrt(c))

    def denoise_coeffs(self, mixed_score: bool = True) -> EMStep:
        """Final denoising step: the EM mean from forward time sampling_eps to 0 (sec. 5.1), g = 0."""
        eps_s = self.config.sampling_eps
        step = self.em_step_coeffs(self.T - eps_s, eps_s, mixed_score)
        return EMStep(**{**step.__dict__, "g": 0.0})

    def sscs_plan(self, n_steps: int, kind: GridKind = "quadratic", midpoint: bool = False,
                  mixed_score: bool = True, num_stab: float = 0.0) -> SSCSPlan:
        """Per-step float64 records for an SSCS run of n_steps network calls + 1 denoising call.

        See SSCSPlan for the order of operations. midpoint=False evaluates the score at the step's
        start t_s = T - tau_k (official); True uses T - tau_k - h/2. Each A half step integrates
        beta over its own half interval (exact for any beta(t); the official code reuses the first
        half's integral for both, which only differs when beta1 != 0).
        """
        tau = self.time_grid(n_steps, kind).tolist()
        T = self.T

        def half(lo_tau, hi_tau):
            return self.A_step(float(self.b_int(T - hi_tau, T - lo_tau)), num_stab)

        steps = []
        for k in range(n_steps):
            h = tau[k + 1] - tau[k]
            mid = tau[k] + 0.5 * h
            t_s = T - (mid if midpoint else tau[k])
            k_v, k_alpha = self.score_step_coeffs(t_s, h, mixed_score)
            A = half(mid, tau[k + 1])
            if k + 1 < n_steps:
                A = compose(A, half(tau[k + 1], 0.5 * (tau[k + 1] + tau[k + 2])))
            steps.append(SSCSStep(k=k, t_s=t_s, h=h, beta=float(self.beta(t_s)), ell=float(self.ell(t_s)),
                                  sigma_ref_vv=float(self.sigma_ref_vv(t_s)), k_v=k_v, k_alpha=k_alpha, A=A))
        return SSCSPlan(kind=kind, midpoint=midpoint, mixed_score=mixed_score, tau=tuple(tau),
                        first_half=half(tau[0], 0.5 * (tau[0] + tau[1])), steps=tuple(steps),
                        denoise=self.denoise_coeffs(mixed_score), nfe=n_steps + 1)
