"""ONNX through torch.onnx's dynamo exporter (torch.export -> ONNX), checked by onnx.checker and
run by ONNX Runtime for the parity gate.

Opset >= 21 so GroupNorm is the native GroupNormalization op (opset 18's version had per-group
scale/bias and was deprecated); the upper bound is what the installed onnx and the exporter's
onnxscript both know. Small models are written as one file (no external data); weights over
protobuf's 2 GB limit would need external data, which no fastsample model comes near.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

from fastsample.export.core import (DTYPES, ExportError, Spec, Timer, dynamic_shapes,
                                    for_dtype, progress)

MIN_OPSET = 21


def max_opset() -> int:
    import onnx
    hi = onnx.defs.onnx_opset_version()
    try:  # the exporter translates through onnxscript's opset modules
        import onnxscript.onnx_opset as oo
        known = [int(n[len("opset"):]) for n in dir(oo)
                 if n.startswith("opset") and n[len("opset"):].isdigit()]
        hi = min(hi, max(known))
    except Exception:
        pass
    return hi


def check_opset(opset: int) -> int:
    hi = max_opset()
    if not (MIN_OPSET <= opset <= hi):
        raise ExportError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{hi} (>= 21 for "
                          f"the native GroupNormalization; <= {hi}, what the installed onnx "
                          f"and onnxscript support)")
    return opset


@contextlib.contextmanager
def torch_kernels():
    """Trace the torch twins: a Triton kernel has no ONNX translation."""
    old = os.environ.get("FASTSAMPLE_KERNELS")
    os.environ["FASTSAMPLE_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTSAMPLE_KERNELS", None)
        else:
            os.environ["FASTSAMPLE_KERNELS"] = old


def export_onnx(spec: Spec, path: Path, *, opset: int, dtype: str, lo: int, hi: int,
                device: str = "cpu") -> None:
    """Write spec.module as ONNX to `path` with a dynamic batch axis lo..hi (static if lo == hi)."""
    import logging

    import onnx
    # "torchvision is not installed. Skipping torchvision::nms" and friends: not our ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    module = for_dtype(spec.module, dtype, device)
    from fastsample.export.core import example_inputs
    # The example batch must lie strictly inside a dynamic range (torch.export specialises 0/1).
    n = lo if lo == hi else min(max(lo, 2) + 1, hi)
    args = example_inputs(spec, n, DTYPES[dtype], device)
    with Timer() as tm, torch_kernels(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr), \
            warnings.catch_warnings():
        # Two warnings from inside torch's own exporter, about torch's internals, with nothing a
        # caller can change: pytree's LeafSpec deprecation (torch.utils._pytree, FutureWarning)
        # and "the axis name: batch will not be used" (every input's batch axis shares one Dim,
        # which is the point). Anything else still shows.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used",
                                category=UserWarning)
        try:
            prog = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, optimize=False,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=dynamic_shapes(spec, lo, hi, dtype != "fp32"),
                external_data=False, verbose=False,
                report=False)
        except Exception as e:  # the exporter wraps everything in its own error types
            raise ExportError(f"torch.onnx.export failed for {spec.family} {spec.what}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    progress("export", f"torch.onnx (dynamo) opset {opset}, {dtype}, batch {lo}..{hi}: "
                       f"{tm.s:.1f} s")
    with Timer() as tm, contextlib.redirect_stdout(sys.stderr):
        prog.optimize()
        prog.save(str(path), external_data=False)
        onnx.checker.check_model(str(path), full_check=True)
        g = onnx.load(str(path), load_external_data=False).graph
        names = ([i.name for i in g.input], [o.name for o in g.output])
        want = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
        if names != want:
            raise ExportError(f"the ONNX graph has inputs/outputs {names}, the contract says "
                              f"{want}")
    progress("optimise", f"onnxscript optimizer + onnx.checker: {tm.s:.1f} s, "
                         f"{path.stat().st_size / 1e6:.1f} MB")


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("--device cuda needs onnxruntime-gpu (pip install "
                              "'fastsample[gpu]'); this onnxruntime has only "
                              f"{ort.get_available_providers()}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session for a model file, or for an artifact directory: then every file
    its manifest.json lists is verified against its sha256 first (verify.verify_artifact) and
    the listed model.onnx is loaded; a missing or modified file is an ExportError."""
    import onnxruntime as ort
    path = Path(path)
    if path.is_dir():
        from fastsample.export.verify import artifact_file, verify_artifact
        path = artifact_file(path, verify_artifact(path), "model.onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=ort_providers(device))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load {Path(path).name} on {device}: "
                          f"{str(e).splitlines()[0][:300]}") from None


def ort_runner(sess, spec: Spec):
    names = [t.name for t in spec.inputs]
    np_dt = {torch.bfloat16: None}

    def run(args):
        feed = {}
        for n, a in zip(names, args):
            if a.dtype in np_dt:
                raise ExportError("ONNX Runtime's Python API takes no bfloat16 numpy arrays; "
                                  "export bf16 as TensorRT or AOTI, or use fp16/fp32")
            feed[n] = a.detach().cpu().numpy()
        try:
            outs = sess.run(None, feed)
        except Exception as e:
            raise ExportError(f"ONNX Runtime failed to run the model: "
                              f"{str(e).splitlines()[0][:300]}") from None
        return [torch.from_numpy(o) for o in outs]
    return run


def runtime_name(sess) -> str:
    import onnxruntime as ort
    return f"onnxruntime {ort.__version__} {sess.get_providers()[0]}"
