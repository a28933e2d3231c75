"""TensorRT: an engine (`model.plan`) built from the ONNX export with the TensorRT Python API:
one optimisation profile over the batch range (opt = min(64, max)), FP16 / BF16 builder flags
for --dtype fp16 / bf16 (the ONNX graph is exported in fp32 then; TensorRT picks the precision
per layer), and a parity run on the GPU through execute_async_v3. Needs the `tensorrt` extra
and a CUDA device; an engine is specific to the GPU and TensorRT version that built it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastsample.export.core import ExportError, Spec, Timer, progress

EXTRA_HINT = "pip install 'fastsample[tensorrt]'"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(f"--format tensorrt needs the TensorRT Python package, which is not "
                          f"installed: {EXTRA_HINT} (and an NVIDIA GPU)") from None
    return trt


def available() -> bool:
    try:
        require_tensorrt()
    except ExportError:
        return False
    return torch.cuda.is_available()


def build_engine(spec: Spec, onnx_path: Path, plan_path: Path, *, dtype: str, lo: int,
                 hi: int) -> None:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse the ONNX graph: {errs[:400]}")
    config = builder.create_builder_config()
    if dtype == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    opt = min(64, hi) if lo != hi else lo
    for t in spec.inputs:
        profile.set_shape(t.name, t.concrete(lo), t.concrete(max(lo, opt)), t.concrete(hi))
    config.add_optimization_profile(profile)
    with Timer() as tm:
        blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path.write_bytes(bytes(blob))
    progress("optimise", f"TensorRT {trt.__version__} engine ({dtype}, profile {lo}/{opt}/{hi}): "
                         f"{tm.s:.1f} s, {plan_path.stat().st_size / 1e6:.1f} MB")


def load_engine(plan_path, spec: Spec):
    """The engine as a callable on CUDA torch tensors (float32 I/O: the ONNX graph's types).
    `plan_path` an artifact directory: verified against its manifest.json first."""
    if Path(plan_path).is_dir():
        from fastsample.export.verify import artifact_file, verify_artifact
        plan_path = artifact_file(plan_path, verify_artifact(plan_path), "model.plan")
    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    ctx = engine.create_execution_context()

    def run(args):
        stream = torch.cuda.current_stream()
        args = [a.float().cuda().contiguous() for a in args]
        for t, a in zip(spec.inputs, args):
            ctx.set_input_shape(t.name, tuple(a.shape))
            ctx.set_tensor_address(t.name, a.data_ptr())
        outs = []
        for t in spec.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(t.name)), device="cuda",
                              dtype=torch.float32)
            ctx.set_tensor_address(t.name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return outs
    return run


def version() -> str:
    return require_tensorrt().__version__
