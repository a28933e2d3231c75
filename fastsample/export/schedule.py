"""The sampler as a plain-text table: what an artifact's `schedule.txt` holds (export/README.md).

The C++ runtime has no JSON library and no float64 SDE code, so everything a sampler loop needs
besides the network is written here once, in float64, one row per loop step. The format is
line-oriented and whitespace-separated; `#` starts a comment line:

    fastsample-schedule 1
    family ddgan                     ddgan | cld | lsgm
    sampler posterior                ddgan: posterior; cld: sscs | em; lsgm: em
    nfe 4                            network calls per sample (counted from the rows)
    data_shape 1 8 8
    z_dim 32                         ddgan only: the generator's latent width
    prior_v_scale 2                  cld only: v_T ~ N(0, M I) is sqrt(M) * N(0, I)
    latent_shape 4 4 4               lsgm only: the loop's state (data_shape: the decoder's output)
    decode mode                      lsgm only: the decoder's level rule (mode | mean)
    postprocess quantize17           quantize17: data = clamp(floor(17 (x + 1) / 2), 0, 16) / 16
                                     clamp01: data = clamp((x + 1) / 2, 0, 1); none: data = x
    columns <name> ...
    row <value> ...                  one per loop step, in loop order, %.17g

DDGAN (columns i c0 c1 sigma; ddgan.md sec. 1, 4), from x = x_T ~ N(0, I):
    x0' = G(x, z_k, i);  x <- c0 x0' + c1 x + sigma n          (sigma = 0 on the last row)
CLD (columns net t k_v k_alpha T_xx T_xv T_vx T_vv K11 K21 K22 D_xv; cld.md sec. 5), from
x ~ N(0, I), v = prior_v_scale * N(0, I), the affine2 step of fastsample/kernels/affine.py:
    alpha = net ? score_net(cat(x, v), t) : 0
    v_s = k_v v + k_alpha alpha
    x' = T_xx x + T_xv v_s + D_xv v + K11 n0
    v' = T_vx x + T_vv v_s + K21 n0 + K22 n1
LSGM (columns t c_x c_e sigma; samplers/lsgm.py sample_em), from z = z_T ~ N(0, I) of
latent_shape, then x = decoder(z) (the `--what decoder` artifact) and data = postprocess(x):
    eps = prior(z, t);  z <- c_x z + c_e eps + sigma n          (sigma = 0 on the last row)
A row draws noise iff any of K11, K21, K22 (sigma for DDGAN and LSGM) is non-zero.

`run_table` is the Python twin of the C++ loop: fed the same noise it reproduces the family's
sampler (tests/test_schedule_table.py), which is the oracle the C++ runtime is tested against.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT_VERSION = 1
DDGAN_COLUMNS = ("i", "c0", "c1", "sigma")
CLD_COLUMNS = ("net", "t", "k_v", "k_alpha", "T_xx", "T_xv", "T_vx", "T_vv", "K11", "K21", "K22",
               "D_xv")
LSGM_COLUMNS = ("t", "c_x", "c_e", "sigma")
_INT_KEYS = {"fastsample-schedule", "nfe", "data_shape", "z_dim", "latent_shape"}


class ScheduleError(ValueError):
    """A schedule.txt that cannot be read: names the file and the line."""


# The one number grammar of schedule.txt values, shared with the C++ reader
# (fastsample::parse_schedule_value) and tested on both sides from one file of cases,
# kernels/tests/schedule_grammar_cases.txt: plain decimal floats, ASCII digits only (no hex,
# inf, nan, underscores), whose value fits float32 (underflow to 0 is fine).
_VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLT_MAX = 3.4028234663852886e38


def parse_value(tok: str) -> float:
    """One schedule.txt row value as a float; ValueError (one line) for anything else."""
    if not _VALUE.fullmatch(tok):
        raise ValueError(f"invalid number {tok!r} (plain decimal only: no hex, inf or nan)")
    v = float(tok)
    if not abs(v) <= _FLT_MAX:
        raise ValueError(f"number {tok!r} overflows float32")
    return v


@dataclass
class Table:
    header: dict = field(default_factory=dict)     # key -> tuple of values (ints, floats, strs)
    columns: tuple = ()
    rows: list = field(default_factory=list)       # tuples of python floats

    @property
    def family(self) -> str:
        return self.header["family"][0]

    def column(self, name: str) -> list[float]:
        j = self.columns.index(name)
        return [r[j] for r in self.rows]

    def to_text(self) -> str:
        lines = [f"fastsample-schedule {FORMAT_VERSION}"]
        for key, vals in self.header.items():
            if key == "fastsample-schedule":
                continue
            lines.append(" ".join([key, *(_fmt(v) for v in vals)]))
        lines.append(" ".join(("columns", *self.columns)))
        lines += [" ".join(("row", *(_fmt(v) for v in r))) for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self, path) -> None:
        Path(path).write_text(self.to_text())

    @classmethod
    def read(cls, path) -> "Table":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ScheduleError(f"{path}: cannot read the schedule ({e})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, where: str = "<schedule>") -> "Table":
        table = cls()
        for n, line in enumerate(text.splitlines(), 1):
            tok = line.split()
            if not tok or tok[0].startswith("#"):
                continue
            key, vals = tok[0], tok[1:]
            try:
                if key == "row":
                    row = tuple(parse_value(v) for v in vals)
                    if len(row) != len(table.columns) or not all(map(math.isfinite, row)):
                        raise ValueError(f"{len(row)} finite values expected "
                                         f"{len(table.columns)}")
                    table.rows.append(row)
                elif key == "columns":
                    table.columns = tuple(vals)
                elif key in _INT_KEYS:
                    table.header[key] = tuple(int(v) for v in vals)
                else:
                    table.header[key] = tuple(_num_or_str(v) for v in vals)
            except ValueError as e:
                raise ScheduleError(f"{where}:{n}: bad {key!r} line ({e})") from None
        version = table.header.get("fastsample-schedule", (None,))[0]
        if version != FORMAT_VERSION:
            raise ScheduleError(f"{where}: not a fastsample schedule of format {FORMAT_VERSION} "
                                f"(first line says {version!r})")
        for key in ("family", "sampler", "nfe", "data_shape", "postprocess"):
            if key not in table.header:
                raise ScheduleError(f"{where}: the {key!r} line is missing")
        if not table.rows:
            raise ScheduleError(f"{where}: no rows")
        return table


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.17g}"
    return str(v)


def _num_or_str(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _postprocess(model) -> str:
    """The family's to_data as a name: points pass through, digits snap to their 17 levels,
    other images clamp (CLD models only train on digits and always quantise images)."""
    if len(model.data_shape) == 1:
        return "none"
    return "quantize17" if getattr(model, "dataset", "digits") == "digits" else "clamp01"


#-----------------------------------------------------------------------------------------------
# Tables from models.

def ddgan_table(model) -> Table:
    """The T posterior steps of a fastsample.models.ddgan.Model (samplers/ddgan.posterior_plan)."""
    from fastsample.samplers.ddgan import posterior_plan
    plan = posterior_plan(model.schedule)
    header = {"family": ("ddgan",), "sampler": ("posterior",), "nfe": (len(plan),),
              "data_shape": tuple(model.data_shape), "z_dim": (int(model.z_dim),),
              "postprocess": (_postprocess(model),)}
    rows = [(float(s.i), s.c0, s.c1, s.sigma) for s in plan]
    return Table(header, DDGAN_COLUMNS, rows)


def cld_table(model, sampler: str, steps: int, kind: str = "quadratic",
              midpoint: bool = False, num_stab: float = 0.0) -> Table:
    """The rows of a fused SSCS or an EM run with `steps` network calls (samplers/cld.py)."""
    from fastsample.samplers.cld import _A, _check_kind, _em, _nfe_budget
    n = _nfe_budget(steps)
    _check_kind(kind)
    cld = model.cld
    rows = []

    def em_row(t, c):
        return (1.0, float(t), c.v_v, c.v_alpha, 1.0, 0.0, c.v_x, 1.0, 0.0, 0.0, c.noise, c.x_v)

    if sampler == "sscs":
        plan = cld.sscs_plan(n, kind, midpoint=midpoint, mixed_score=model.mixed_score,
                             num_stab=num_stab)
        T, K = _A(plan.first_half)
        rows.append((0.0, 0.0, 1.0, 0.0, *T, *K, 0.0))
        for s in plan.steps:
            T, K = _A(s.A)
            rows.append((1.0, float(s.t_s), s.k_v, s.k_alpha, *T, *K, 0.0))
    elif sampler == "em":
        tau = cld.time_grid(n, kind).tolist()
        for k in range(n):
            c = cld.em_step_coeffs(tau[k], tau[k + 1] - tau[k], model.mixed_score)
            rows.append(em_row(c.t, _em(c)))
    else:
        raise ValueError(f"cld sampler {sampler!r} has no fixed table; choose sscs|em")
    rows.append(em_row(cld.config.sampling_eps, _em(cld.denoise_coeffs(model.mixed_score))))
    header = {"family": ("cld",), "sampler": (sampler,), "nfe": (n + 1,),
              "data_shape": tuple(model.data_shape), "grid": (kind,),
              "prior_v_scale": (math.sqrt(cld.M),), "postprocess": (_postprocess(model),)}
    return Table(header, CLD_COLUMNS, [tuple(float(v) for v in r) for r in rows])


def lsgm_table(model, steps: int, t_end: float = 0.0) -> Table:
    """The `steps` Euler-Maruyama steps of samplers/lsgm.sample_em on its log-SNR grid (the
    adaptive ODE sampler has no fixed table). Rows hold the step's network time and its
    z <- c_x z + c_e eps + sigma n coefficients, computed in float64 exactly as sample_em does."""
    from fastsample.samplers import check_steps
    from fastsample.samplers.lsgm import em_grid
    check_steps(steps)
    sde, vae = model.sde, model.vae_cfg
    t = em_grid(steps, sde, t_end)
    h, t0 = t[:-1] - t[1:], t[:-1]
    beta, sigma = sde.beta(t0), sde.std(t0)
    c_x = (1 + 0.5 * h * beta).tolist()
    c_e = (-h * beta / sigma).tolist()
    noise = torch.sqrt(h * beta)
    noise[-1] = 0.0
    rows = [(float(a), float(b), float(c), float(d))
            for a, b, c, d in zip(t0.tolist(), c_x, c_e, noise.tolist())]
    header = {"family": ("lsgm",), "sampler": ("em",), "nfe": (steps,),
              "data_shape": (vae.in_ch, vae.resolution, vae.resolution),
              "latent_shape": tuple(model.latent_shape), "decode": (model.cfg.decode,),
              "postprocess": ("quantize17",)}
    return Table(header, LSGM_COLUMNS, rows)


#-----------------------------------------------------------------------------------------------
# The Python twin of the C++ loop.

def noise_draws(table: Table) -> list[int]:
    """For each row, how many standard-normal tensors of the state's shape it consumes."""
    if table.family in ("ddgan", "lsgm"):
        return [1 if r[3] != 0.0 else 0 for r in table.rows]
    return [2 if any(r[8:11]) else 0 for r in table.rows]


