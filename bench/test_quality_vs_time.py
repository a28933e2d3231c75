"""Quality vs sampling time on the released digits checkpoints: the paper's Figure 8 in miniature.

Each case samples NUM digits (default 2000; FASTSAMPLE_BENCH_NUM overrides) with one sampler of
one family, once per sampler seed (default 0, 1, 2; FASTSAMPLE_BENCH_SEEDS="0" for one), times
the sampling call once (pytest-benchmark, one round: a 1000-step sampler is the benchmark, not a
micro-op), and records every digits metric of fastsample.metrics.evaluate (FD, precision /
recall, the logistic and the boosted-trees C2STs, coverage), NFE and time per sample in
extra_info. The DDPM rows include the peer samplers (diffusers' schedulers, skipped without the
`baselines` extra); select rows with -k on the ids, e.g.
`-k "ddpm and (ddim or ancestral or dpmpp2m)"`. `python bench/report.py quality <json>` turns
the run into the table (mean +- std over the seeds), the claims and the log-time vs FD plot.
Cases whose checkpoint is missing are skipped with the reason. A class-conditional Gaussian
fitted to the training digits (metrics.fit_class_gaussian, quantised like a model's output) is
the reference row every family must beat.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "digits"
NUM = int(os.environ.get("FASTSAMPLE_BENCH_NUM", "2000"))
SEEDS = tuple(int(s) for s in os.environ.get("FASTSAMPLE_BENCH_SEEDS", "0,1,2").split(","))

PEERS = ("dpmpp2m", "unipc", "euler", "heun")
PEER_NFE = (4, 6, 10, 20)

# (family, sampler, steps, options) — DDGAN at its trained T; CLD with quadratic striding.
CASES = (
    [("ddgan", "posterior", None, {})]
    + [("cld", s, n, {"schedule": "quadratic"}) for s in ("sscs", "em") for n in (10, 20, 50, 100, 200)]
    + [("cld", "ode", None, {"rtol": 1e-5, "atol": 1e-5})]
    + [("lsgm", "ode", None, {"rtol": tol, "atol": tol}) for tol in (1e-5, 1e-3)]
    + [("ddpm", "ancestral", n, {}) for n in (4, 6, 10, 20, 1000)]
    + [("ddpm", "ddim", n, {}) for n in (4, 6, 10, 20, 50, 100)]
    + [("ddpm", "ode", None, {"rtol": 1e-5, "atol": 1e-5})]
    # The combinations (issue 21): a DDGAN and a CLD prior in LSGM's latent space.
    + [("latent-ddgan", "posterior", None, {})]
    + [("latent-cld", s, n, {"schedule": "quadratic"}) for s in ("sscs", "em") for n in (10, 20, 50)]
    # The samplers users pick instead (diffusers' schedulers on the DDPM net; the `baselines`
    # extra) at 4, 6, 10, 20 network calls: Heun spends 2 per step but 1 on its last, so it gets
    # the most steps whose 2 steps - 1 calls fit the budget (3, 5, 9, 19 calls).
    + [("ddpm", peer, (nfe + 1) // 2 if peer == "heun" else nfe, {"karras": karras})
       for peer in PEERS for karras in (False, True) for nfe in PEER_NFE]
)


def _id(case):
    fam, sampler, steps, opts = case
    tail = f"-{steps}" if steps else ""
    tol = f"-tol{opts['rtol']:g}" if "rtol" in opts else ""
    karras = "-karras" if opts.get("karras") else ""
    return f"{fam}-{sampler}{tail}{tol}{karras}"


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_quality_vs_time(benchmark, case, seed):
    from fastsample.metrics import evaluate
    from fastsample.models import load_model

    fam, sampler, steps, opts = case
    path = CKPT / f"{fam}.safetensors"
    if not path.exists():
        pytest.skip(f"no released checkpoint {path.relative_to(ROOT)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, card = load_model(path, device=device)
    from fastsample import samplers
    from fastsample.models import get
    # the one sample() driver with the family's Sampling (a hyphenated family's samplers module
    # name differs from its name)
    sampling = get(fam).sampling
    sample = functools.partial(samplers.sample, sampling)
    needs = sampling.sampler(sampler).needs
    if needs is not None:
        from fastsample.samplers import MissingExtra
        try:
            needs()
        except MissingExtra as e:
            pytest.skip(str(e))
    if steps is None:
        steps = get(fam).default_steps(model, sampler)
    out = {}

    def run():
        t0 = time.perf_counter()
        x, nfe = sample(model, sampler, steps, NUM, seed, device, **opts)
        if device == "cuda":
            torch.cuda.synchronize()
        out.update(x=x, nfe=nfe, seconds=time.perf_counter() - t0)

    if device == "cuda":
        # first use on a GPU pays CUDA init, cuDNN autotuning and Triton JIT: keep them out
        sample(model, sampler, steps, 8, seed, device, **opts)
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    metrics = evaluate(out["x"].float().cpu(), "digits", seed=0)
    benchmark.extra_info.update(
        family=fam, sampler=sampler, steps=steps, options=opts, num=NUM, device=device, seed=seed,
        nfe=int(out["nfe"]), seconds=out["seconds"], ms_per_sample=1e3 * out["seconds"] / NUM,
        threads=torch.get_num_threads(), checkpoint_steps=card.train_steps, **metrics)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_class_gaussian_reference(benchmark, seed):
    """The bar every family must clear: per-class mean and full covariance of the training digits,
    NUM draws with the data's class frequencies, quantised to the 17 grey levels."""
    from fastsample.data.images import load_digits, quantize_digits
    from fastsample.metrics import evaluate, fit_class_gaussian, sample_class_gaussian

    train = load_digits("train", seed=0)
    fit = fit_class_gaussian(train.x, train.labels)
    out = {}

    def run():
        t0 = time.perf_counter()
        out.update(x=quantize_digits(sample_class_gaussian(NUM, fit,
                                                           torch.Generator().manual_seed(seed))),
                   seconds=time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    metrics = evaluate(out["x"], "digits", seed=0)
    benchmark.extra_info.update(
        family="class-gaussian", sampler="reference", steps=None, options={}, num=NUM,
        device="cpu", seed=seed, nfe=0, seconds=out["seconds"],
        ms_per_sample=1e3 * out["seconds"] / NUM, threads=torch.get_num_threads(),
        checkpoint_steps=0, **metrics)
