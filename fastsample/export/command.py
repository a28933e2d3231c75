"""`python -m fastsample.export CKPT --format F --what W --out DIR` (also `fastsample export`).

Stages, one progress line each on stderr: load, trace/export, optimise, parity, write. The last
line on stdout names the artifact and its measured parity error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastsample.export.core import (DEFAULT_MAX_BATCH, DTYPES, FORMATS, MODEL_FILE,
                                    ArtifactDir, ExportError, Timer, build_spec, check_not_cwd,
                                    check_parity, parity_batches, progress, resolve_what,
                                    write_manifest)

DEFAULT_ROOT = Path("export") / "artifacts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.epilog = ("What each family exports: ddgan generator|sampler (the whole T-step loop), cld "
                "score, lsgm decoder|score. The artifact directory holds the model file(s), "
                "manifest.json and schedule.txt (export/README.md).")
    p.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--what", choices=("generator", "sampler", "decoder", "score"), default=None,
                   help="which network (default: ddgan generator, cld score, lsgm decoder)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"artifact directory (default: {DEFAULT_ROOT}/<ckpt>-<what>-<format>)")
    p.add_argument("--batch", type=int, default=None,
                   help="a static batch size (default: dynamic batch axis 1..--max-batch)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="upper end of the dynamic batch axis")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (onnx, tensorrt, "
                   "triton-repo)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--sampler", default=None,
                   help="schedule.txt's sampler: cld sscs|em (default sscs), lsgm em")
    p.add_argument("--steps", type=int, default=None,
                   help="schedule.txt's NFE (default: the CLI's default for the sampler)")
    p.add_argument("--schedule", choices=("uniform", "quadratic"), default=None,
                   help="cld time grid (default quadratic)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastsample.export",
                                description="export a checkpoint to ONNX / AOTInductor / "
                                "TensorRT / Triton-server repo, with a parity gate")
    add_arguments(p)
    return p


MAX_EXPORT_BATCH = 4096          # the parity gate runs the largest batch eagerly
MAX_EXPORT_STEPS = 10_000        # schedule.txt rows (fastsample.export.verify reads <= 100k)


def _check_args(ns) -> tuple[int, int]:
    """Every numeric option and --out, before any work: non-positive values are refused, not
    replaced by defaults; sizes beyond the bounds above name the bound."""
    for flag, v, hi in (("--max-batch", ns.max_batch, MAX_EXPORT_BATCH),
                        ("--batch", ns.batch, MAX_EXPORT_BATCH),
                        ("--steps", ns.steps, MAX_EXPORT_STEPS)):
        if v is None:
            continue
        if v < 1:
            raise ExportError(f"{flag} must be >= 1, got {v}")
        if v > hi:
            raise ExportError(f"{flag} {v} is above the limit {hi}")
    if ns.out is not None:
        check_not_cwd(ns.out)
    if ns.batch is not None:
        return ns.batch, ns.batch
    return 1, ns.max_batch


def _check_device(fmt: str, dtype: str, device: str) -> None:
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ExportError(f"--device {device}: no CUDA device is available")
    elif device != "cpu":
        raise ExportError(f"--device {device!r}; choose cpu | cuda | cuda:N")
    if fmt == "tensorrt" and not device.startswith("cuda"):
        raise ExportError("--format tensorrt builds a GPU engine: use --device cuda")
    if fmt in ("onnx", "triton-repo") and device == "cpu" and dtype == "bf16":
        # Measured with onnxruntime 1.32: the CPU provider has no bfloat16 Gemm / Conv kernels
        # (and numpy, which its Python API takes, has no bfloat16).
        raise ExportError("--dtype bf16 ONNX cannot be run by ONNX Runtime's CPU provider (no "
                          "bfloat16 Gemm/Conv kernels), so its parity cannot be checked here: "
                          "use fp32 or fp16 on the CPU, or --device cuda")


def run(ns) -> int:
    import torch

    from fastsample.checkpoint import read_card
    from fastsample.models import load_model

    lo, hi = _check_args(ns)
    ckpt = Path(ns.checkpoint)
    with Timer() as tm:
        card = read_card(ckpt)
        what = resolve_what(card.family, ns.what)
        if ns.format == "tensorrt":
            from fastsample.export.tensorrt import require_tensorrt
            require_tensorrt()
        _check_device(ns.format, ns.dtype, ns.device)
        if ns.format in ("onnx", "tensorrt", "triton-repo"):
            from fastsample.export.onnx import check_opset
            check_opset(ns.opset)
        out = Path(ns.out) if ns.out else DEFAULT_ROOT / (
            f"{ckpt.stem}-{what}-{ns.format}" + ("" if ns.dtype == "fp32" else f"-{ns.dtype}"))
        ArtifactDir(out).check()
        model, card = load_model(ckpt, device=ns.device)
        spec = build_spec(model, card, what, ns.sampler, ns.steps, ns.schedule)
    progress("load", f"{ckpt} ({card.family}, {what}; schedule {spec.sampler} x{spec.steps}): "
                     f"{tm.s:.1f} s")
    torch.manual_seed(0)
    batches = parity_batches(lo, hi)
    with ArtifactDir(out) as tmp:
        versions = {"torch_version": torch.__version__}
        extra = {}
        if ns.format in ("onnx", "triton-repo"):
            import onnxruntime as ort

            from fastsample.export import onnx as ox
            if ns.format == "onnx":
                model_dir = tmp
            else:
                from fastsample.export import triton_repo as tr
                model_dir = tr.write_model(tmp, spec, backend="onnxruntime", dtype=ns.dtype,
                                           lo=lo, hi=hi, device=ns.device)
            path = model_dir / MODEL_FILE["onnx"]
            ox.export_onnx(spec, path, opset=ns.opset, dtype=ns.dtype, lo=lo, hi=hi,
                           device=ns.device)
            sess = ox.ort_session(path, ns.device)
            runtime = ox.runtime_name(sess)
            with Timer() as tm:
                parity = check_parity(spec, ox.ort_runner(sess, spec), ns.dtype, batches,
                                      runtime=runtime)
            _parity_line(parity, tm.s)
            versions.update(opset=ns.opset, onnx_version=__import__("onnx").__version__,
                            onnxruntime_version=ort.__version__)
            if ns.format == "triton-repo":
                extra["triton"] = _triton_extras(tmp, spec, path, ns, lo, hi, batches, versions)
                if spec.feed is not None:
                    front = tr.write_front(tmp, spec, card, ckpt, hi=hi, device=ns.device)
                    extra["triton"]["front"] = front
                    extra["triton"]["models"].append(front)
                for cfg in sorted(tmp.glob("*/config.pbtxt")):
                    if cfg.parent.name == extra["triton"].get("front"):
                        tr.parse_config(cfg)          # seed/num in, samples out
                    else:
                        tr.validate(cfg, spec)
                progress("validate", f"{len(extra['triton']['models'])} config.pbtxt parsed "
                                     f"with Triton's ModelConfig schema")
        elif ns.format == "aoti":
            from fastsample.export import aoti
            path = tmp / MODEL_FILE["aoti"]
            aoti.export_aoti(spec, path, dtype=ns.dtype, lo=lo, hi=hi, device=ns.device)
            runtime = f"AOTInductor (torch {torch.__version__}) on {ns.device}"
            with Timer() as tm:
                parity = check_parity(spec, aoti.load_aoti(path, ns.device), ns.dtype, batches,
                                      device=ns.device, runtime=runtime)
            _parity_line(parity, tm.s)
        else:
            from fastsample.export import onnx as ox
            from fastsample.export import tensorrt as trx
            onnx_tmp = tmp / "fp32.onnx"
            ox.export_onnx(spec, onnx_tmp, opset=ns.opset, dtype="fp32", lo=lo, hi=hi,
                           device=ns.device)
            path = tmp / MODEL_FILE["tensorrt"]
            trx.build_engine(spec, onnx_tmp, path, dtype=ns.dtype, lo=lo, hi=hi)
            onnx_tmp.unlink()
            runtime = f"TensorRT {trx.version()} on {torch.cuda.get_device_name()}"
            with Timer() as tm:
                parity = check_parity(spec, trx.load_engine(path, spec), ns.dtype, batches,
                                      device=ns.device, runtime=runtime)
            _parity_line(parity, tm.s)
            versions.update(opset=ns.opset, tensorrt_version=trx.version(),
                            gpu=torch.cuda.get_device_name())
        man = write_manifest(tmp, spec, fmt=ns.format, dtype=ns.dtype, device=ns.device, lo=lo,
                             hi=hi, parity=parity, checkpoint=ckpt, card=card, versions=versions,
                             extra=extra)
    progress("write", f"{out}/ ({', '.join(sorted(man['files']))}, manifest.json)")
    print(f"{out}: {card.family} {what} as {ns.format} ({ns.dtype}, batch {lo}..{hi}), parity "
          f"max_abs {parity['max_abs']:.3g} max_rel {parity['max_rel']:.3g}")
    return 0


def _parity_line(parity: dict, seconds: float) -> None:
    flips = sum(o["level_flips"] for o in parity["outputs"].values())
    progress("parity", f"{parity['runtime']} vs eager, batches {parity['batches']}: max_abs "
                       f"{parity['max_abs']:.3g}, max_rel {parity['max_rel']:.3g}"
                       + (f", {flips} level flips" if flips else "")
                       + f" (passed): {seconds:.1f} s")


def _triton_extras(tmp, spec, onnx_path, ns, lo, hi, batches, versions) -> dict:
    """The optional tensorrt_plan model beside the onnxruntime one, when TensorRT and a GPU are
    present; AOTI has no Triton backend (see triton_repo.py)."""
    from fastsample.export import tensorrt as trx
    from fastsample.export import triton_repo as tr
    models = [tr.model_name(spec, "onnxruntime")]
    skipped = {"libtorch/aoti": "Triton's PyTorch backend loads TorchScript, not AOTInductor "
                                "packages; serve model.pt2 through the C++ runtime"}
    if trx.available() and ns.device.startswith("cuda"):
        vdir = tr.write_model(tmp, spec, backend="tensorrt_plan", dtype=ns.dtype, lo=lo, hi=hi,
                              device=ns.device)
        plan = vdir / MODEL_FILE["tensorrt"]
        trx.build_engine(spec, onnx_path, plan, dtype=ns.dtype, lo=lo, hi=hi)
        with Timer() as tm:
            trt_parity = check_parity(spec, trx.load_engine(plan, spec), ns.dtype, batches,
                                      device=ns.device, runtime=f"TensorRT {trx.version()}")
        _parity_line(trt_parity, tm.s)
        models.append(tr.model_name(spec, "tensorrt_plan"))
        versions["tensorrt_version"] = trx.version()
        return {"models": models, "skipped": skipped, "tensorrt_parity": trt_parity}
    skipped["tensorrt_plan"] = ("TensorRT not installed or no GPU (pip install "
                                "'fastsample[tensorrt]', --device cuda)")
    return {"models": models, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_cli(ns)


def run_cli(ns) -> int:
    """User mistakes and failed gates: one line on stderr, exit code 2."""
    from fastsample.checkpoint import CheckpointError
    try:
        return run(ns)
    except (ExportError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"fastsample export: error: {e}", file=sys.stderr)
        return 2
