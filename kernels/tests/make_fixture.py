"""ctest fixture: artifact directories + noise + the Python loop's outputs for the C++ runtime.

    python kernels/tests/make_fixture.py OUT_DIR [--num 4] [--cld-steps 8]

Writes, for each case (ddgan, ddgan-sampler, cld-sscs, cld-em):

    OUT_DIR/<case>/model.pt2        AOTInductor package from `python -m fastsample.export --format
                                    aoti` (export_model_pt2; one compile per family and --what, the
                                    cld-em directory reuses cld-sscs's file); ddgan-sampler is the
                                    `--what sampler` graph (the whole loop, one call)
    OUT_DIR/<case>/schedule.txt     fastsample.samplers.plan table
    OUT_DIR/<case>/manifest.json    the export's manifest, its schedule, sampler, steps and files
                                    (sha256 of model.pt2 and schedule.txt) rewritten for the case
    OUT_DIR/<case>/noise/           x_T.npy, v_T.npy (cld), z.npy (ddgan), noise.npy: the draws the
                                    loop consumes, in the format of kernels/README.md
    OUT_DIR/<case>/expected/        x.npy (model space) and samples.npy (data space) from run_table
                                    on the eager net (the oracle), x_aoti.npy / samples_aoti.npy
                                    from run_table on the same model.pt2 loaded in Python

Before writing, it checks that run_table reproduces the family's real sampler (the CPU twins'
noise, as tests/test_schedule_table.py does), so the expected outputs are the sampler's outputs.
A stamp file keyed by the inputs (checkpoints, this script, fastsample/export, torch, options)
makes a second run a no-op: AOTInductor compiles take about a minute each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from fastsample.samplers.plan import (Table, postprocess, run_table,
                                        twin_noise)
from fastsample.samplers.cld import table as cld_table
from fastsample.samplers.ddgan import table as ddgan_table
from fastsample.models import load_model
from fastsample.samplers import cld as sc
from fastsample.samplers import ddgan as sd

ROOT = Path(__file__).resolve().parents[2]
DDGAN_CKPT = ROOT / "checkpoints/digits/ddgan.safetensors"
CLD_CKPT = ROOT / "checkpoints/digits/cld.safetensors"
SEED = 3
MAX_BATCH = 256             # the artifacts' dynamic batch range is [1, MAX_BATCH]
BATCH_SPLIT = 3             # expected/*_b3.npy: the Python loop in batches of 3


#-----------------------------------------------------------------------------------------------
# The one export call: the product's own exporter, so ctest runs what users deploy.

def export_model_pt2(ckpt: Path, what: str, out: Path) -> dict:
    """`python -m fastsample.export CKPT --format aoti --what WHAT` (its parity gate included);
    the fixture keeps model.pt2 and returns the manifest, and writes its own schedule.txt per
    case (_write_case rewrites the manifest to match)."""
    from fastsample.export.command import main as export_main
    art = out.parent / f".export-{what}"
    rc = export_main([str(ckpt), "--format", "aoti", "--what", what, "--out", str(art),
                      "--max-batch", str(MAX_BATCH)])
    if rc != 0:
        sys.exit(f"make_fixture: python -m fastsample.export failed (exit {rc})")
    shutil.move(str(art / "model.pt2"), str(out))
    manifest = json.loads((art / "manifest.json").read_text())
    shutil.rmtree(art)
    return manifest


#-----------------------------------------------------------------------------------------------
# Fixture cases.

def _save(path: Path, t: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(t.detach().cpu().float().numpy()).astype("<f4"))


def _flat_noise(noise: list, like: torch.Tensor) -> torch.Tensor:
    draws = [n for row in noise for n in row]
    return torch.stack(draws) if draws else torch.zeros((0, *like.shape))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_case(case: Path, table: Table, model_pt2: Path, noise_files: dict, expected: dict,
                manifest: dict):
    case.mkdir(parents=True, exist_ok=True)
    if model_pt2 != case / "model.pt2":
        shutil.copyfile(model_pt2, case / "model.pt2")
    table.write(case / "schedule.txt")
    # The export's manifest for this case's table; files: what the runtime loads (noise/ and
    # expected/ are test data beside the artifact).
    man = dict(manifest)
    man.update({
        "sampler": table.header["sampler"][0], "steps": table.header["nfe"][0],
        "schedule": {"file": "schedule.txt",
                     "header": {k: list(v) for k, v in table.header.items()},
                     "columns": list(table.columns), "rows": [list(r) for r in table.rows]},
        "files": {name: _sha256(case / name) for name in ("model.pt2", "schedule.txt")},
        "note": "export manifest rewritten by kernels/tests/make_fixture.py (test fixture)"})
    (case / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    for name, t in noise_files.items():
        _save(case / "noise" / f"{name}.npy", t)
    for name, t in expected.items():
        _save(case / "expected" / f"{name}.npy", t)


def _batched(table: Table, net, x, noise, batch: int, z=None, v=None) -> torch.Tensor:
    """run_table over batches of `batch` samples, each with its slice of every draw."""
    outs = []
    for s in range(0, x.shape[0], batch):
        sl = slice(s, s + batch)
        outs.append(run_table(table, net, x[sl], [[n[sl] for n in row] for row in noise],
                              z=None if z is None else z[:, sl], v=None if v is None else v[sl]))
    return torch.cat(outs)


def _expected(table: Table, eager, aoti, x, noise, **kw) -> dict:
    """Model and data space outputs of the Python loop: eager net (the oracle) and model.pt2,
    whole batch and batches of BATCH_SPLIT (a compiled net's rounding may depend on the batch)."""
    x_eager = run_table(table, eager, x, noise, **kw)
    x_aoti = run_table(table, aoti, x, noise, **kw)
    x_split = _batched(table, aoti, x, noise, BATCH_SPLIT, **kw)
    return {"x": x_eager, "samples": postprocess(table, x_eager),
            "x_aoti": x_aoti, "samples_aoti": postprocess(table, x_aoti),
            f"x_aoti_b{BATCH_SPLIT}": x_split,
            f"samples_aoti_b{BATCH_SPLIT}": postprocess(table, x_split)}


def make_ddgan(out: Path, num: int) -> None:
    m, _ = load_model(DDGAN_CKPT)
    tab = ddgan_table(m)
    x_T = torch.randn((num, *m.data_shape), generator=torch.Generator().manual_seed(SEED))
    z = sd.draw_latents(m.T, num, m.z_dim, SEED, "cpu")
    noise = twin_noise(tab, SEED, x_T)
    # The table's loop is the sampler: same noise, identical samples.
    want, _ = sd.sample(m, "posterior", m.T, num, SEED)
    got = postprocess(tab, run_table(tab, m.denoise, x_T, noise, z=z))
    if not torch.equal(got, want):
        sys.exit("make_fixture: run_table does not reproduce the ddgan sampler")
    case = out / "ddgan"
    case.mkdir(parents=True, exist_ok=True)
    man = export_model_pt2(DDGAN_CKPT, "generator", case / "model.pt2")
    aoti = torch._inductor.aoti_load_package(str(case / "model.pt2"))
    expected = _expected(tab, m.denoise, aoti, x_T, noise, z=z)
    noise_files = {"x_T": x_T, "z": z, "noise": _flat_noise(noise, x_T)}
    _write_case(case, tab, case / "model.pt2", noise_files, expected, man)
    # --what sampler: the whole loop as one graph, fed the same draws batch-first; noise
    # (N, T, ...) holds each row's draw (zeros where sigma = 0, a row the graph reads but does
    # not use).
    case = out / "ddgan-sampler"
    case.mkdir(parents=True, exist_ok=True)
    man = export_model_pt2(DDGAN_CKPT, "sampler", case / "model.pt2")
    graph = torch._inductor.aoti_load_package(str(case / "model.pt2"))
    full = torch.stack([row[0] if row else torch.zeros_like(x_T) for row in noise], dim=1)
    zb = z.transpose(0, 1)

    def whole(sl):
        with torch.no_grad():
            x0, samples = graph(x_T[sl], zb[sl].contiguous(), full[sl].contiguous())
        if not torch.equal(samples, postprocess(tab, x0)):
            sys.exit("make_fixture: the sampler graph's samples are not postprocess(x0)")
        return x0
    x_g = whole(slice(None))
    x_g3 = torch.cat([whole(slice(s, s + BATCH_SPLIT)) for s in range(0, num, BATCH_SPLIT)])
    expected = {"x": expected["x"], "samples": expected["samples"],
                "x_aoti": x_g, "samples_aoti": postprocess(tab, x_g),
                f"x_aoti_b{BATCH_SPLIT}": x_g3,
                f"samples_aoti_b{BATCH_SPLIT}": postprocess(tab, x_g3)}
    _write_case(case, tab, case / "model.pt2", noise_files, expected, man)


def make_cld(out: Path, num: int, steps: int) -> None:
    m, _ = load_model(CLD_CKPT)
    g = torch.Generator().manual_seed(SEED)
    # sc.prior, with the unscaled v draw kept: the C++ side multiplies by prior_v_scale.
    x_T = torch.randn((num, *m.data_shape), generator=g)
    v_raw = torch.randn((num, *m.data_shape), generator=g)
    v_T = v_raw * math.sqrt(m.cld.M)
    model_pt2 = out / "cld-sscs" / "model.pt2"
    model_pt2.parent.mkdir(parents=True, exist_ok=True)
    man = export_model_pt2(CLD_CKPT, "score", model_pt2)
    aoti = torch._inductor.aoti_load_package(str(model_pt2))
    for name in ("sscs", "em"):
        tab = cld_table(m, name, steps)
        noise = twin_noise(tab, SEED, x_T)
        want, _ = sc.sample(m, name, steps, num, SEED, "cpu")
        got = postprocess(tab, run_table(tab, m.alpha, x_T, noise, v=v_T))
        if not torch.equal(got, want):
            sys.exit(f"make_fixture: run_table does not reproduce the cld {name} sampler")
        _write_case(out / f"cld-{name}", tab, model_pt2,
                    {"x_T": x_T, "v_T": v_raw, "noise": _flat_noise(noise, x_T)},
                    _expected(tab, m.alpha, aoti, x_T, noise, v=v_T), man)


#-----------------------------------------------------------------------------------------------

def _stamp(args) -> str:
    h = hashlib.sha256()
    for p in (DDGAN_CKPT, CLD_CKPT, Path(__file__),
              *sorted((ROOT / "fastsample/export").glob("*.py"))):
        h.update(p.read_bytes())
    h.update(f"{torch.__version__} {args.num} {args.cld_steps} {SEED} {MAX_BATCH} {BATCH_SPLIT}"
             .encode())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--num", type=int, default=4, help="samples per case")
    ap.add_argument("--cld-steps", type=int, default=8, help="NFE of the cld sscs/em tables")
    args = ap.parse_args(argv)
    stamp_file, stamp = args.out / "fixture.stamp", _stamp(args)
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        print(f"make_fixture: {args.out} is up to date")
        return 0
    torch.set_num_threads(1)
    if args.out.exists():
        shutil.rmtree(args.out)
    make_ddgan(args.out, args.num)
    make_cld(args.out, args.num, args.cld_steps)
    stamp_file.write_text(stamp)
    print(f"make_fixture: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
