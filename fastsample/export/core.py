"""What every export shares: the module per `--what`, its I/O contract, the parity gate, the
manifest and the atomic artifact directory (export/README.md documents the result).

An export is: load the checkpoint -> build a Spec (module + named inputs/outputs + schedule
table) -> a format writes its model file(s) into a temp dir beside the target -> the artifact
is run on fixed inputs and compared with eager float32 PyTorch -> manifest.json + schedule.txt
-> rename onto the target. A failed gate raises ExportError and leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
from torch import nn

from fastsample.export.schedule import Table, cld_table, ddgan_table, lsgm_table

MANIFEST_VERSION = 1
FORMATS = ("onnx", "aoti", "tensorrt", "triton-repo")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WHATS = {"ddgan": ("generator", "sampler"), "cld": ("score",), "lsgm": ("decoder", "score")}
MODEL_FILE = {"onnx": "model.onnx", "aoti": "model.pt2", "tensorrt": "model.plan"}
DEFAULT_MAX_BATCH = 256
PARITY_SEED = 0

# Parity tolerance per dtype and network call: an element passes when
# |got - ref| <= (atol + rtol |ref|) * calls, with ref the eager float32 model and calls the
# network evaluations inside the graph (T for the DDGAN sampler: each step adds its own rounding
# and the next step feeds on it). fp32 exports measure ~1e-6 per call (ONNX Runtime and AOTI
# reorder sums), with rare outliers: 1.07e-4 in one of 49k sampler elements (AOTI, batch 256);
# half types carry their own rounding through every layer.
TOLERANCE = {"fp32": {"atol": 1e-4, "rtol": 1e-4},
             "fp16": {"atol": 3e-2, "rtol": 3e-2},
             "bf16": {"atol": 1.5e-1, "rtol": 1e-1}}
# Quantised outputs (DDGAN samples, the LSGM decoder's levels) may flip by one level where the
# eager value sits within rounding of a level boundary; at most this fraction of elements.
MAX_FLIP_FRACTION = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


class ExportError(ValueError):
    """A user-facing export failure: one line, exit code 2 from the CLI."""


def progress(stage: str, msg: str) -> None:
    print(f"export: {stage:<8} {msg}", file=sys.stderr, flush=True)


#-----------------------------------------------------------------------------------------------
# The modules exported per --what (inputs and outputs in the contract's order).

class DDGANGenerator(nn.Module):
    """(x_t, z, t) -> x0: the generator's x_0' prediction, t the float step index i."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, z, t):
        return self.model.denoise(x_t, z, t)


class DDGANSampler(nn.Module):
    """(x_T, z (T,N,z_dim), noise (T,N,...)) -> (x0, samples): the whole posterior loop with the
    schedule's float64 constants baked in; the same arithmetic as schedule.run_table."""

    def __init__(self, model, table: Table):
        super().__init__()
        self.model = model
        self.rows = [tuple(r) for r in table.rows]
        self.post = table.header["postprocess"][0]

    def forward(self, x_T, z, noise):
        x = x_T
        for k, (i, c0, c1, sigma) in enumerate(self.rows):
            t = x.new_full((x.shape[0],), i)
            x0 = self.model.denoise(x, z[k], t)
            x = c0 * x0 + c1 * x
            if sigma:
                x = x + sigma * noise[k]
        return x, to_data(self.post, x)


