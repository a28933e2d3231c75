"""Latency, second part (issue 8): time per sample of the serving paths, side by side in one run.

Cases: DDGAN-4, CLD SSCS-20 and SSCS-50, LSGM decode; batch 1 and 64. Backends:
  eager    the family's sample() function (what `fastsample sample` runs)
  compile  the same with the network under torch.compile (mode reduce-overhead on CUDA,
           which adds cudagraph trees; default mode on CPU)
  engine   fastsample.runtime.Engine (one CUDA graph per run on CUDA; the plain loop on CPU)
  cpp      the C++ runtime (`fastsample-run --repeat`), when it has been built (build/cmake)
On CUDA the Engine's overhead is also recorded: end-to-end replay latency / the sum of the GPU
kernel times that run launches (torch.profiler over the same run without the graph).

`pytest --benchmark bench/test_latency_runtime.py --benchmark-json=F.json`; extra_info of each
row has device, backend, case, batch, us_per_sample, p50/p99 in ms."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsample.models.registry import released_checkpoint
from fastsample.runtime import Engine

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = {"ddgan-4": ("ddgan", "posterior", None), "cld-sscs-20": ("cld", "sscs", 20),
         "cld-sscs-50": ("cld", "sscs", 50), "lsgm-decode": ("lsgm", "decode", None)}
BACKENDS = ("eager", "compile", "engine", "cpp")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    from fastsample.models import load_model
    out = {}
    for fam in ("ddgan", "cld", "lsgm"):
        path = released_checkpoint(fam)
        if not path.exists():
            pytest.skip(f"released checkpoint {path} missing (make checkpoints)")
        out[fam] = load_model(path, device=DEVICE)[0]
    return out


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _eager_fn(model, fam, sampler, steps, batch, compiled: bool):
    import copy
    if compiled:
        model = copy.deepcopy(model)
        mode = "reduce-overhead" if CUDA else "default"
        # Every network of the model (generator, score net, decoder, ...) compiled in place.
        for name, child in list(model.named_children()):
            if any(True for _ in child.parameters()):
                setattr(model, name, torch.compile(child, mode=mode))
    if sampler == "decode":
        def fn(seed):
            g = torch.Generator(DEVICE).manual_seed(seed)
            z = torch.randn((batch, *model.latent_shape), generator=g, device=DEVICE)
            with torch.no_grad():
                return model.to_data(model.decode(z))
        return fn
    mod = importlib.import_module(f"fastsample.samplers.{fam}")
    return lambda seed: mod.sample(model, sampler, steps, batch, seed, DEVICE)[0]


_ARTIFACTS: dict = {}


def _cpp_fn(fam, sampler, steps, batch, tmp_path):
    exe = ROOT / "build" / "cmake" / "kernels" / "fastsample-run"
    exe = exe if exe.exists() else shutil.which("fastsample-run")
    if not exe:
        pytest.skip("fastsample-run not built (make test builds it into build/cmake)")
    if sampler == "decode":
        pytest.skip("the C++ runtime runs sampler loops (ddgan, cld); no decode-only path")
    # One AOTI export per (family, sampler, steps), shared by both batch sizes.
    art = _ARTIFACTS.get((fam, sampler, steps))
    if art is None:
        art = tmp_path / "artifact"
        from fastsample.export.core import resolve_what
        what = resolve_what(fam, None)
        cmd = [sys.executable, "-m", "fastsample.export", str(released_checkpoint(fam)),
               "--format", "aoti", "--what", what, "--out", str(art), "--device", DEVICE]
        if steps:
            cmd += ["--sampler", sampler, "--steps", str(steps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"AOTI export failed: {r.stderr.strip()[-300:]}")
        _ARTIFACTS[(fam, sampler, steps)] = art
    out = tmp_path / "s.npy"

    def fn(seed, repeat=20):
        r = subprocess.run([str(exe), str(art), "--num", str(batch), "--batch", str(batch),
                            "--seed", str(seed), "--out", str(out), "--device", DEVICE,
                            "--repeat", str(repeat)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return r.stdout
    return fn


def _kernel_seconds(engine) -> float:
    """Sum of the GPU kernel times one un-captured run launches (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        engine._prepare(0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._run()
            torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()
               if e.device_time_total and e.device_type.name == "CUDA") * 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_latency(benchmark, models, device_name, tmp_path, case, batch, backend):
    fam, sampler, steps = CASES[case]
    model = models[fam]
    info = dict(device=device_name, backend=backend, case=case, batch=batch,
                torch=torch.__version__, threads=torch.get_num_threads())
    if backend == "cpp":
        fn = _cpp_fn(fam, sampler, steps, batch, tmp_path)
        text = fn(0)
        # fastsample-run prints "latency ... p50 X ms p99 Y ms" per run of `batch` samples
        m = re.search(r"p50\s+([\d.]+)\s*ms.*p99\s+([\d.]+)\s*ms", text)
        if not m:
            pytest.fail(f"cannot read fastsample-run's latency line from: {text!r}")
        p50, p99 = float(m.group(1)), float(m.group(2))
        benchmark.pedantic(lambda: fn(0, 1), rounds=1, iterations=1)
        info.update(p50_ms=p50, p99_ms=p99, us_per_sample=p50 * 1e3 / batch,
                    note="p50/p99 from fastsample-run --repeat 20 (process start excluded)")
        benchmark.extra_info.update(info)
        return
    if backend == "engine":
        eng = Engine(model, sampler, steps, batch=batch, device=DEVICE)
        seeds = iter(range(10**9))

        def run():
            eng.sample(next(seeds), out=eng.out)
            _sync()
        if CUDA:
            plain = Engine(model, sampler, steps, batch=batch, device=DEVICE, cuda_graph=False,
                           noise="philox")
            info["kernel_seconds"] = _kernel_seconds(plain)
    else:
        fn = _eager_fn(model, fam, sampler, steps, batch, compiled=backend == "compile")
        seeds = iter(range(10**9))

        def run():
            fn(next(seeds))
            _sync()
    for _ in range(3):                # warm-up: JIT, compile, allocator
        run()
    rounds = 30 if batch == 1 else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    data = sorted(benchmark.stats.stats.data)
    p50 = data[len(data) // 2]
    p99 = data[min(len(data) - 1, int(round(0.99 * (len(data) - 1))))]
    info.update(p50_ms=p50 * 1e3, p99_ms=p99 * 1e3, us_per_sample=p50 * 1e6 / batch,
                nfe=Engine(model, sampler, steps, device=DEVICE, cuda_graph=False,
                           noise="torch", warmup=0).nfe)
    if "kernel_seconds" in info:
        info["engine_overhead"] = p50 / info["kernel_seconds"]
    benchmark.extra_info.update(info)

