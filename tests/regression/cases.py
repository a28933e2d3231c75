"""The regression cases: every sampling path of the released checkpoints, computed once.

Shared by `record.py` (writes hashes.json + outputs.npz from the current code) and
`tests/test_regression_outputs.py` (recomputes every case and compares). If a refactor moves an
API, only the calls in this file change; the recorded outputs must not.

A case is (id, kind, spec):
  kind "cli"    `fastsample sample CKPT --sampler S [--steps N] --num 64 --seed 0 [opts]`,
                run in-process through fastsample.cli.main into a temp dir; the npz's
                `samples` and `nfe`.
  kind "engine" the same with `--engine --batch 64` (fastsample.runtime.Engine).
  kind "table"  fastsample.samplers.plan: the text of the exported Table (`Table.to_text()`)
                and run_table(table, net, x_T, twin_noise(table, 0, x_T), ...) on 64 fixed x_T
                (torch.Generator().manual_seed(0) draws, as tests/test_schedule_table.py does);
                the raw (model / latent space) loop output.

Every compute runs under torch.set_num_threads(1) (see `one_thread`): the thread count changes
CPU reduction order and so the low bits of every network call.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
NUM = 64
SEED = 0


@dataclass(frozen=True)
class Case:
    id: str
    kind: str                 # cli | engine | table
    ckpt: str                 # relative to the repository root
    sampler: str
    steps: int | None = None  # None: the CLI's default (ddgan: its T; ode: adaptive)
    opts: tuple = ()          # extra CLI arguments, e.g. ("--schedule", "uniform")
    tol: str = "digits"       # cross-platform tolerance class: digits | toy | raw
    table: dict = field(default_factory=dict, hash=False, compare=False)


D = "checkpoints/digits/"
G = "checkpoints/grid25/"
ODE3 = ("--rtol", "1e-3", "--atol", "1e-3")
ODE2 = ("--rtol", "1e-2", "--atol", "1e-2")
ODE32 = ("--rtol", "3e-2", "--atol", "3e-2")
UNI = ("--schedule", "uniform")
QUAD = ("--schedule", "quadratic")


def _cli_cases(prefix: str, ckpt: str, tol: str, digits: bool) -> list[Case]:
    """Every sampler of the checkpoint's family. On grid25 (small MLPs, milliseconds per call)
    every variant runs; on digits (U-Nets, ~20-70 ms per call at batch 64 on one thread) the
    ones whose code path a cheaper case already covers are left out to keep the test < 60 s:
    explicit --schedule equal to the default, a second Engine case, the second ODE tolerance
    (cld; ddpm's digits ODE runs at 3e-2 only), and ancestral at 100 / 1000 steps (digits runs
    ancestral at 10 and 20)."""
    c = []
    fam = Path(ckpt).stem
    if fam == "ddgan":
        # DDGAN: the posterior sampler at its trained T only.
        c.append(Case(f"{prefix}/ddgan/posterior", "cli", ckpt, "posterior", None, (), tol))
        c.append(Case(f"{prefix}/ddgan/posterior/engine", "engine", ckpt, "posterior", None, (),
                      tol))
    elif fam == "cld":
        # Default --schedule: quadratic.
        for s in ("sscs", "em"):
            c.append(Case(f"{prefix}/cld/{s}-10", "cli", ckpt, s, 10, (), tol))
            c.append(Case(f"{prefix}/cld/{s}-20", "cli", ckpt, s, 20, (), tol))
            c.append(Case(f"{prefix}/cld/{s}-10-uniform", "cli", ckpt, s, 10, UNI, tol))
            if not digits:
                c.append(Case(f"{prefix}/cld/{s}-10-quadratic", "cli", ckpt, s, 10, QUAD, tol))
        c.append(Case(f"{prefix}/cld/sscs-10/engine", "engine", ckpt, "sscs", 10, (), tol))
        c.append(Case(f"{prefix}/cld/em-10-uniform/engine", "engine", ckpt, "em", 10, UNI, tol))
        if not digits:
            c.append(Case(f"{prefix}/cld/sscs-10-uniform/engine", "engine", ckpt, "sscs", 10,
                          UNI, tol))
            c.append(Case(f"{prefix}/cld/em-10/engine", "engine", ckpt, "em", 10, (), tol))
        c.append(Case(f"{prefix}/cld/ode-1e-2", "cli", ckpt, "ode", None, ODE2, tol))
        if not digits:
            c.append(Case(f"{prefix}/cld/ode-1e-3", "cli", ckpt, "ode", None, ODE3, tol))
    elif fam == "lsgm":
        c.append(Case(f"{prefix}/lsgm/ode-1e-2", "cli", ckpt, "ode", None, ODE2, tol))
        c.append(Case(f"{prefix}/lsgm/ode-1e-3", "cli", ckpt, "ode", None, ODE3, tol))
        c.append(Case(f"{prefix}/lsgm/em-10", "cli", ckpt, "em", 10, (), tol))
        c.append(Case(f"{prefix}/lsgm/em-20", "cli", ckpt, "em", 20, (), tol))
        c.append(Case(f"{prefix}/lsgm/decode/engine", "engine", ckpt, "decode", None, (), tol))
    elif fam == "ddpm":
        # Ancestral: steps = N = 1000 is the full chain, steps < N the eta = 1 posterior on a
        # uniform subsequence. Default ddim --schedule: uniform.
        for n in ((10, 20) if digits else (100, 1000)):
            c.append(Case(f"{prefix}/ddpm/ancestral-{n}", "cli", ckpt, "ancestral", n, (), tol))
        c.append(Case(f"{prefix}/ddpm/ddim-10", "cli", ckpt, "ddim", 10, (), tol))
        c.append(Case(f"{prefix}/ddpm/ddim-20", "cli", ckpt, "ddim", 20, (), tol))
        if not digits:
            c.append(Case(f"{prefix}/ddpm/ddim-10-uniform", "cli", ckpt, "ddim", 10, UNI, tol))
        c.append(Case(f"{prefix}/ddpm/ddim-10-quadratic", "cli", ckpt, "ddim", 10, QUAD, tol))
        c.append(Case(f"{prefix}/ddpm/em-10", "cli", ckpt, "em", 10, (), tol))
        c.append(Case(f"{prefix}/ddpm/em-20", "cli", ckpt, "em", 20, (), tol))
        if digits:     # 38 NFE instead of 56 at 1e-2 (1e-1: 14 NFE, but washed-out digits)
            c.append(Case(f"{prefix}/ddpm/ode-3e-2", "cli", ckpt, "ode", None, ODE32, tol))
        else:
            c.append(Case(f"{prefix}/ddpm/ode-1e-2", "cli", ckpt, "ode", None, ODE2, tol))
            c.append(Case(f"{prefix}/ddpm/ode-1e-3", "cli", ckpt, "ode", None, ODE3, tol))
    return c


def _table_cases() -> list[Case]:
    return [
        Case("digits/ddgan/table", "table", D + "ddgan.safetensors", "posterior", None, (), "raw",
             {"family": "ddgan"}),
        Case("grid25/ddgan/table", "table", G + "ddgan.safetensors", "posterior", None, (),
             "toy", {"family": "ddgan"}),
        Case("digits/cld/table-sscs-10", "table", D + "cld.safetensors", "sscs", 10, (), "raw",
             {"family": "cld", "kind": "quadratic"}),
        Case("digits/cld/table-sscs-10-uniform", "table", D + "cld.safetensors", "sscs", 10, (),
             "raw", {"family": "cld", "kind": "uniform"}),
        Case("digits/cld/table-em-10", "table", D + "cld.safetensors", "em", 10, (), "raw",
             {"family": "cld", "kind": "quadratic"}),
        Case("grid25/cld/table-sscs-10", "table", G + "cld.safetensors", "sscs", 10, (), "toy",
             {"family": "cld", "kind": "quadratic"}),
        Case("grid25/cld/table-em-10", "table", G + "cld.safetensors", "em", 10, (), "toy",
             {"family": "cld", "kind": "quadratic"}),
        Case("digits/lsgm/table-em-10", "table", D + "lsgm.safetensors", "em", 10, (), "raw",
             {"family": "lsgm"}),
    ]


def all_cases() -> list[Case]:
    cases = []
    for fam in ("ddgan", "cld", "lsgm", "ddpm"):
        cases += _cli_cases("digits", D + f"{fam}.safetensors", "digits", True)
    for fam in ("ddgan", "cld", "ddpm"):
        cases += _cli_cases("grid25", G + f"{fam}.safetensors", "toy", False)
    cases += _table_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = all_cases()


#-----------------------------------------------------------------------------------------------
# Compute.

@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cli_args(case: Case, out: str) -> list[str]:
    args = ["sample", str(ROOT / case.ckpt), "--sampler", case.sampler]
    if case.steps is not None:
        args += ["--steps", str(case.steps)]
    args += ["--num", str(NUM), "--seed", str(SEED), *case.opts]
    if case.kind == "engine":
        args += ["--engine", "--batch", str(NUM)]
    return args + ["--out", out]


def describe(case: Case) -> str:
    """The case as a command line (cli, engine) or the run_table call (table)."""
    if case.kind != "table":
        return "fastsample " + " ".join(cli_args(case, "F.npz")).replace(str(ROOT) + "/", "")
    fam = case.table["family"]
    m = f"load_model({case.ckpt!r})"
    if fam == "ddgan":
        return (f"run_table(ddgan_table(m), m.denoise, x_T, twin_noise(table, {SEED}, x_T), "
                f"z=draw_latents(m.T, {NUM}, m.z_dim, {SEED}, 'cpu')); m = {m}")
    if fam == "cld":
        return (f"run_table(cld_table(m, {case.sampler!r}, {case.steps}, "
                f"{case.table['kind']!r}), m.alpha, x_T, twin_noise(table, {SEED}, x_T), v=v_T)"
                f"; x_T, v_T = prior(m.cld, {NUM}, ..., Generator().manual_seed({SEED})); m = {m}")
    return (f"run_table(lsgm_table(m, {case.steps}), m.eps, z_T, twin_noise(table, {SEED}, z_T))"
            f"; z_T = randn(({NUM}, *m.latent_shape), Generator().manual_seed({SEED})); m = {m}")


def _run_cli(case: Case) -> dict:
    from fastsample.cli import main
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "F.npz")
        argv = cli_args(case, out)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(argv)
        if rc != 0:
            raise RuntimeError(f"{case.id}: fastsample {' '.join(argv)} exited {rc}: "
                               f"{err.getvalue().strip()}")
        with np.load(out) as z:
            samples = np.array(z["samples"], dtype=np.float32)
            nfe = z["nfe"].item()
    return {"samples": samples, "nfe": nfe}


def _run_table(case: Case) -> dict:
    from fastsample.samplers.cld import table as cld_table
    from fastsample.samplers.ddgan import table as ddgan_table
    from fastsample.samplers.lsgm import em_table as lsgm_table
    from fastsample.samplers.plan import run_table, twin_noise
    from fastsample.models import load_model
    m, _ = load_model(ROOT / case.ckpt)
    fam = case.table["family"]
    g = torch.Generator().manual_seed(SEED)
    if fam == "ddgan":
        from fastsample.samplers.ddgan import draw_latents
        tab = ddgan_table(m)
        x_T = torch.randn((NUM, *m.data_shape), generator=g)
        z = draw_latents(m.T, NUM, m.z_dim, SEED, "cpu")
        out = run_table(tab, m.denoise, x_T, twin_noise(tab, SEED, x_T), z=z)
    elif fam == "cld":
        from fastsample.samplers.cld import prior
        tab = cld_table(m, case.sampler, case.steps, schedule=case.table["kind"])
        x_T, v_T = prior(m.cld, NUM, m.data_shape, g, "cpu")
        out = run_table(tab, m.alpha, x_T, twin_noise(tab, SEED, x_T), v=v_T)
    elif fam == "lsgm":
        tab = lsgm_table(m, case.steps)
        z_T = torch.randn((NUM, *m.latent_shape), generator=g)
        out = run_table(tab, m.eps, z_T, twin_noise(tab, SEED, z_T))
    else:
        raise ValueError(fam)
    return {"samples": out.detach().float().cpu().numpy(), "nfe": int(tab.header["nfe"][0]),
            "text": tab.to_text()}


def compute(case: Case) -> dict:
    """{'samples': float32 ndarray, 'nfe': int, ['text': str]} of one case (1 thread)."""
    with one_thread():
        if case.kind in ("cli", "engine"):
            return _run_cli(case)
        if case.kind == "table":
            return _run_table(case)
    raise ValueError(f"unknown case kind {case.kind!r}")


#-----------------------------------------------------------------------------------------------
# Hashes and the platform fingerprint.

def array_sha256(a: np.ndarray) -> str:
    """sha256 of the float32 little-endian C-order bytes of `a`."""
    b = np.ascontiguousarray(np.asarray(a, dtype="<f4")).tobytes(order="C")
    return hashlib.sha256(b).hexdigest()


def text_sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def summary(res: dict) -> dict:
    a = res["samples"].astype(np.float64)
    out = {"sha256": array_sha256(res["samples"]), "shape": list(res["samples"].shape),
           "nfe": res["nfe"], "sum": float(a.sum()), "mean": float(a.mean()),
           "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
    if "text" in res:
        out["text_sha256"] = text_sha256(res["text"])
    return out


def _exact_inputs(n: int, salt: int) -> torch.Tensor:
    """n float32 values in [-0.5, 0.5) on a 1/1024 grid from integer arithmetic only (no RNG,
    no libm), so the inputs are the same bits on every platform."""
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 7919 + salt * 104729) % 1024) - 512).to(torch.float32) / 1024


def fingerprint_sha256() -> str:
    """sha256 of a small fixed float32 CPU computation (1 thread) that exercises the kernels the
    samplers' nets run: conv2d, matmul (linear), group_norm, SiLU and exp. Equal fingerprints
    mean this CPU + torch build rounds these ops as the recording machine did."""
    import torch.nn.functional as F
    with one_thread(), torch.no_grad():
        x = _exact_inputs(8 * 4 * 8 * 8, 1).view(8, 4, 8, 8)
        w = _exact_inputs(32 * 4 * 3 * 3, 2).view(32, 4, 3, 3) * 0.25
        b = _exact_inputs(32, 3)
        h = F.conv2d(x, w, b, padding=1)                            # (8, 32, 8, 8)
        h = F.silu(F.group_norm(h, 8))
        m1 = _exact_inputs(64 * 2048, 4).view(64, 2048) * 0.1
        m2 = _exact_inputs(2048 * 96, 5).view(2048, 96) * 0.1
        mm = torch.exp(m1 @ m2)                                     # (64, 96)
        lin = F.linear(h.flatten(1), _exact_inputs(128 * 2048, 6).view(128, 2048) * 0.05)
        out = torch.cat([h.flatten(), mm.flatten(), torch.exp(lin).flatten()])
    return array_sha256(out.numpy())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def platform_fingerprint() -> dict:
    """What must match for the bit-exact comparison: the computation's hash, torch's version,
    the machine and torch's CPU kernel capability (AVX2 / AVX512 dispatch). cpu_model and
    python are recorded for diagnosis only."""
    return {"compute_sha256": fingerprint_sha256(), "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(), "python": sys.version.split()[0]}


MATCH_KEYS = ("compute_sha256", "torch", "machine", "cpu_capability")


def same_platform(recorded: dict, now: dict) -> bool:
    return all(recorded.get(k) == now.get(k) for k in MATCH_KEYS)


#-----------------------------------------------------------------------------------------------
# Cross-platform tolerances (used only when the fingerprint differs).

def within_tolerance(tol: str, got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    """digits: quantised to k/16; at most 1% of elements differ, each by at most one level.
    toy: 2D points, max abs error 1e-4. raw: model-space loop outputs of digits models (not
    quantised), max abs error 1e-3."""
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if not np.isfinite(got).all():
        return False, "non-finite values"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    if tol == "digits":
        frac = float((diff > 0).mean())
        ok = frac <= 0.01 and worst <= 1 / 16 + 1e-6
        return ok, f"{frac:.4%} of elements differ (<= 1%), max {worst:.4g} (<= 1/16)"
    limit = {"toy": 1e-4, "raw": 1e-3}[tol]
    return worst <= limit, f"max abs error {worst:.3g} (<= {limit:g})"
