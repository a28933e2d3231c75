"""End-to-end sampling time with the fused kernels on vs off (FASTSAMPLE_KERNELS=torch), side
by side in one run: CLD SSCS-50 and DDGAN-4 at batch 1 and 64 (reference/cld.md 5.3,
ddgan.md 4). Timing does not depend on the weights, so a missing released checkpoint is replaced
by a 2-step training run of the same architecture."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest
import torch

from fastsample.models.registry import released_checkpoint

CASES = [("cld", "sscs", 50, {"schedule": "quadratic"}), ("ddgan", "posterior", None, {})]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from fastsample.cli import main
    paths = {}
    for fam, *_ in CASES:
        path = released_checkpoint(fam)
        if not path.exists():
            out = tmp_path_factory.mktemp(fam)
            rc = main(["train", "--model", fam, "--data", "digits", "--out", str(out),
                       "--steps", "2", "--no-eval", "--no-progress", "--log-every", "1"])
            assert rc == 0
            path = out / f"{fam}.safetensors"
        paths[fam] = path
    return paths


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sampling_speed(benchmark, checkpoints, monkeypatch, case, batch, kernels):
    from fastsample.models import load_model
    fam, sampler, steps, opts = case
    if kernels == "on" and not CUDA:
        pytest.skip("the Triton kernels run on CUDA only (CPU uses the twins)")
    monkeypatch.setenv("FASTSAMPLE_KERNELS", "auto" if kernels == "on" else "torch")
    device = "cuda" if CUDA else "cpu"
    model, _ = load_model(checkpoints[fam], device=device)
    mod = importlib.import_module(f"fastsample.samplers.{fam}")
    if steps is None:
        from fastsample.models import get
        steps = get(fam).default_steps(model, sampler)
    nfe_box = {}

    def run():
        with torch.no_grad():
            x, nfe = mod.sample(model, sampler, steps, batch, 0, device, **opts)
        if CUDA:
            torch.cuda.synchronize()
        nfe_box["nfe"] = nfe

    run()   # warm-up: Triton compilation, cuDNN autotune, allocator
    benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        family=fam, sampler=sampler, batch=batch, kernels=kernels, nfe=nfe_box["nfe"],
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        ms_per_run=1e3 * med, ms_per_sample=1e3 * med / batch)
