"""A Triton Inference Server model repository:

    DIR/manifest.json, DIR/schedule.txt          (Triton ignores plain files at the top level)
    DIR/<family>_<what>/config.pbtxt             backend onnxruntime
    DIR/<family>_<what>/1/model.onnx
    DIR/<family>_<what>_trt/config.pbtxt         platform tensorrt_plan, when tensorrt + a GPU
    DIR/<family>_<what>_trt/1/model.plan

Batch-first models get max_batch_size = --max-batch (dims without the batch axis; a (N,) input
is dims [1] reshaped to a scalar), dynamic batching and one instance per device. Every
export is batch-first (the DDGAN sampler's z and noise included), so every model batches; a
model that is not (none today) would get max_batch_size 0 and -1 on its batch axes.
A whole-sampler graph (its ExportPart has a feed) also gets a front model named like
`fastsample serve` names it (DATA-FAMILY, e.g. digits-ddgan): Triton's Python backend running
triton_front/model.py with the checkpoint beside it, taking seed/num and calling the graph
through BLS, so that one tritonclient program works against `fastsample serve`, Ray Serve and
Triton (docs/serving.md). It needs fastsample and torch inside the Triton container.
AOTInductor packages have no Triton backend (the PyTorch backend loads TorchScript); serve them
through the C++ runtime. Every config is validated by parsing it with Triton's ModelConfig
protobuf schema (shipped in tritonclient).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastsample.export.core import ExportError, Spec

TRITON_DTYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16"}
QUEUE_DELAY_US = 100


def front_name(dataset: str, family: str) -> str:
    """`digits-ddgan`, `grid25-cld`: the data set (without its `toy2d:` kind) and the family;
    `fastsample serve` names its models the same way."""
    import re
    data = dataset.split(":")[-1] or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{data}-{family}")


def front_config_text(name: str, graph: str, spec: Spec, *, max_num: int, device: str) -> str:
    dims = ", ".join(str(d) for d in spec.outputs[-1].shape[1:])
    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    params = {"graph": graph, "checkpoint": "checkpoint.safetensors", "what": spec.what,
              "sampler": spec.sampler, "steps": str(spec.steps), "max_num": str(max_num)}
    ptext = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                      for k, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            f'input [\n  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] }},\n'
            f'  {{ name: "num" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}\n]\n'
            f'output [\n  {{ name: "samples" data_type: TYPE_FP32 dims: [ -1, {dims} ] }}\n]\n'
            f"{ptext}\n"
            # Several instances, so that concurrent requests reach the graph's batcher together.
            f"instance_group [ {{ count: 4 kind: {kind} }} ]\n")


def write_front(repo: Path, spec: Spec, card, checkpoint, *, hi: int, device: str) -> str:
    """The front model directory (config.pbtxt, 1/model.py, 1/checkpoint.safetensors)."""
    import shutil
    name = front_name(card.dataset, spec.family)
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(front_config_text(name, model_name(spec), spec,
                                                      max_num=hi, device=device))
    shutil.copyfile(Path(__file__).parent / "triton_front" / "model.py", d / "1" / "model.py")
    shutil.copyfile(checkpoint, d / "1" / "checkpoint.safetensors")
    return name


def model_name(spec: Spec, backend: str = "onnxruntime") -> str:
    return f"{spec.family}_{spec.what}" + ("_trt" if backend == "tensorrt_plan" else "")


def batch_first(spec: Spec) -> bool:
    return all(t.batch_axis == 0 for t in spec.inputs + spec.outputs)


def config_text(spec: Spec, *, backend: str, dtype: str, lo: int, hi: int, device: str) -> str:
    dt = TRITON_DTYPE[dtype]
    bf = batch_first(spec) and lo != hi

    def entry(t, kind: str) -> str:
        if bf:
            dims = list(t.shape[1:])
        else:
            dims = [-1 if d == "batch" else d for d in t.concrete(lo if lo == hi else -1)]
        reshape = ""
        if bf and not dims:
            dims, reshape = [1], " reshape: { shape: [ ] }"
        return (f'  {{ name: "{t.name}" data_type: {dt} dims: [ {", ".join(map(str, dims))} ]'
                f'{reshape} }}')

    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    lines = [f'name: "{model_name(spec, backend)}"']
    if backend == "tensorrt_plan":
        lines.append('platform: "tensorrt_plan"')
        lines.append('default_model_filename: "model.plan"')
    else:
        lines.append('backend: "onnxruntime"')
        lines.append('default_model_filename: "model.onnx"')
    lines.append(f"max_batch_size: {hi if bf else 0}")
    lines.append("input [\n" + ",\n".join(entry(t, "in") for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(entry(t, "out") for t in spec.outputs) + "\n]")
    if bf:
        pref = [b for b in (8, 32, 64, hi) if lo <= b <= hi]
        pref = sorted(set(pref))
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, pref))} ] "
                     f"max_queue_delay_microseconds: {QUEUE_DELAY_US} }}")
    lines.append(f"instance_group [ {{ count: 1 kind: {kind} }} ]")
    return "\n".join(lines) + "\n"


def _model_config_pb2():
    """tritonclient ships Triton's model_config.proto compiled for Python under
    tritonclient/grpc/, whose package __init__ insists on the grpc extra; the schema module
    itself needs only protobuf, so it is loaded from its file."""
    try:
        import tritonclient
    except ImportError:
        raise ExportError("validating a Triton config needs tritonclient (pip install "
                          "'fastsample[dev]')") from None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("fastsample_triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise ExportError(f"cannot load Triton's ModelConfig schema from {path}: {e}") from None
    return mod


_PB2 = None


def parse_config(path):
    """config.pbtxt -> inference.ModelConfig (protobuf); a bad config -> ExportError."""
    from google.protobuf import text_format
    global _PB2
    if _PB2 is None:
        _PB2 = _model_config_pb2()
    try:
        return text_format.Parse(Path(path).read_text(), _PB2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"{path}: not a valid Triton model config: {e}") from None


def validate(path, spec: Spec) -> None:
    """Parse, then check what the schema cannot: names, order and the model file."""
    cfg = parse_config(path)
    want_in = [t.name for t in spec.inputs]
    want_out = [t.name for t in spec.outputs]
    if [i.name for i in cfg.input] != want_in or [o.name for o in cfg.output] != want_out:
        raise ExportError(f"{path}: inputs/outputs {[i.name for i in cfg.input]} -> "
                          f"{[o.name for o in cfg.output]}, expected {want_in} -> {want_out}")
    model_file = Path(path).parent / "1" / cfg.default_model_filename
    if not model_file.is_file():
        raise ExportError(f"{path}: the model file {model_file} is missing")


def write_model(repo: Path, spec: Spec, *, backend: str, dtype: str, lo: int, hi: int,
                device: str) -> Path:
    """The model's directory with its config.pbtxt; returns the version dir for the model file."""
    d = repo / model_name(spec, backend)
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(config_text(spec, backend=backend, dtype=dtype, lo=lo, hi=hi,
                                                device=device))
    return d / "1"


def load_repo(repo) -> dict:
    """A written repository, verified against its manifest.json's sha256s
    (verify.verify_artifact), then every config.pbtxt it lists parsed: {model name: ModelConfig}.
    A missing or modified file, or a bad config, is an ExportError."""
    from fastsample.export.verify import verify_artifact
    repo = Path(repo)
    man = verify_artifact(repo)
    return {Path(f).parent.name: parse_config(repo / f) for f in sorted(man["files"])
            if Path(f).name == "config.pbtxt"}