def twin_noise(table: Table, seed: int, like: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per row, the normals a family's sampler draws on the CPU for one batch shaped `like`: the
    torch twins keyed by (seed, counter), the counter advancing by like.numel() at every noisy
    row (samplers/*: offset k * numel at the k-th noisy step). Fed to run_table, it reproduces
    the sampler's output exactly; written to files, it is the C++ runtime's --noise input."""
    from fastsample.kernels.affine import _twin_normals
    from fastsample.samplers import seed_tensor
    st, counter, out = seed_tensor(seed, like.device), 0, []
    for d in noise_draws(table):
        out.append(list(_twin_normals(st, counter, d, like)) if d else [])
        counter += like.numel() if d else 0
    return out


def postprocess(table: Table, x: torch.Tensor) -> torch.Tensor:
    kind = table.header["postprocess"][0]
    if kind == "quantize17":
        return torch.floor((x.float() + 1) / 2 * 17).clamp(0, 16) / 16
    if kind == "clamp01":
        return ((x.float() + 1) / 2).clamp(0, 1)
    return x.float()


@torch.no_grad()
def run_table(table: Table, net, x: torch.Tensor, noise: list, *, v: torch.Tensor | None = None,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """Run the loop in float32 with explicit noise; returns the model-space state x (LSGM: the
    latent z_0, which the decoder maps to model space).

    net: DDGAN G(x, z, i), the CLD alpha(x, v, t) or the LSGM eps(z, t), with (N,) float time.
    noise: a list with one entry per row, each a list of noise_draws(table)[row] tensors shaped
    like x. z: (nfe, N, z_dim).
    """
    need = noise_draws(table)
    if len(noise) != len(table.rows) or any(len(n) != k for n, k in zip(noise, need)):
        raise ValueError(f"noise must hold, per row, {need} tensors")
    x = x.clone().float()
    N = x.shape[0]
    if table.family == "ddgan":
        for k, (i, c0, c1, sigma) in enumerate(table.rows):
            x0 = net(x, z[k], torch.full((N,), i)).float()
            x = c0 * x0 + c1 * x + (sigma * noise[k][0] if sigma else 0.0)
        return x
    if table.family == "lsgm":
        for k, (t, c_x, c_e, sigma) in enumerate(table.rows):
            eps = net(x, torch.full((N,), t)).float()
            x = c_x * x + c_e * eps
            if sigma:
                x = x + sigma * noise[k][0]
        return x
    v = v.clone().float()
    for k, r in enumerate(table.rows):
        net_call, t, k_v, k_a, T_xx, T_xv, T_vx, T_vv, K11, K21, K22, D_xv = r
        alpha = net(x, v, torch.full((N,), t)).float() if net_call else torch.zeros_like(x)
        v_s = k_v * v + k_a * alpha
        n0, n1 = noise[k] if need[k] else (0.0, 0.0)
        x, v = (T_xx * x + T_xv * v_s + D_xv * v + K11 * n0,
                T_vx * x + T_vv * v_s + K21 * n0 + K22 * n1)
    return x
