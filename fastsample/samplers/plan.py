"""The sampler plan: one row per loop step, computed once in float64, and the ONE loop that runs it.

Every fixed-step sampler of every family is a plan (a `Table`): the eager samplers
(`fastsample sample`), the Engine (static buffers, CUDA graph) and the exported `schedule.txt`
that the C++ runtime reads are the same rows, and `run` below is the only Python loop over them.
Adaptive ODE samplers have no fixed rows; they share `samplers/ode.py` instead.

Text form (`schedule.txt`, export/README.md): line-oriented, whitespace-separated, `#` starts a
comment line:

    fastsample-schedule 1
    family ddgan                     the family that built the rows
    sampler posterior                the sampler's name
    nfe 4                            network calls per sample (counted from the rows)
    data_shape 1 8 8
    z_dim 32                         posterior rows: the generator's latent width
    prior_v_scale 2                  affine2 rows: v_T ~ N(0, M I) is sqrt(M) * N(0, I)
    latent_shape 4 4 4               a latent loop's state (data_shape: the decoder's output)
    decode mode                      a latent loop's decoder level rule (mode | mean)
    postprocess quantize17           quantize17: data = clamp(floor(17 (x + 1) / 2), 0, 16) / 16
                                     clamp01: data = clamp((x + 1) / 2, 0, 1); none: data = x
    columns <name> ...
    row <value> ...                  one per loop step, in loop order, %.17g

Three row kinds, told apart by the columns (not by the family):
posterior (columns i c0 c1 sigma; ddgan.md sec. 1, 4), from x = x_T ~ N(0, I):
    x0' = G(x, z_k, i);  x <- c0 x0' + c1 x + sigma n          (sigma = 0 on the last row)
affine1 (columns t c_x c_e sigma; VP-SDE / DDPM / a latent prior's EM):
    e = net(x, t);  x <- c_x x + c_e e + sigma n
affine2 (columns net t k_v k_alpha T_xx T_xv T_vx T_vv K11 K21 K22 D_xv; cld.md sec. 5), from
x ~ N(0, I), v = prior_v_scale * N(0, I), the affine2 step of fastsample/kernels/affine.py:
    alpha = net ? score_net(x, v, t) : none
    v_s = k_v v + k_alpha alpha
    x' = T_xx x + T_xv v_s + D_xv v + K11 n0
    v' = T_vx x + T_vv v_s + K21 n0 + K22 n1
A row draws noise iff sigma (K11, K21, K22 for affine2) is non-zero.

Philox counters: the k-th row that draws noise uses counters offset + k * stride (+ element); a
batch covering samples [s, s + B) of a run of `num` samples passes offset = s * numel_per_sample
and stride = num * numel_per_sample, so on the Triton path sample j's noise does not depend on
the batch size (the CPU twins key a generator by (seed, counter) instead: same law).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastsample.kernels import affine, dispatch
from fastsample.samplers import seed_tensor

FORMAT_VERSION = 1
POSTERIOR_COLUMNS = ("i", "c0", "c1", "sigma")
AFFINE1_COLUMNS = ("t", "c_x", "c_e", "sigma")
AFFINE2_COLUMNS = ("net", "t", "k_v", "k_alpha", "T_xx", "T_xv", "T_vx", "T_vv", "K11", "K21",
                   "K22", "D_xv")
KINDS = {POSTERIOR_COLUMNS: "posterior", AFFINE1_COLUMNS: "affine1", AFFINE2_COLUMNS: "affine2"}
_INT_KEYS = {"fastsample-schedule", "nfe", "data_shape", "z_dim", "latent_shape"}


class ScheduleError(ValueError):
    """A schedule.txt that cannot be read: names the file and the line."""


# The one number grammar of schedule.txt values, shared with the C++ reader
# (fastsample::parse_schedule_value) and tested on both sides from one file of cases,
# kernels/tests/schedule_grammar_cases.txt: plain decimal floats, ASCII digits only (no hex,
# inf, nan, underscores), whose value fits float32 (underflow to 0 is fine).
_VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLT_MAX = 3.4028234663852886e38
_INT = re.compile(r"[0-9]+")
# The C++ reader's caps (kernels/README.md): rows per plan and any integer in the header.
MAX_ROWS = 100_000
MAX_INT = 1 << 24


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
                    if not table.columns:
                        raise ValueError("a row before the columns line")
                    if len(table.rows) >= MAX_ROWS:
                        raise ValueError(f"more than {MAX_ROWS} rows")
                    row = tuple(parse_value(v) for v in vals)
                    if len(row) != len(table.columns) or not all(map(math.isfinite, row)):
                        raise ValueError(f"{len(row)} finite values expected "
                                         f"{len(table.columns)}")
                    table.rows.append(row)
                elif key == "columns":
                    if table.columns:
                        raise ValueError("a second columns line")
                    if not vals:
                        raise ValueError("no column names")
                    table.columns = tuple(vals)
                elif not vals:
                    raise ValueError("no value")
                elif key in _INT_KEYS:
                    table.header[key] = tuple(_parse_int(v) for v in vals)
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
    """A header value: a number in the one grammar (parse_value), else a word; a token that
    Python's float() would read (inf, nan, 1_0, hex) but the grammar refuses is an error, not a
    word, so both readers see the same header."""
    try:
        return parse_value(v)
    except ValueError:
        try:
            float(v)
        except ValueError:
            return v
        raise


def _parse_int(v: str) -> int:
    if not _INT.fullmatch(v):
        raise ValueError(f"invalid integer {v!r} (decimal digits only)")
    n = int(v)
    if n > MAX_INT:
        raise ValueError(f"integer {v} is larger than {MAX_INT}")
    return n


def postprocess_name(data_shape, dataset: str) -> str:
    """A model's to_data as a name: points pass through, digits snap to their 17 levels, other
    images clamp."""
    if len(data_shape) == 1:
        return "none"
    return "quantize17" if dataset == "digits" else "clamp01"


def apply_postprocess(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A postprocess rule in x's dtype (17 levels k/16 are exact in fp16), as a fresh tensor:
    also the form traced into exported graphs."""
    if kind == "quantize17":
        return (torch.floor((x + 1) / 2 * 17).clamp(0, 16) / 16).to(x.dtype)
    if kind == "clamp01":
        return ((x + 1) / 2).clamp(0, 1)
    if kind == "none":
        return x.clone()
    raise ScheduleError(f"unknown postprocess {kind!r}; choose quantize17|clamp01|none")


