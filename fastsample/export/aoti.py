"""AOTInductor: torch.export the module, compile it ahead of time with Inductor and package it
as one `model.pt2` (C++ code + weights + shared object). Loadable from Python
(torch._inductor.aoti_load_package) and from C++ (torch::inductor::AOTIModelPackageLoader), with
the inputs positional in the manifest's order. On CUDA the Triton kernels (the U-Net's fused
GroupNorm, registered through torch.library.triton_op) are compiled into the package; on the CPU
the torch twins are traced and Inductor generates C++.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from fastsample.export.core import (DTYPES, ExportError, Spec, Timer, dynamic_shapes,
                                    example_inputs, for_dtype, progress)


def export_aoti(spec: Spec, path: Path, *, dtype: str, lo: int, hi: int,
                device: str = "cpu") -> None:
    module = for_dtype(spec.module, dtype, device)
    n = lo if lo == hi else min(max(lo, 2) + 1, hi)
    args = example_inputs(spec, n, DTYPES[dtype], device)
    with Timer() as tm, torch.no_grad():
        try:
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec, lo, hi,
                                                                     dtype != "fp32"))
        except Exception as e:
            raise ExportError(f"torch.export failed for {spec.family} {spec.what}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    progress("trace", f"torch.export, {dtype}, batch {lo}..{hi}: {tm.s:.1f} s")
    with Timer() as tm, contextlib.redirect_stdout(sys.stderr):
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
        except Exception as e:
            raise ExportError(f"AOTInductor compile failed for {spec.family} {spec.what} on "
                              f"{device}: {str(e).splitlines()[0][:300]}") from e
    progress("optimise", f"AOTInductor compile + package ({device}): {tm.s:.1f} s, "
                         f"{path.stat().st_size / 1e6:.1f} MB")


def load_aoti(path, device: str = "cpu"):
    """The packaged model as a callable: outputs as a list (one entry per manifest output).
    `path` an artifact directory: its files are verified against manifest.json's sha256s first
    (verify.verify_artifact) and its model.pt2 is loaded; a modified file is an ExportError."""
    if Path(path).is_dir():
        from fastsample.export.verify import artifact_file, verify_artifact
        path = artifact_file(path, verify_artifact(path), "model.pt2")
    runner = torch._inductor.aoti_load_package(str(path))

    def run(args):
        with torch.no_grad():
            out = runner(*[a.to(device) for a in args])
        return [out] if isinstance(out, torch.Tensor) else list(out)
    return run
