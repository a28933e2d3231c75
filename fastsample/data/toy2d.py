"""2-D toy distributions, with exact densities and scores for the Gaussian mixtures.

A GaussianMixture (isotropic components) has closed-form marginals under every diffusion used
here, so samplers can be tested on the *exact* score:
- VP-type noise x_t = m x_0 + s eps: component k becomes N(m mu_k, (m^2 std_k^2 + s^2) I);
- CLD (reference/cld.md sec. 2.2): per dimension, component k is a 2-D Gaussian over (x, v)
  with mean (Phi_xx mu_k, Phi_vx mu_k) and covariance CLD.covariance(t, std_k^2, gamma M, eps=0);
- DDGAN (reference/ddgan.md sec. 1, 6): q(x_{i-1} | x_i) is again a mixture (Bayes over components).
All densities are computed in float64 with logsumexp; results come back in the input's dtype
(pass float64 for oracle use).

Toys (get_toy): grid25, swissroll, cld_multimodal_swissroll, diamond. Scales are chosen so the
data is of order 1, which VP and CLD assume (see each factory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _as_points(x: torch.Tensor, d: int, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor of shape (n, {d}), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return x.to(F64)


def _per_sample(c, n: int, name: str) -> torch.Tensor:
    """Scalar or (n,) coefficient -> float64 (n, 1) or (1, 1) column."""
    c = torch.as_tensor(c, dtype=F64)
    if c.dim() == 0:
        c = c.reshape(1)
    if c.dim() != 1 or c.shape[0] not in (1, n):
        raise ValueError(f"{name}: expected a scalar or shape ({n},), got shape {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name}: must be finite, got {c.tolist()}")
    return c[:, None]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """sum_k w_k N(mu_k, std_k^2 I_d). means: (K, d), stds: (K,) > 0, weights: (K,) >= 0 (normalised)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        means = torch.as_tensor(self.means, dtype=F64)
        stds = torch.as_tensor(self.stds, dtype=F64)
        weights = torch.as_tensor(self.weights, dtype=F64)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ValueError(f"means: expected shape (K, d), got {tuple(means.shape)}")
        K = means.shape[0]
        if stds.shape != (K,):
            raise ValueError(f"stds: expected shape ({K},) to match means, got {tuple(stds.shape)}")
        if weights.shape != (K,):
            raise ValueError(f"weights: expected shape ({K},) to match means, got {tuple(weights.shape)}")
        for name, z in (("means", means), ("stds", stds), ("weights", weights)):
            if not bool(torch.isfinite(z).all()):
                raise ValueError(f"{name}: contains NaN or inf")
        if bool((stds <= 0).any()):
            raise ValueError(f"stds: must be > 0, got {stds.tolist()}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights: must be >= 0 with a positive sum, got {weights.tolist()}")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, (n, d) float32 (component draws and normals come from `generator`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return (self.means[k] + self.stds[k, None] * z).to(torch.float32)

    # -- generic isotropic-mixture machinery: means (n|1, K, d), var (n|1, K) ----------------------
    def _log_terms(self, x, means, var):
        """log w_k + log N(x; means_k, var_k I) -> (n, K)."""
        d = self.dim
        sq = ((x[:, None, :] - means) ** 2).sum(-1)
        return torch.log(self.weights) - 0.5 * sq / var - 0.5 * d * (_LOG_2PI + torch.log(var))

    def _log_prob_score(self, x, means, var):
        terms = self._log_terms(x, means, var)
        logp = torch.logsumexp(terms, dim=1)
        r = torch.softmax(terms, dim=1)
        score = (r[:, :, None] * (means - x[:, None, :]) / var[:, :, None]).sum(1)
        return logp, score

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), x: (n, d) -> (n,) in x's dtype."""
        xx = _as_points(x, self.dim)
        return self._log_prob_score(xx, self.means[None], (self.stds ** 2)[None])[0].to(x.dtype)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x), (n, d) in x's dtype."""
        xx = _as_points(x, self.dim)
        return self._log_prob_score(xx, self.means[None], (self.stds ** 2)[None])[1].to(x.dtype)

    def _vp(self, x, m, s):
        xx = _as_points(x, self.dim)
        m = _per_sample(m, xx.shape[0], "m")
        s = _per_sample(s, xx.shape[0], "s")
        if bool((s < 0).any()):
            raise ValueError(f"s: must be >= 0, got {s.flatten().tolist()}")
        var = m ** 2 * (self.stds ** 2)[None] + s ** 2
        return self._log_prob_score(xx, m[:, :, None] * self.means[None], var)

    def vp_log_prob(self, x: torch.Tensor, m, s) -> torch.Tensor:
        """log p_t(x) of x_t = m x_0 + s eps; m, s: scalars or (n,) (per sample)."""
        return self._vp(x, m, s)[0].to(x.dtype)

    def vp_score(self, x: torch.Tensor, m, s) -> torch.Tensor:
        """grad_x log p_t(x) of x_t = m x_0 + s eps; m, s: scalars or (n,)."""
        return self._vp(x, m, s)[1].to(x.dtype)

    # -- CLD joint (x, v) marginal ---------------------------------------------------------------
    def _cld(self, x, v, t, cld):
        xx = _as_points(x, self.dim, "x")
        vv = _as_points(v, self.dim, "v")
        n = xx.shape[0]
        t = _per_sample(t, n, "t")                                   # (n|1, 1)
        Phi_xx, _, Phi_vx, _ = cld.Phi(cld.B(t))                     # (n|1, 1)
        Sxx, Sxv, Svv = cld.covariance(t, (self.stds ** 2)[None], None, 0.0)   # (n|1, K)
        det = Sxx * Svv - Sxv * Sxv
        dx = xx[:, None, :] - Phi_xx[:, :, None] * self.means[None]  # (n, K, d)
        dv = vv[:, None, :] - Phi_vx[:, :, None] * self.means[None]
        Sxx, Sxv, Svv, det = (z[:, :, None] for z in (Sxx, Sxv, Svv, det))
        quad = (Svv * dx * dx - 2 * Sxv * dx * dv + Sxx * dv * dv) / det
        terms = (torch.log(self.weights) - 0.5 * quad.sum(-1)
                 - self.dim * (_LOG_2PI + 0.5 * torch.log(det[:, :, 0])))
        logp = torch.logsumexp(terms, dim=1)
        r = torch.softmax(terms, dim=1)
        # grad_v of component k: -[Sigma^-1 (u - mean)]_v = -(-Sxv dx + Sxx dv) / det
        score_v = (r[:, :, None] * (Sxv * dx - Sxx * dv) / det).sum(1)
        return logp, score_v

    def cld_log_prob(self, x: torch.Tensor, v: torch.Tensor, t, cld) -> torch.Tensor:
        """log p_t(x, v) of the CLD forward marginal (v0 ~ N(0, gamma M), no eps); t scalar or (n,)."""
        return self._cld(x, v, t, cld)[0].to(x.dtype)

    def cld_score_v(self, x: torch.Tensor, v: torch.Tensor, t, cld) -> torch.Tensor:
        """grad_v log p_t(x, v) of the CLD forward marginal, (n, d) in x's dtype."""
        return self._cld(x, v, t, cld)[1].to(x.dtype)

    # -- DDGAN ---------------------------------------------------------------------------------
    def ddgan_denoising_posterior(self, x_i: torch.Tensor, i: int, schedule) -> "GaussianMixture":
        """Exact q(x_{i-1} | x_i) for data ~ self, as a GaussianMixture over x_{i-1}.

        x_i: (d,) one point; i in 1..schedule.num_steps (alpha_bar[i] etc. from a DDGANSchedule or
        DDPMSchedule). Component k: x_{i-1} ~ N(sqrt(ab_{i-1}) mu_k, ab_{i-1} std_k^2 + 1 - ab_{i-1})
        and x_i | x_{i-1} ~ N(sqrt(alpha_i) x_{i-1}, beta_i); the posterior weight of k is
        w_k N(x_i; sqrt(ab_i) mu_k, ab_i std_k^2 + 1 - ab_i), normalised.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= schedule.num_steps:
            raise ValueError(f"i: expected an int in [1, {schedule.num_steps}], got {i!r}")
        xi = _as_points(x_i.reshape(1, -1) if isinstance(x_i, torch.Tensor) and x_i.dim() == 1 else x_i,
                        self.dim, "x_i")[0]
        ab_prev, ab = float(schedule.alpha_bar[i - 1]), float(schedule.alpha_bar[i])
        alpha, beta = float(schedule.alpha[i]), float(schedule.beta[i])
        s2 = self.stds ** 2
        prior_var = ab_prev * s2 + (1 - ab_prev)
        prior_mean = math.sqrt(ab_prev) * self.means
        marg_var = ab * s2 + (1 - ab)
        terms = (torch.log(self.weights) - 0.5 * ((xi - math.sqrt(ab) * self.means) ** 2).sum(-1) / marg_var
                 - 0.5 * self.dim * torch.log(marg_var))
        post_prec = 1.0 / prior_var + alpha / beta
        post_mean = (prior_mean / prior_var[:, None] + math.sqrt(alpha) * xi / beta) / post_prec[:, None]
        return GaussianMixture(post_mean, torch.sqrt(1.0 / post_prec), torch.softmax(terms, 0))


# ---------------------------------------------------------------------------------------------
# Toys.


@dataclass(frozen=True, eq=False)
class Toy2D:
    """A named 2-D distribution; `.mixture` is its GaussianMixture, or None when it has none."""

    name: str
    sampler: Callable[[int, torch.Generator | None], torch.Tensor]
    mixture: GaussianMixture | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, (n, 2) float32."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        return self.sampler(n, generator)


def _mixture_toy(name: str, mixture: GaussianMixture) -> Toy2D:
    return Toy2D(name, mixture.sample, mixture)


def grid25() -> Toy2D:
    """25 equal Gaussians, means {-4,-2,0,2,4}^2 and std 0.05, all divided by 2*sqrt(2).

    This is the classic GAN/DDGAN toy with its usual /2.828 rescaling: means on
    {-1.41, -0.71, 0, 0.71, 1.41}^2, std 0.0177; each coordinate then has variance 1.0003,
    matching the unit-variance data VP and CLD assume.
    """
    c = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=F64)
    means = torch.cartesian_prod(c, c) / (2 * math.sqrt(2))
    return _mixture_toy("grid25", GaussianMixture(means, torch.full((25,), 0.05 / (2 * math.sqrt(2))),
                                                  torch.ones(25)))


def diamond() -> Toy2D:
    """9 equal Gaussians on the 3x3 grid over [-0.5, 0.5]^2 rotated by 45 degrees, std 0.04 (cld.md sec. 6)."""
    c = torch.tensor([-0.5, 0.0, 0.5], dtype=F64)
    g = torch.cartesian_prod(c, c)
    r = math.sqrt(0.5)
    rot = torch.tensor([[r, -r], [r, r]], dtype=F64)
    return _mixture_toy("diamond", GaussianMixture(g @ rot.T, torch.full((9,), 0.04), torch.ones(9)))


def _swiss_roll_2d(n: int, noise: float, generator, dtype=F64) -> torch.Tensor:
    """The (x, z) coordinates of sklearn.datasets.make_swiss_roll, drawn with a torch generator.

    sklearn: t = 1.5 pi (1 + 2 U), point (t cos t, 21 U', t sin t) + noise * N(0, I_3); the 2-D
    slice keeps coordinates (0, 2), so U' is irrelevant.
    """
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=dtype))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return pts + noise * torch.randn(n, 2, generator=generator, dtype=dtype)


SWISSROLL_NOISE = 1.0   # sklearn noise of `swissroll` (the FFJORD toy convention)
SWISSROLL_SCALE = 0.2   # ... divided by 5, so each coordinate has std ~1.4

MULTI_SWISSROLL_NOISE = 0.2       # cld.md sec. 6
MULTI_SWISSROLL_SCALE = 0.01
MULTI_SWISSROLL_OFFSETS = ((0.0, 0.0), (0.8, 0.8), (0.8, -0.8), (-0.8, -0.8), (-0.8, 0.8))


def swissroll() -> Toy2D:
    """sklearn swiss roll 2-D slice, noise 1.0, scaled by 1/5 (coordinates of order 1)."""
    def sample(n, generator=None):
        return (SWISSROLL_SCALE * _swiss_roll_2d(n, SWISSROLL_NOISE, generator)).to(torch.float32)
    return Toy2D("swissroll", sample)


def cld_multimodal_swissroll() -> Toy2D:
    """CLD's multimodal swiss roll (cld.md sec. 6): 5 equal rolls (noise 0.2, scale 0.01), one at
    the origin and four at (+-0.8, +-0.8)."""
    offsets = torch.tensor(MULTI_SWISSROLL_OFFSETS, dtype=F64)

    def sample(n, generator=None):
        k = torch.randint(0, len(offsets), (n,), generator=generator)
        rolls = MULTI_SWISSROLL_SCALE * _swiss_roll_2d(n, MULTI_SWISSROLL_NOISE, generator)
        return (rolls + offsets[k]).to(torch.float32)
    return Toy2D("cld_multimodal_swissroll", sample)


TOYS: dict[str, Callable[[], Toy2D]] = {
    "grid25": grid25,
    "swissroll": swissroll,
    "cld_multimodal_swissroll": cld_multimodal_swissroll,
    "diamond": diamond,
}


def get_toy(name: str) -> Toy2D:
    """Toy by name: grid25 | swissroll | cld_multimodal_swissroll | diamond."""
    if name not in TOYS:
        raise ValueError(f"toy name: unknown {name!r}; choose one of {'|'.join(TOYS)}")
    return TOYS[name]()