def postprocess(table: Table, x: torch.Tensor) -> torch.Tensor:
    """The table's postprocess rule applied to a model-space x, in float32 (what the C++
    runtime does)."""
    return apply_postprocess(table.header["postprocess"][0], x.float())


def as_latent(table: Table, family: str, latent_shape, decode: str) -> Table:
    """A plan that runs in a VAE's latent space: `table` relabelled to `family`, with the
    latent_shape and decode lines (the decoder step after the loop) before the postprocess rule;
    data_shape stays the decoder's output. The rows are unchanged."""
    header = {}
    for key, vals in table.header.items():
        if key == "postprocess":
            header["latent_shape"] = tuple(int(s) for s in latent_shape)
            header["decode"] = (decode,)
        header[key] = vals
    header["family"] = (family,)
    return Table(header, tuple(table.columns), list(table.rows))


#-----------------------------------------------------------------------------------------------
# The loop.

def kind_of(table: Table) -> str:
    """posterior | affine1 | affine2, from the columns."""
    try:
        return KINDS[tuple(table.columns)]
    except KeyError:
        raise ScheduleError(f"unknown plan columns {table.columns}") from None


def noise_draws(table: Table) -> list[int]:
    """For each row, how many standard-normal tensors of the state's shape it consumes."""
    if kind_of(table) == "affine2":
        return [2 if any(r[8:11]) else 0 for r in table.rows]
    return [1 if r[3] != 0.0 else 0 for r in table.rows]


def net_calls(table: Table) -> int:
    """Network evaluations per sample: every posterior/affine1 row, the affine2 rows with net=1."""
    if kind_of(table) == "affine2":
        return sum(1 for r in table.rows if r[0])
    return len(table.rows)


def time_inputs(table: Table, n: int, device, dtype=torch.float32) -> list:
    """Per row, the network's (n,) time input (None where an affine2 row calls no network),
    built before the loop so that nothing inside it allocates from host values."""
    affine2 = kind_of(table) == "affine2"
    j = 1 if affine2 else 0
    return [torch.full((n,), float(r[j]), device=device, dtype=dtype)
            if not affine2 or r[0] else None for r in table.rows]


def _no_range(name: str, color: str = "blue"):
    return contextlib.nullcontext()