class CLDScore(nn.Module):
    """(x, v, t) -> alpha = Model.alpha(x, v, t), t the forward time."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, v, t):
        return self.model.alpha(x, v, t)


class LSGMDecoder(nn.Module):
    """z0 -> x in model space (Model.decode: the level's bin centre, argmax or rounded mean)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z0):
        return self.model.decode(z0)


class LSGMScore(nn.Module):
    """(z_t, t) -> eps = Model.eps(z_t, t), the mixed-score eps prediction."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z_t, t):
        return self.model.eps(z_t, t)


class Autocast(nn.Module):
    """fp16 / bf16 exports: the fp32 module under torch.autocast, I/O in the half type.

    The nets are written for autocast (time embeddings and GroupNorm statistics stay float32,
    convolutions and matmuls run in the half type), so a plain .half() copy does not even run
    eagerly; the traced graph carries autocast's casts and keeps the weights in float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.inner, self.dtype, self.device_type = inner, dtype, device_type

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(*args)
        if isinstance(out, torch.Tensor):
            return out.to(self.dtype)
        return tuple(o.to(self.dtype) for o in out)


def for_dtype(module: nn.Module, dtype: str, device) -> nn.Module:
    """The module to trace for --dtype: a float32 copy, or that copy under autocast."""
    import copy
    m = copy.deepcopy(module).float().to(device).eval()
    if dtype == "fp32":
        return m
    return Autocast(m, DTYPES[dtype], torch.device(device).type).eval()


def to_data(kind: str, x: torch.Tensor) -> torch.Tensor:
    """schedule.postprocess inside a graph, in x's dtype (17 levels k/16 are exact in fp16)."""
    if kind == "quantize17":
        return (torch.floor((x + 1) / 2 * 17).clamp(0, 16) / 16).to(x.dtype)
    if kind == "clamp01":
        return ((x + 1) / 2).clamp(0, 1)
    return x.clone()        # a graph output of its own (2D points: samples = x0)


#-----------------------------------------------------------------------------------------------
# Spec: one module and its I/O contract.

@dataclass
class Tensor:
    name: str
    shape: tuple            # ints, with the string "batch" on the dynamic axis
    dtype: str = "float32"
    level: float = 0.0      # > 0: a quantised output on a grid of this step (parity allows flips)

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index("batch") if "batch" in self.shape else None

    def concrete(self, n: int) -> tuple:
        return tuple(n if d == "batch" else d for d in self.shape)

    def to_json(self) -> dict:
        ax = self.batch_axis
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "dynamic_axes": {} if ax is None else {str(ax): "batch"}}


@dataclass
class Spec:
    family: str
    what: str
    module: nn.Module
    inputs: list
    outputs: list
    table: Table
    sampler: str
    steps: int
    draw: Callable            # draw(n, generator) -> tuple of float32 input tensors
    inputs_doc: str           # how the parity inputs are drawn (for the manifest)
    extra: dict = field(default_factory=dict)
    calls: int = 1            # network evaluations in the graph (scales the parity tolerance)


