"""ctest fixture: artifact directories + noise + the Python loop's outputs for the C++ runtime.

    python kernels/tests/make_fixture.py OUT_DIR [--num 4] [--cld-steps 8]

Writes, for each case (ddgan, ddgan-sampler, cld-sscs, cld-em, latent-ddgan-sampler,
latent-cld-sampler):

    OUT_DIR/<case>/model.pt2        AOTInductor package from `python -m fastsample.export --format
                                    aoti` (export_model_pt2; one compile per family and --what, the
                                    cld-em directory reuses cld-sscs's file); ddgan-sampler is the
                                    `--what sampler` graph (the whole loop, one call), as are
                                    the latent-* cases (latent loop + decoder step; latent-cld
                                    at --sampler sscs --steps LATENT_CLD_STEPS)
    OUT_DIR/<case>/schedule.txt     fastsample.samplers.plan table
    OUT_DIR/<case>/manifest.json    the export's manifest, its schedule, sampler, steps and files
                                    (sha256 of model.pt2 and schedule.txt) rewritten for the case
    OUT_DIR/<case>/noise/           x_T.npy, v_T.npy (cld), z.npy (ddgan), noise.npy: the draws the
                                    loop consumes, in the format of kernels/README.md
    OUT_DIR/<case>/expected/        x.npy (model space) and samples.npy (data space) from run_table
                                    on the eager net (the oracle), x_aoti.npy / samples_aoti.npy
                                    from run_table on the same model.pt2 loaded in Python
                                    (latent-*: x is the latent z_0, samples the decoded image,
                                    finish(run_table) for the oracle, the graph's outputs for
                                    *_aoti; the C++ runtime returns the samples)

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
from fastsample.samplers import latent_cld as slc
from fastsample.samplers import latent_ddgan as sld

ROOT = Path(__file__).resolve().parents[2]
DDGAN_CKPT = ROOT / "checkpoints/digits/ddgan.safetensors"
CLD_CKPT = ROOT / "checkpoints/digits/cld.safetensors"
LATENT_DDGAN_CKPT = ROOT / "checkpoints/digits/latent-ddgan.safetensors"
LATENT_CLD_CKPT = ROOT / "checkpoints/digits/latent-cld.safetensors"
LATENT_CLD_STEPS = 4        # SSCS NFE of the latent-cld graph (each row unrolled: short compile)
SEED = 3
MAX_BATCH = 256             # the artifacts' dynamic batch range is [1, MAX_BATCH]
BATCH_SPLIT = 3             # expected/*_b3.npy: the Python loop in batches of 3


#-----------------------------------------------------------------------------------------------
# The one export call: the product's own exporter, so ctest runs what users deploy.

def export_model_pt2(ckpt: Path, what: str, out: Path, *extra: str) -> dict:
    """`python -m fastsample.export CKPT --format aoti --what WHAT` (its parity gate included);
    the fixture keeps model.pt2 and returns the manifest, and writes its own schedule.txt per
    case (_write_case rewrites the manifest to match)."""
    from fastsample.export.command import main as export_main
    art = out.parent / f".export-{what}"
    rc = export_main([str(ckpt), "--format", "aoti", "--what", what, "--out", str(art),
                      "--max-batch", str(MAX_BATCH), *extra])
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


def _latent_case(case: Path, m, tab: Table, finish, want: torch.Tensor, x_T, noise, inputs,
                 noise_files: dict, net, man_args: tuple, **kw) -> None:
    """A latent family's --what sampler case: the eager loop + decoder step (the oracle, checked
    against the family's sampler `want`) and the graph fed `inputs(slice)` batch-first."""
    x_eager = run_table(tab, net, x_T, noise, **kw)
    with torch.no_grad():
        s_eager = finish(m, x_eager)
    if not torch.equal(s_eager, want):
        sys.exit(f"make_fixture: run_table + finish does not reproduce the {case.name} sampler")
    case.mkdir(parents=True, exist_ok=True)
    man = export_model_pt2(*man_args[:2], case / "model.pt2", *man_args[2:])
    graph = torch._inductor.aoti_load_package(str(case / "model.pt2"))

    def whole(sl):
        with torch.no_grad():
            z0, samples = graph(*inputs(sl))
            if not torch.equal(samples, finish(m, z0)):
                sys.exit(f"make_fixture: {case.name} graph's samples are not finish(x0)")
        return z0, samples
    x_g, s_g = whole(slice(None))
    parts = [whole(slice(s, s + BATCH_SPLIT)) for s in range(0, x_T.shape[0], BATCH_SPLIT)]
    print(f"make_fixture: {case.name}: graph vs eager loop max abs "
          f"{(x_g - x_eager).abs().max().item():.3g} (latent), "
          f"{(s_g - s_eager).abs().max().item():.3g} (data)")
    expected = {"x": x_eager, "samples": s_eager, "x_aoti": x_g, "samples_aoti": s_g,
                f"x_aoti_b{BATCH_SPLIT}": torch.cat([p[0] for p in parts]),
                f"samples_aoti_b{BATCH_SPLIT}": torch.cat([p[1] for p in parts])}
    _write_case(case, tab, case / "model.pt2", noise_files, expected, man)


