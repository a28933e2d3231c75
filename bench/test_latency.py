"""Serving latency per exported artifact and backend: batch-1 latency (p50 / p99 over single
calls) and throughput (samples/s) at batch 64 and 256.

One parametrised test per (artifact, backend), so later rows (the Python Engine, the C++
runtime) append to the same JSON without touching these. Backends: eager PyTorch,
torch.compile (defaults), ONNX Runtime (CPU provider), AOTInductor; on a GPU machine also
onnxruntime-gpu and TensorRT (skipped elsewhere). Artifacts are exported once per session with
`python -m fastsample.export` (dynamic batch 1..256, fp32) from the released digits checkpoints;
export time is not timed. Run:

    pytest --benchmark bench/test_latency.py --benchmark-json=OUT.json

(FASTSAMPLE_BENCH_THREADS=N sets the intra-op threads of torch and ONNX Runtime.)
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from fastsample.models.registry import released_checkpoint

ARTIFACTS = {"ddgan-generator": ("ddgan", "generator"), "ddgan-sampler": ("ddgan", "sampler"),
             "cld-score": ("cld", "score"), "lsgm-decoder": ("lsgm", "decoder"),
             "lsgm-score": ("lsgm", "score")}
BACKENDS = ("eager", "compile", "ort", "aoti", "ort-gpu", "tensorrt")
CUDA = torch.cuda.is_available()
THROUGHPUT_BATCHES = (64, 256)
LATENCY_CALLS = 200 if CUDA else 60
# CPU: one intra-op thread by default. The project's 2-core machine is shared, and OpenMP
# barriers with 2 threads on a core another process holds cost milliseconds per op (measured:
# the AOTI cld score took 1.36 s per batch-1 call at 2 threads under load, 1.1 ms at 1).
THREADS = int(os.environ.get("FASTSAMPLE_BENCH_THREADS", "0")) or (
    torch.get_num_threads() if CUDA else 1)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(artifact, format) -> (artifact dir, spec); exported on first use."""
    from fastsample.export import core
    from fastsample.export.command import main
    from fastsample.models import load_model
    root, cache = tmp_path_factory.mktemp("latency"), {}

    def get(name, fmt):
        fam, what = ARTIFACTS[name]
        ckpt = released_checkpoint(fam)
        if not ckpt.exists():
            pytest.skip(f"no released checkpoint {ckpt}")
        key = (name, fmt)
        if key not in cache:
            out = None
            if fmt is not None:
                out = root / f"{name}-{fmt}"
                dev = "cuda" if CUDA and fmt in ("tensorrt", "aoti") else "cpu"
                if fmt == "onnx-gpu":
                    fmt, dev = "onnx", "cuda"
                assert main([str(ckpt), "--format", fmt, "--what", what, "--out", str(out),
                             "--device", dev]) == 0
            model, card = load_model(ckpt, device="cuda" if CUDA else "cpu")
            cache[key] = (out, core.build_spec(model, card, what))
        return cache[key]
    return get


def _torch_maker(fn, spec, device):
    """fn(batch) -> callable for a torch callable (eager, compiled or an AOTI runner)."""
    from fastsample.export.core import example_inputs

    def make(n):
        args = example_inputs(spec, n, device=device)

        def call():
            with torch.no_grad():
                fn(*args)
            _sync()
        return call
    return make


def _runner(backend, exported, name):
    """fn(batch) -> callable running one batch (inputs prepared outside the timed call)."""
    device = "cuda" if CUDA else "cpu"
    from fastsample.export.core import example_inputs
    if backend in ("eager", "compile"):
        _, spec = exported(name, None)
        module = spec.module.eval()
        if backend == "compile":
            module = torch.compile(module)   # default: batch 1 static, then a dynamic recompile
        return _torch_maker(module, spec, device)
    if backend in ("ort", "ort-gpu"):
        from fastsample.export.onnx import ort_session
        d, spec = exported(name, "onnx" if backend == "ort" else "onnx-gpu")
        sess = ort_session(d, "cpu" if backend == "ort" else "cuda",
                           threads=THREADS if backend == "ort" else None)

        def make(n):
            feed = {t.name: a.numpy() for t, a in zip(spec.inputs, example_inputs(spec, n))}
            return lambda: sess.run(None, feed)
        return make
    if backend == "aoti":
        d, spec = exported(name, "aoti")
        from fastsample.export.verify import verify_artifact
        verify_artifact(d)
        return _torch_maker(torch._inductor.aoti_load_package(str(d / "model.pt2")), spec, device)
    from fastsample.export.tensorrt import load_engine
    d, spec = exported(name, "tensorrt")
    engine = load_engine(d, spec)

    def make(n):
        args = example_inputs(spec, n, device="cuda")
        return lambda: engine(args)
    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_latency(benchmark, exported, name, backend):
    if backend in ("ort-gpu", "tensorrt") and not CUDA:
        pytest.skip(f"{backend} needs a CUDA device")
    if backend == "tensorrt":
        pytest.importorskip("tensorrt")
    if backend == "ort-gpu":
        import onnxruntime as ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu is not installed")
    torch.set_num_threads(THREADS)
    make = _runner(backend, exported, name)
    call1 = make(1)
    for _ in range(5):   # warm-up: compilation, allocator, ORT's first-run planning
        call1()
    benchmark.pedantic(call1, rounds=LATENCY_CALLS, iterations=1, warmup_rounds=0)
    lat = np.asarray(benchmark.stats.stats.data) * 1e3
    info = {"artifact": name, "backend": backend, "dtype": "fp32",
            "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "threads": THREADS, "batch1_p50_ms": float(np.percentile(lat, 50)),
            "batch1_p99_ms": float(np.percentile(lat, 99)), "batch1_calls": len(lat)}
    for b in THROUGHPUT_BATCHES:
        call = make(b)
        call()
        times = []
        for _ in range(10 if CUDA else 3):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        info[f"throughput_b{b}_per_s"] = b / float(np.median(times))
        info[f"batch{b}_ms"] = 1e3 * float(np.median(times))
    benchmark.extra_info.update(info)