def build_spec(model, card, what: str, sampler: str | None = None, steps: int | None = None,
               schedule: str | None = None) -> Spec:
    """The module and contract for `--what` of a loaded model; wrong family -> ExportError."""
    fam = card.family
    if fam not in WHATS:
        raise ExportError(f"{fam} checkpoints have nothing to export (exportable: "
                          f"ddgan generator|sampler, cld score, lsgm decoder|score)")
    if what not in WHATS[fam]:
        raise ExportError(f"--what {what} does not fit a {fam} checkpoint; a {fam} checkpoint "
                          f"exports {'|'.join(WHATS[fam])}")
    from fastsample.cli import default_steps
    if fam == "ddgan":
        if sampler not in (None, "posterior"):
            raise ExportError(f"ddgan samples with 'posterior', not {sampler!r}")
        if steps not in (None, model.T):
            raise ExportError(f"this DDGAN checkpoint was trained with T={model.T}; --steps "
                              f"must be {model.T}, got {steps}")
        table, sampler, steps = ddgan_table(model), "posterior", model.T
        shape, zd, T = tuple(model.data_shape), model.z_dim, model.T
        if what == "generator":
            def draw(n, g):
                return (torch.randn(n, *shape, generator=g), torch.randn(n, zd, generator=g),
                        torch.randint(1, T + 1, (n,), generator=g).float())
            return Spec(fam, what, DDGANGenerator(model),
                        [Tensor("x_t", ("batch", *shape)), Tensor("z", ("batch", zd)),
                         Tensor("t", ("batch",))], [Tensor("x0", ("batch", *shape))],
                        table, sampler, steps, draw,
                        f"x_t, z ~ N(0, I); t uniform in 1..{T}")
        level = 1 / 16 if table.header["postprocess"][0] == "quantize17" else 0.0

        def draw(n, g):
            return (torch.randn(n, *shape, generator=g), torch.randn(T, n, zd, generator=g),
                    torch.randn(T, n, *shape, generator=g))
        return Spec(fam, what, DDGANSampler(model, table),
                    [Tensor("x_T", ("batch", *shape)), Tensor("z", (T, "batch", zd)),
                     Tensor("noise", (T, "batch", *shape))],
                    [Tensor("x0", ("batch", *shape)), Tensor("samples", ("batch", *shape),
                                                              level=level)],
                    table, sampler, steps, draw, "x_T, z, noise ~ N(0, I)", calls=T)
    if fam == "cld":
        sampler = sampler or "sscs"
        if sampler not in ("sscs", "em"):
            raise ExportError(f"cld sampler {sampler!r} has no fixed schedule table; "
                              f"choose sscs|em")
        steps = steps or default_steps(fam, sampler, model)
        try:
            table = cld_table(model, sampler, steps, schedule or "quadratic")
        except ValueError as e:
            raise ExportError(str(e)) from None
        shape, eps = tuple(model.data_shape), model.cld.config.sampling_eps

        def draw(n, g):
            return (torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g),
                    eps + (1 - eps) * torch.rand(n, generator=g))
        return Spec(fam, what, CLDScore(model),
                    [Tensor("x", ("batch", *shape)), Tensor("v", ("batch", *shape)),
                     Tensor("t", ("batch",))], [Tensor("alpha", ("batch", *shape))],
                    table, sampler, steps, draw,
                    f"x, v ~ N(0, I); t uniform in [{eps:g}, 1]")
    # lsgm
    sampler = sampler or "em"
    if sampler != "em":
        raise ExportError(f"lsgm sampler {sampler!r} has no fixed schedule table (the ODE is "
                          f"adaptive); choose em")
    steps = steps or default_steps(fam, sampler, model)
    table = lsgm_table(model, steps)
    lat, data = tuple(model.latent_shape), tuple(table.header["data_shape"])
    if what == "decoder":
        K = model.vae_cfg.num_levels

        def draw(n, g):
            return (torch.randn(n, *lat, generator=g),)
        return Spec(fam, what, LSGMDecoder(model), [Tensor("z0", ("batch", *lat))],
                    [Tensor("x", ("batch", *data), level=2 / K)], table, sampler, steps, draw,
                    "z0 ~ N(0, I)", {"decode": model.cfg.decode})

    def draw(n, g):
        return torch.randn(n, *lat, generator=g), torch.rand(n, generator=g)
    return Spec(fam, what, LSGMScore(model),
                [Tensor("z_t", ("batch", *lat)), Tensor("t", ("batch",))],
                [Tensor("eps", ("batch", *lat))], table, sampler, steps, draw,
                "z_t ~ N(0, I); t uniform in [0, 1]")


def example_inputs(spec: Spec, n: int, dtype: torch.dtype = torch.float32, device="cpu",
                   seed: int = PARITY_SEED) -> tuple:
    g = torch.Generator().manual_seed(seed + n)
    return tuple(a.to(device=device, dtype=dtype) for a in spec.draw(n, g))


def dynamic_shapes(spec: Spec, lo: int, hi: int, wrapped: bool = False):
    """torch.export dynamic_shapes for the batch axis, positional (None when static). wrapped:
    the module is an Autocast(*args) wrapper, whose one parameter holds the tuple."""
    if lo == hi:
        return None
    B = torch.export.Dim("batch", min=lo, max=hi)
    shapes = tuple({t.batch_axis: B} if t.batch_axis is not None else None for t in spec.inputs)
    return (shapes,) if wrapped else shapes


#-----------------------------------------------------------------------------------------------
# Parity: the artifact on fixed inputs vs eager float32.

def parity_batches(lo: int, hi: int) -> list[int]:
    return sorted({lo, min(max(lo, 5), hi), hi})