def make_latent(out: Path, num: int) -> None:
    # latent-ddgan: DDGAN's posterior loop on the VAE latent; draws as make_ddgan's.
    m, _ = load_model(LATENT_DDGAN_CKPT)
    tab = sld.table(m)
    x_T, zb = sd.prior_of_shape(m, m.latent_shape, num, SEED, "cpu")    # zb: (N, T, z_dim)
    z = zb.transpose(0, 1).contiguous()
    noise = twin_noise(tab, SEED, x_T)
    want, _ = sld.sample(m, "posterior", None, num, SEED)
    full = torch.stack([row[0] if row else torch.zeros_like(x_T) for row in noise], dim=1)
    _latent_case(out / "latent-ddgan-sampler", m, tab, sld.finish, want, x_T, noise,
                 lambda sl: (x_T[sl], zb[sl].contiguous(), full[sl].contiguous()),
                 {"x_T": x_T, "z": z, "noise": _flat_noise(noise, x_T)}, m.denoise,
                 (LATENT_DDGAN_CKPT, "sampler"), z=z)
    # latent-cld: CLD's SSCS loop on the latent phase space; the unscaled v draw kept, as
    # make_cld's (the C++ side multiplies by prior_v_scale).
    m, _ = load_model(LATENT_CLD_CKPT)
    tab = slc.table(m, "sscs", LATENT_CLD_STEPS)
    g = torch.Generator().manual_seed(SEED)
    x_T = torch.randn((num, *m.latent_shape), generator=g)
    v_raw = torch.randn((num, *m.latent_shape), generator=g)
    v_T = v_raw * math.sqrt(m.cld.M)
    noise = twin_noise(tab, SEED, x_T)
    want, _ = slc.sample(m, "sscs", LATENT_CLD_STEPS, num, SEED, "cpu")
    rows = [r for r in noise if r]
    full = torch.stack([torch.stack(r) for r in rows]).permute(2, 0, 1, 3, 4, 5)  # (N, R, 2, ...)
    _latent_case(out / "latent-cld-sampler", m, tab, slc.finish, want, x_T, noise,
                 lambda sl: (x_T[sl], v_T[sl], full[sl].contiguous()),
                 {"x_T": x_T, "v_T": v_raw, "noise": _flat_noise(noise, x_T)}, m.alpha,
                 (LATENT_CLD_CKPT, "sampler", "--sampler", "sscs", "--steps",
                  str(LATENT_CLD_STEPS)), v=v_T)


#-----------------------------------------------------------------------------------------------

def _stamp(args) -> str:
    h = hashlib.sha256()
    for p in (DDGAN_CKPT, CLD_CKPT, LATENT_DDGAN_CKPT, LATENT_CLD_CKPT, Path(__file__),
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
    make_latent(args.out, args.num)
    stamp_file.write_text(stamp)
    print(f"make_fixture: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
