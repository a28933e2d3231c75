"""What every export shares: the module per `--what`, its I/O contract, the parity gate, the
manifest and the atomic artifact directory (export/README.md documents the result).

An export is: load the checkpoint -> build a Spec (module + named inputs/outputs + schedule
table) -> a format writes its model file(s) into a temp dir beside the target -> the artifact
is run on fixed inputs and compared with eager float32 PyTorch -> manifest.json + schedule.txt
-> rename onto the target. A failed gate raises ExportError and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
from torch import nn

from fastsample.models import registry
from fastsample.models.registry import ExportPart, IOTensor

MANIFEST_VERSION = 1
FORMATS = ("onnx", "aoti", "tensorrt", "triton-repo")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
# The modules exported per --what come from the family's registry entry (models/<family>.py
# EXPORTS); here: the dtype wrapper every format shares.

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


#-----------------------------------------------------------------------------------------------
# Spec: one module and its I/O contract.

Tensor = IOTensor


@dataclass
class Spec(ExportPart):
    """An ExportPart with the family and --what it was built for."""
    family: str = ""
    what: str = ""


def resolve_what(family: str, what: str | None) -> str:
    """`--what` checked against the family's exports; None: its first (default) export."""
    entry = registry.get(family)
    if not entry.exports:
        listing = "; ".join(f"{e.name} {'|'.join(e.exports)}" for e in registry.REGISTRY.values()
                            if e.exports)
        raise ExportError(f"{entry.name} checkpoints have nothing to export (exportable: "
                          f"{listing})")
    if what is None:
        return next(iter(entry.exports))
    if what not in entry.exports:
        raise ExportError(f"--what {what} does not fit a {entry.name} checkpoint; a "
                          f"{entry.name} checkpoint exports {'|'.join(entry.exports)}")
    return what


def build_spec(model, card, what: str, sampler: str | None = None, steps: int | None = None,
               schedule: str | None = None) -> Spec:
    """The module and contract for `--what` of a loaded model, with the plan of `sampler` at
    `steps` (defaults: the family's export sampler and its default budget) as schedule.txt;
    anything that does not fit the family -> ExportError."""
    entry = registry.get(card.family)
    exports = entry.exports
    what = resolve_what(entry.name, what)
    sampler = sampler or entry.export_sampler
    try:
        spec = entry.sampling.sampler(sampler)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if not spec.plan:
        raise ExportError(f"{entry.name} sampler {sampler!r} has no fixed schedule table (it is "
                          f"adaptive); choose "
                          f"{'|'.join(n for n, s in entry.sampling.samplers.items() if s.plan)}")
    opts = {}
    if schedule is not None:
        if "schedule" not in spec.options:
            raise ExportError(f"--schedule does not apply to {entry.name} {sampler}")
        opts["schedule"] = schedule
    if steps is None:
        steps = entry.default_steps(model, sampler)
    try:
        table = entry.sampling.plan(model, sampler, steps, **opts)
    except ValueError as e:
        raise ExportError(str(e)) from None
    part = exports[what](model, table)
    return Spec(**{f.name: getattr(part, f.name) for f in dataclasses.fields(ExportPart)},
                family=entry.name, what=what)


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