@torch.no_grad()
def check_parity(spec: Spec, run: Callable, dtype: str, batches: list[int], device="cpu",
                 runtime: str = "") -> dict:
    """run(inputs in the export dtype) -> list of outputs; compared with the fp32 eager module.

    Continuous outputs: max_abs = max |got - ref|, max_rel = max_abs / max |ref|; the gate is
    |got - ref| <= atol + rtol |ref| elementwise. Quantised outputs: elements off by exactly one
    level are counted as flips (allowed up to MAX_FLIP_FRACTION, where the eager value sits at a
    level boundary); anything else must match within atol."""
    tol = {k: v * spec.calls for k, v in TOLERANCE[dtype].items()}
    tdt = DTYPES[dtype]
    module = spec.module.float()
    report = {o.name: {"max_abs": 0.0, "max_rel": 0.0, "level_flips": 0, "elements": 0}
              for o in spec.outputs}
    failures = []
    for n in batches:
        x32 = example_inputs(spec, n, torch.float32, device)
        ref = module(*x32)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = run(tuple(a.to(tdt) for a in x32))
        for o, r, a in zip(spec.outputs, ref, got):
            a = torch.as_tensor(a).to(device=r.device, dtype=torch.float32)
            r = r.float()
            if tuple(a.shape) != tuple(r.shape):
                raise ExportError(f"parity: output {o.name} has shape {tuple(a.shape)} at batch "
                                  f"{n}, eager gives {tuple(r.shape)}")
            err = (a - r).abs()
            rep = report[o.name]
            rep["elements"] += r.numel()
            if not torch.isfinite(a).all():
                failures.append(f"{o.name}: non-finite values at batch {n}")
                continue
            if o.level:
                flip = (err - o.level).abs() <= 1e-3 * o.level
                rep["level_flips"] += int(flip.sum())
                err = torch.where(flip, torch.zeros_like(err), err)
            bound = tol["atol"] + tol["rtol"] * r.abs()
            rep["max_abs"] = max(rep["max_abs"], float(err.max()))
            rep["max_rel"] = max(rep["max_rel"], float(err.max() / r.abs().max().clamp(min=1e-12)))
            if bool((err > bound).any()):
                k = int((err > bound).sum())
                failures.append(f"{o.name}: {k} element(s) off by up to {float(err.max()):.3g} "
                                f"at batch {n}")
    for o in spec.outputs:
        rep = report[o.name]
        if o.level and rep["level_flips"] > MAX_FLIP_FRACTION[dtype] * rep["elements"]:
            failures.append(f"{o.name}: {rep['level_flips']} of {rep['elements']} levels "
                            f"flipped (allowed {MAX_FLIP_FRACTION[dtype]:g})")
    out = {"reference": f"eager float32 PyTorch {torch.__version__} on {device}",
           "runtime": runtime, "batches": batches, "seed": PARITY_SEED, "inputs": spec.inputs_doc,
           "tolerance": {**tol, "max_flip_fraction": MAX_FLIP_FRACTION[dtype],
                         "network_calls": spec.calls},
           "max_abs": max(r["max_abs"] for r in report.values()),
           "max_rel": max(r["max_rel"] for r in report.values()),
           "outputs": report, "passed": not failures}
    if failures:
        raise ExportError(f"parity gate failed for {spec.family} {spec.what} in {dtype} "
                          f"({runtime}): " + "; ".join(failures)
                          + f" (tolerance atol={tol['atol']:g}, rtol={tol['rtol']:g})")
    return out


#-----------------------------------------------------------------------------------------------
# Artifact directory: temp dir beside the target, renamed at the end.

class ArtifactDir:
    """`with ArtifactDir(target) as tmp:` write into tmp; on success tmp replaces target (an
    earlier export or an empty dir); on any exception tmp is removed and target is untouched.

    Only a directory that is provably a fastsample artifact is ever replaced: its manifest.json
    is a fastsample manifest (verify.read_manifest) and lists exactly the files present (no
    other file, folder or symlink beside them). Anything else, a foreign app's manifest.json
    or an artifact the user added a file to, is refused before any work with ExportError.
    A symlinked target is followed: the directory it points to is replaced, the link stays.
    The target may not be the current directory or one of its ancestors."""

    def __init__(self, target):
        self.target = Path(target)

    def _resolve(self) -> Path:
        t = self.target
        if t.is_symlink():
            try:
                return t.resolve(strict=True)
            except (OSError, RuntimeError):
                raise ExportError(f"cannot write {t}: it is a symlink to a missing or looping "
                                  f"path") from None
        return t

    def check(self) -> None:
        t = self._resolve()
        check_not_cwd(t)
        parent = t.parent
        for p in (t, *t.parents):
            if p.exists():
                if not p.is_dir():
                    raise ExportError(f"cannot write {t}: {p} is not a directory")
                break
        if t.exists():
            why = _not_replaceable(t)
            if why:
                raise ExportError(f"{self.target} exists and is not an earlier fastsample "
                                  f"export ({why}); refusing to overwrite it")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot create {parent}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ExportError(f"cannot write to {parent}: permission denied")

    def __enter__(self) -> Path:
        self.check()
        self.real = self._resolve()
        self.tmp = self.real.parent / f".{self.real.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise ExportError(f"cannot write to {self.real.parent}: {e.strerror or e}") from None
        return self.tmp

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        t = self.real
        old = None
        if t.exists():
            # Checked again: the directory may have changed while the export ran.
            why = _not_replaceable(t)
            if why:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise ExportError(f"{self.target} changed during the export ({why}); "
                                  f"refusing to overwrite it")
            old = t.parent / f".{t.name}.old-{os.getpid()}"
            os.rename(t, old)
        os.rename(self.tmp, t)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def check_not_cwd(target) -> None:
    """Refuse an artifact target that is the current directory or one of its ancestors (it
    would be renamed away under the running process, and everything in it replaced)."""
    t = Path(target)
    try:
        real, cwd = t.resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError) as e:
        raise ExportError(f"cannot resolve {t}: {e}") from None
    if real == cwd or real in cwd.parents:
        raise ExportError(f"--out {t} is the current directory or one of its parents; name a "
                          f"new or earlier-export directory instead")