@torch.no_grad()
def run(table: Table, net: Callable, x: torch.Tensor, v: torch.Tensor | None = None, *,
        seed: torch.Tensor | None, offset: int = 0, stride: int | None = None,
        times: list | None = None, noise: list | None = None,
        annotate: Callable = _no_range, callback: Callable | None = None) -> int:
    """Run the plan's rows on the state in place; returns the network calls per sample, counted.

    net: posterior/affine1 rows call net(x, t, k) (k the row: a DDGAN binds its z[k]),
    affine2 rows net(x, v, t). seed: the one-element int64 Philox key on x's device (see the
    module docstring for the counters). times: time_inputs(...) prebuilt by the caller (the
    Engine keeps its own static ones). noise: explicit normals instead of the kernels' stream,
    one list per row of noise_draws(table)[row] tensors shaped like x (the C++ runtime's
    oracle). annotate(name, color): a context manager per step and per network call (NVTX).
    callback(k, x, net_out): after each row (net_out None where the row calls no network).
    """
    kind = kind_of(table)
    if (v is not None) != (kind == "affine2"):
        raise ValueError(f"a {kind} plan runs on {'(x, v)' if kind == 'affine2' else 'x'}")
    stride = x.numel() if stride is None else stride
    if stride < x.numel():
        raise ValueError(f"noise stride {stride} must be >= the batch numel {x.numel()}")
    draws = noise_draws(table)
    if noise is not None and (len(noise) != len(draws)
                              or any(len(n) != d for n, d in zip(noise, draws))):
        raise ValueError(f"noise must hold, per row, {draws} tensors")
    if times is None:
        times = time_inputs(table, x.shape[0], x.device)
    counter, nfe = offset, 0
    for k, row in enumerate(table.rows):
        noisy = draws[k] > 0
        off = counter
        counter += stride if noisy else 0
        given = noise[k] if noise is not None and noisy else None
        with annotate(f"step {k}"):
            if kind == "affine2":
                net_on, _, k_v, k_a, T_xx, T_xv, T_vx, T_vv, K11, K21, K22, D_xv = row
                alpha = None
                if net_on:
                    with annotate("net", "green"):
                        alpha = net(x, v, times[k]).to(x.dtype).contiguous()
                    nfe += 1
                dispatch.cld_affine_step_(x, v, alpha, k_v, k_a, (T_xx, T_xv, T_vx, T_vv),
                                          (K11, K21, K22), seed if noisy else None,
                                          off if noisy else 0, D_xv, noise=given)
                if callback is not None:
                    callback(k, x, alpha)
                continue
            if kind == "posterior":
                _, c_e, c_x, sigma = row        # x <- c1 x + c0 x0'
            else:
                _, c_x, c_e, sigma = row
            with annotate("net", "green"):
                e = net(x, times[k], k).to(x.dtype).contiguous()
            nfe += 1
            dispatch.vp_em_step_(x, e, c_x, c_e, sigma, seed, off, noise=given)
            if callback is not None:
                callback(k, x, e)
    return nfe


def twin_noise(table: Table, seed: int, like: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per row, the normals `run` draws on the CPU twins for one batch shaped `like` (keyed by
    (seed, counter), the counter advancing by like.numel() at every noisy row). Fed back to
    `run` as noise=, it reproduces the sampler exactly; written to files, it is the C++
    runtime's --noise input."""
    st, counter, out = seed_tensor(seed, like.device), 0, []
    for d in noise_draws(table):
        out.append(list(affine.twin_normals(st, counter, d, like)) if d else [])
        counter += like.numel() if d else 0
    return out


def run_table(table: Table, net: Callable, x: torch.Tensor, noise: list, *,
              v: torch.Tensor | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """`run` in float32 on copies with explicit noise: the oracle of the C++ runtime. net is
    the DDGAN G(x, z, i), the CLD alpha(x, v, t) or an eps(x, t); z: (nfe, N, z_dim) latents.
    Returns the model-space state x (a latent loop: z_0)."""
    kind = kind_of(table)
    x = x.clone().float()
    if kind == "posterior":
        step_net = lambda xx, t, k: net(xx, z[k], t)  # noqa: E731
    elif kind == "affine1":
        step_net = lambda xx, t, k: net(xx, t)  # noqa: E731
    else:
        step_net = net
    run(table, step_net, x, None if v is None else v.clone().float(), seed=None, noise=noise)
    return x