def _not_replaceable(t: Path) -> str:
    """Why directory `t` may not be replaced by an export ('' if it may: empty, or an earlier
    fastsample export whose manifest lists exactly the files present)."""
    if not t.is_dir():
        return "not a directory"
    entries = list(t.iterdir())
    if not entries:
        return ""
    from fastsample.export.verify import MANIFEST, read_manifest
    if not (t / MANIFEST).exists():
        return f"no {MANIFEST}"
    try:
        man = read_manifest(t)
    except ExportError as e:
        return f"its {MANIFEST} is not a fastsample manifest: {e}"
    listed = set(man["files"])
    dirs = {str(PurePosixPath(f).parent) for f in listed} - {"."}
    dirs |= {str(p) for d in list(dirs) for p in PurePosixPath(d).parents} - {"."}
    extra = []
    for root, dnames, fnames in os.walk(t):
        for n in dnames + fnames:
            full = Path(root) / n
            rel = full.relative_to(t).as_posix()
            if full.is_symlink():
                extra.append(rel)
            elif n in dnames:
                if rel not in dirs:
                    extra.append(rel + "/")
            elif rel != MANIFEST and rel not in listed:
                extra.append(rel)
        dnames[:] = [n for n in dnames if not (Path(root) / n).is_symlink()
                     and (Path(root) / n).relative_to(t).as_posix() in dirs]
    missing = sorted(f for f in listed if not (t / f).is_file())
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"it holds files its {MANIFEST} does not list: {', '.join(sorted(extra)[:3])}{more}"
    if missing:
        return f"files its {MANIFEST} lists are missing: {', '.join(missing[:3])}"
    return ""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(tmp: Path, spec: Spec, *, fmt: str, dtype: str, device: str, lo: int, hi: int,
                   parity: dict, checkpoint, card, versions: dict,
                   extra: dict | None = None) -> dict:
    """schedule.txt + manifest.json (sha256 of every other file in the directory tree)."""
    spec.table.write(tmp / "schedule.txt")
    # A TensorRT engine keeps the ONNX graph's float32 I/O; --dtype sets its inner precision.
    tname = "float32" if fmt == "tensorrt" else str(DTYPES[dtype]).replace("torch.", "")
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    from fastsample import __version__
    man = {
        "manifest_version": MANIFEST_VERSION,
        "family": spec.family, "what": spec.what, "format": fmt, "dtype": dtype,
        "device": device,
        "inputs": [{**t.to_json(), "dtype": tname} for t in spec.inputs],
        "outputs": [{**t.to_json(), "dtype": tname} for t in spec.outputs],
        "batch": {"min": lo, "max": hi, "dynamic": lo != hi},
        "sampler": spec.sampler, "steps": spec.steps,
        "schedule": {"file": "schedule.txt", "header": {k: list(v) for k, v in
                                                        spec.table.header.items()},
                     "columns": list(spec.table.columns),
                     "rows": [list(r) for r in spec.table.rows]},
        **versions,
        "files": files,
        "parity": parity,
        "checkpoint": {"path": str(checkpoint), "sha256": sha256(checkpoint),
                       "card_commit": card.git_commit, "dataset": card.dataset,
                       "train_steps": card.train_steps},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fastsample_version": __version__,
        **spec.extra, **(extra or {}),
    }
    (tmp / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
        return False
