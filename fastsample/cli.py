"""`fastsample train | sample | eval | export | serve | demo` (also `python -m fastsample`).

Every subcommand parses its own options; `export` shares its parser with
`python -m fastsample.export` (fastsample/export/command.py).
"""

from __future__ import annotations

import argparse
import sys

HELP = {
    "train": "train a model (ddgan | cld | lsgm | ddpm) on digits or a 2D toy",
    "sample": "sample a checkpoint with a named sampler; writes samples.npz (+ optional PNG)",
    "eval": "compute metrics (FD, class coverage, MMD / sliced Wasserstein) of a samples.npz",
    "export": "export a checkpoint to ONNX / AOTInductor / TensorRT / Triton-server repo",
    "serve": "serve models over HTTP (Open Inference Protocol / tritonclient, dynamic "
             "batching, metrics) on 127.0.0.1",
    "demo": "sample every released checkpoint with its fast sampler and print a table",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastsample",
        description="Fast diffusion sampling: Denoising Diffusion GANs, Critically-Damped Langevin "
        "Diffusion (SSCS sampler), Latent Score-based Generative Models, and a VP-SDE/DDPM baseline.",
    )
    from fastsample import __version__

    p.add_argument("--version", action="version", version=f"fastsample {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,export,serve,demo}")
    for name in ("train", "sample", "eval", "export", "serve", "demo"):
        sp = sub.add_parser(name, help=HELP[name], description=HELP[name])
        if name == "train":
            _train_args(sp)
        elif name == "sample":
            _sample_args(sp)
        elif name == "eval":
            _eval_args(sp)
        elif name == "export":
            from fastsample.export.command import add_arguments
            add_arguments(sp)
        elif name == "serve":
            from fastsample.serve.command import add_arguments as serve_arguments
            serve_arguments(sp)
        elif name == "demo":
            sp.add_argument("--num", type=int, default=500, help="samples per family")
            sp.add_argument("--out", default="demo-out", help="where the PNG grids go")
            sp.add_argument("--device", default="cpu")
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--no-latency", action="store_true",
                            help="skip the DDGAN latency table (eager vs Engine vs ONNX Runtime; "
                            "the first run exports the sampler to ONNX, about a minute)")
        else:
            sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _train_args(sp: argparse.ArgumentParser) -> None:
    sp.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    sp.epilog = ("Family hyper-parameters (learning rates, T for ddgan, net width...) are fields "
                 "of the family's Config; see them with --dry-run and change them with --set "
                 "KEY=VALUE. Distributed: torchrun --nproc_per_node=2 -m fastsample train ...")
    from fastsample.models.registry import FAMILIES
    sp.add_argument("--model", required=True, choices=FAMILIES, help="model family")
    sp.add_argument("--data", required=True, metavar="SPEC",
                    help="digits | toy2d:NAME | npz:PATH | folder:PATH")
    sp.add_argument("--out", required=True, metavar="DIR", help="output directory")
    sp.add_argument("--steps", type=int, default=None, help="optimiser steps (default: family's)")
    sp.add_argument("--batch-size", type=int, default=None, help="global batch (default: family's)")
    sp.add_argument("--ema", type=float, default=None, help="EMA decay (default: family's)")
    sp.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                    help="autocast dtype")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    sp.add_argument("--ckpt-every", type=int, default=500, help="checkpoint period (steps)")
    sp.add_argument("--log-every", type=int, default=50, help="JSONL log period (steps)")
    sp.add_argument("--eval-every", type=int, default=0,
                    help="periodic evaluation period (steps); 0 = only at the end")
    sp.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    sp.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop cleanly after this much training time (0 = no limit)")
    sp.add_argument("--resume", action="store_true",
                    help="continue from DIR/<model>.state.pt if present")
    sp.add_argument("--T", type=int, default=None,
                    help="the family Config's T (ddgan: number of denoising steps)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the family Config (repeatable)")
    sp.add_argument("--resolution", type=int, default=None,
                    help="folder:PATH data: square side to resize to")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the resolved configuration and exit")


def _sampler_listing() -> str:
    """Per family: its samplers with their default steps, and the default fast sampler."""
    from fastsample.models.registry import REGISTRY
    lines = []
    for e in REGISTRY.values():
        names = []
        for name, s in e.sampling.samplers.items():
            steps = ("adaptive" if not s.plan and s.steps is None else
                     f"{s.steps} steps" if s.steps is not None else "its trained T")
            extra = ", needs fastsample[baselines]" if s.needs is not None else ""
            names.append(f"{name} ({steps}{extra})")
        sampler, opts = e.default
        extra = "".join(f" --{k} {v}" for k, v in opts.items())
        lines.append(f"{e.name}: {', '.join(names)}; default {sampler}{extra}")
    return "; ".join(lines)


def _sample_args(sp: argparse.ArgumentParser) -> None:
    sp.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    sp.epilog = ("Samplers by family -- " + _sampler_listing() + ". The npz holds `samples` "
                 "(float32, data space), `nfe` (network evaluations per sample, counted) and "
                 "`seconds` (wall time).")
    sp.add_argument("checkpoint", metavar="CKPT", help="a .safetensors checkpoint")
    sp.add_argument("--sampler", default=None,
                    help="sampler name (default: the family's fast sampler, see below)")
    sp.add_argument("--steps", type=int, default=None,
                    help="steps / NFE budget (default: the sampler's; ddgan: its trained T)")
    sp.add_argument("--num", type=int, default=64, help="number of samples")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--batch", type=int, default=None,
                    help="samples per batch (default: up to 500; a progress bar counts batches)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--schedule", choices=("uniform", "quadratic"), default=None,
                    help="time striding, where the sampler has one")
    sp.add_argument("--score-time", choices=("start", "midpoint"), default=None,
                    help="sscs: the time its score is evaluated at within each step: the step's "
                    "start (the paper's code; cld's default) or its midpoint (the symmetric "
                    "split; latent-cld's default)")
    sp.add_argument("--rtol", type=float, default=None, help="ode samplers: relative tolerance")
    sp.add_argument("--atol", type=float, default=None, help="ode samplers: absolute tolerance")
    sp.add_argument("--karras", action="store_true", default=None,
                    help="peer samplers (diffusers' schedulers, the `baselines` extra): Karras "
                    "et al. (2022) sigmas")
    sp.add_argument("--engine", action="store_true",
                    help="sample through fastsample.runtime.Engine (static buffers; one CUDA graph "
                    "per batch on cuda): ddgan posterior, cld sscs|em, lsgm decode. Batch j > 0 "
                    "uses a seed derived from (--seed, j), so only --num <= --batch reproduces "
                    "the plain path's samples")
    sp.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="with --engine: the network and state dtype")
    sp.add_argument("--out", required=True, metavar="F.npz")
    sp.add_argument("--png", metavar="G.png", default=None,
                    help="also write a PNG: a grid of images, or a scatter plot of 2D samples")
    sp.add_argument("--grid-cols", type=int, default=None,
                    help="image grids: columns (default: ~sqrt(num)); not for 2D samples")


def _eval_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("samples", metavar="F.npz", help="written by `fastsample sample`")
    sp.add_argument("--data", required=True, metavar="SPEC", help="digits | toy2d:NAME")
    sp.add_argument("--seed", type=int, default=0, help="seed of the metrics' own randomness")
    sp.add_argument("--out", default=None, metavar="M.json",
                    help="where to write the metrics (default: F.metrics.json)")


def cmd_sample(ns: argparse.Namespace) -> int:
    import time

    import numpy as np

    from fastsample import samplers
    from fastsample.io import atomic_save_npz
    from fastsample.models import get, load_model

    from fastsample.io import check_output_path
    from fastsample.samplers import MAX_NUM, MAX_STEPS

    # Every argument is checked before the checkpoint is read or a sample drawn.
    _check_range("--num", ns.num, 1, MAX_NUM)
    if ns.steps is not None:
        _check_range("--steps", ns.steps, 1, MAX_STEPS)
    if ns.batch is not None:
        _check_range("--batch", ns.batch, 1, MAX_NUM)
    _check_range("--seed", ns.seed, 0, (1 << 63) - 1)
    _check_device(ns.device)
    check_output_path(ns.out, "--out", ".npz")
    if ns.png:
        check_output_path(ns.png, "--png", ".png")
    model, card = load_model(ns.checkpoint, device=ns.device)
    entry = get(card.family)
    is_image = card.dataset != "" and not card.dataset.startswith("toy2d:")
    if ns.grid_cols is not None and not is_image:
        raise ValueError(f"--grid-cols applies to image samples; {ns.checkpoint} is a 2D "
                         f"({card.dataset}) model")
    opts = {k: getattr(ns, k) for k in ("schedule", "rtol", "atol", "karras")
            if getattr(ns, k) is not None}
    if ns.score_time is not None:
        opts["midpoint"] = ns.score_time == "midpoint"
    if ns.sampler is None:
        ns.sampler, defaults = entry.default
        opts = {**defaults, **opts}
    # Batches of at most 500 give the progress bar something to count on long runs.
    batch = ns.batch if ns.batch is not None else min(ns.num, 500)
    if ns.engine:
        samples, nfe, seconds = _sample_engine(model, card, ns, batch, opts)
    else:
        if ns.dtype != "fp32":
            raise ValueError("--dtype applies to --engine sampling only")
        t0 = time.perf_counter()
        samples, nfe = samplers.sample(entry.sampling, model, ns.sampler, ns.steps, ns.num,
                                       ns.seed, ns.device, batch=batch, progress=True, **opts)
        seconds = time.perf_counter() - t0
    arr = samples.detach().float().cpu().numpy()
    atomic_save_npz(ns.out, samples=arr,
                    nfe=np.int64(nfe) if isinstance(nfe, int) else np.float64(nfe),
                    seconds=np.float64(seconds), sampler=np.str_(ns.sampler),
                    family=np.str_(card.family), dataset=np.str_(card.dataset),
                    seed=np.int64(ns.seed))
    if ns.png:
        from fastsample.io import save_png
        save_png(ns.png, arr, cols=ns.grid_cols)
    print(f"{ns.out}: {ns.num} samples, {card.family}/{ns.sampler}, nfe={nfe}, "
          f"{seconds:.3f} s ({seconds / ns.num * 1e3:.3f} ms/sample)")
    return 0


def _check_range(flag: str, v: int, lo: int, hi: int | None = None) -> None:
    """A numeric option refused, not replaced, below `lo`; beyond `hi` it names the limit."""
    if v < lo:
        raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{flag} {v} is above the limit {hi}")


def _check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")


def _sample_engine(model, card, ns, batch: int, opts: dict):
    import time

    import torch

    from fastsample.runtime import Engine
    from fastsample.runtime.engine import request_seed
    from fastsample.samplers import batch_starts

    if opts.get("rtol") is not None or opts.get("atol") is not None:
        raise ValueError("--engine runs fixed-step samplers; --rtol/--atol do not apply")
    kw = {k: opts[k] for k in ("schedule", "midpoint") if k in opts}
    t0 = time.perf_counter()
    engine = Engine(model, ns.sampler, ns.steps, batch=batch, dtype=ns.dtype, device=ns.device,
                    **kw)
    print(f"engine: {engine} built in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    outs = []
    t0 = time.perf_counter()
    for j, s in enumerate(batch_starts(ns.num, batch, True, f"{card.family} engine")):
        outs.append(engine.sample(request_seed(ns.seed, j))[:ns.num - s])
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return torch.cat(outs), engine.nfe, time.perf_counter() - t0


def cmd_eval(ns: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fastsample.io import load_samples_npz
    from fastsample.metrics import evaluate

    samples, meta = load_samples_npz(ns.samples)
    metrics = evaluate(samples, ns.data, seed=ns.seed)
    metrics.update({k: meta[k] for k in ("nfe", "seconds", "sampler", "family") if k in meta})
    if "seconds" in meta:
        metrics["seconds_per_sample"] = meta["seconds"] / max(1, len(samples))
    out = Path(ns.out) if ns.out else Path(ns.samples).with_suffix(".metrics.json")
    text = json.dumps(metrics, indent=2, default=float)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from fastsample import samplers
    from fastsample.io import save_png
    from fastsample.metrics import evaluate
    from fastsample.models import load_model
    from fastsample.models.registry import REGISTRY, released_checkpoint

    _check_range("--num", ns.num, 1, samplers.MAX_NUM)
    _check_device(ns.device)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in tqdm(REGISTRY.values(), desc="demo", unit="family"):
        sampler, opts = entry.default
        path = released_checkpoint(entry.name)
        if not path.exists():
            rows.append((entry.name, sampler, "-", "-", "-",
                         f"no released checkpoint {path.name}"))
            continue
        model, card = load_model(path, device=ns.device)
        t0 = time.perf_counter()
        x, nfe = samplers.sample(entry.sampling, model, sampler, None, ns.num, ns.seed,
                                 ns.device, **opts)
        sec = time.perf_counter() - t0
        x = x.float().cpu()
        save_png(out / f"{entry.name}-{sampler}.png", x[:64].numpy(), cols=8)
        m = evaluate(x, card.dataset)
        rows.append((entry.name, sampler, str(nfe), f"{1e3 * sec / ns.num:.3f}", f"{m['fd']:.1f}",
                     f"{m['classes_hit']}/10 classes, C2ST {m['c2st']:.3f}"))
    head = ("family", "sampler", "NFE", "ms/sample", "FD", "notes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"grids in {out}/ ({ns.num} samples per family on {ns.device}; FD floor of the "
          f"test split: 14.98 at n=360)")
    if not ns.no_latency:
        _demo_latency(ns, out)
    return 0


def _demo_latency(ns, out) -> None:
    """The first family that exports its whole sampler as one graph (DDGAN-T), at batch 1
    three ways: the eager sampler, the Engine, and that graph run by ONNX Runtime (exported once
    into OUT/, reused while the checkpoint is unchanged)."""
    import json

    import torch

    from fastsample import samplers
    from fastsample.export.core import sha256
    from fastsample.models import load_model
    from fastsample.models.registry import REGISTRY, released_checkpoint
    from fastsample.runtime import Engine
    from fastsample.runtime.timing import latency_ms

    entry = next((e for e in REGISTRY.values() if "sampler" in e.exports), None)
    ckpt = released_checkpoint(entry.name) if entry is not None else None
    if ckpt is None or not ckpt.exists():
        print(f"latency: skipped (no released checkpoint {ckpt})")
        return
    art = out / f"{entry.name}-sampler-onnx"
    try:
        fresh = json.loads((art / "manifest.json").read_text())["checkpoint"]["sha256"] \
            == sha256(ckpt)
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if not fresh:
        from fastsample.export.command import main as export_main
        print(f"exporting the {entry.name} sampler to ONNX ({art}/, about a minute on 2 CPU "
              f"cores) ...", file=sys.stderr)
        rc = export_main([str(ckpt), "--format", "onnx", "--what", "sampler", "--out", str(art),
                          "--max-batch", "64", "--device", ns.device])
        if rc != 0:
            raise RuntimeError(f"exporting the {entry.name} sampler failed (exit {rc})")
    from fastsample.export.onnx import ort_session
    model, _ = load_model(ckpt, device=ns.device)
    sess = ort_session(art, "cpu")          # a directory: sha256s verified first
    g = torch.Generator().manual_seed(ns.seed)
    man = json.loads((art / "manifest.json").read_text())
    feed = {t["name"]: torch.randn([1 if d == "batch" else d for d in t["shape"]],
                                   generator=g).numpy() for t in man["inputs"]}
    sampler, opts = entry.default
    engine = Engine(model, sampler, batch=1, device=ns.device, **opts)
    seeds = iter(range(10**9))
    rows = [("eager (fastsample sample)",
             latency_ms(lambda: samplers.sample(entry.sampling, model, sampler, None, 1,
                                                next(seeds), ns.device, **opts))),
            ("Engine (" + ("one CUDA graph" if engine.graph is not None else "static buffers, "
                           "no graph on CPU") + ")",
             latency_ms(lambda: engine.sample(next(seeds), out=engine.out))),
            ("ONNX Runtime, whole sampler graph (CPU)", latency_ms(lambda: sess.run(None, feed)))]
    print(f"\n{entry.name}-{engine.nfe} latency at batch 1 on {ns.device} (p50 / p90 of 30 "
          f"requests):")
    base = rows[0][1][0]
    for name, (p50, p90) in rows:
        print(f"  {name:<48} {p50:7.2f} / {p90:7.2f} ms   {base / p50:5.2f}x eager")


def cmd_train(ns: argparse.Namespace) -> int:
    """SIGINT/SIGTERM during training: a checkpoint at the current step, one line, exit
    130/143. SIGINT before the loop starts (data loading): one line, exit 130, no checkpoint."""
    from fastsample.train import TrainingInterrupted
    _check_device(ns.device)
    try:
        return _cmd_train(ns)
    except TrainingInterrupted as e:
        print(f"fastsample train: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastsample train: interrupted before training started; no checkpoint written",
              file=sys.stderr)
        return 130


def _check_train_numbers(ns: argparse.Namespace) -> None:
    """Every numeric option, before any work: non-positive values are refused (never replaced
    by the family's default), absurd ones name their limit."""
    import math

    from fastsample.train.loop import MAX_BATCH, MAX_STEPS
    ints = (("--steps", ns.steps, 1, MAX_STEPS), ("--batch-size", ns.batch_size, 1, MAX_BATCH),
            ("--ckpt-every", ns.ckpt_every, 1, None), ("--log-every", ns.log_every, 1, None),
            ("--eval-every", ns.eval_every, 0, None), ("--T", ns.T, 1, 100_000),
            ("--resolution", ns.resolution, 1, 4096), ("--seed", ns.seed, 0, 2 ** 63 - 1))
    for flag, v, lo, hi in ints:
        if v is not None:
            _check_range(flag, v, lo, hi)
    if not math.isfinite(ns.max_minutes) or ns.max_minutes < 0:
        raise ValueError(f"--max-minutes must be a finite number >= 0 (0 = no limit), got "
                         f"{ns.max_minutes}")
    if ns.ema is not None and not (math.isfinite(ns.ema) and 0 <= ns.ema < 1):
        raise ValueError(f"--ema must be in [0, 1), got {ns.ema}")


def _cmd_train(ns: argparse.Namespace) -> int:
    import dataclasses
    import json

    from fastsample import models
    from fastsample.data import load_dataset
    from fastsample.train import TrainConfig, train
    from fastsample.train.batches import batch_sampler

    _check_train_numbers(ns)
    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = value
    if ns.T is not None:
        overrides["T"] = ns.T       # a family whose Config has no T refuses it (make_config)
    data = load_dataset(ns.data, split="train", seed=ns.seed, resolution=ns.resolution)
    mod = models.family_module(ns.model)
    cfg = models.make_config(ns.model, data, overrides)
    tcfg = TrainConfig(
        steps=cfg.train_steps if ns.steps is None else ns.steps,
        batch_size=cfg.batch_size if ns.batch_size is None else ns.batch_size,
        ema_decay=cfg.ema_decay if ns.ema is None else ns.ema, amp=ns.amp, seed=ns.seed,
        grad_clip=getattr(cfg, "grad_clip", TrainConfig.grad_clip),
        device=ns.device, ckpt_every=ns.ckpt_every, log_every=ns.log_every,
        eval_every=ns.eval_every, progress=not ns.no_progress, max_minutes=ns.max_minutes)
    # A family may train on the exact grey levels (a GAN needs no continuous density).
    dequantize = data.kind == "image" and getattr(cfg, "dequantize", True)
    if ns.dry_run:
        print(json.dumps({"family": ns.model, "data": ns.data,
                          "config": dataclasses.asdict(cfg),
                          "train": dataclasses.asdict(tcfg), "dequantize": dequantize},
                         indent=2, default=str))
        return 0
    family = mod.Family(data, cfg)
    evaluate = None if ns.no_eval else getattr(family, "evaluate", None)
    metrics = train(family, batch_sampler(data, dequantize=dequantize), tcfg, ns.out,
                    resume=ns.resume, evaluate=evaluate,
                    card_extra={"command": "fastsample train " + " ".join(sys.argv[2:])})
    print(json.dumps({"checkpoint": f"{ns.out}/{ns.model}.safetensors", "metrics": metrics}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if ns.command in ("train", "sample", "eval", "demo"):
        return _run({"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                     "demo": cmd_demo}[ns.command], ns)
    if ns.command == "export":
        from fastsample.export.command import run_cli
        return run_cli(ns)
    if ns.command == "serve":
        from fastsample.serve.command import serve
        return _run(serve, ns)
    return 0


def _run(fn, ns) -> int:
    """User mistakes become one line on stderr and exit code 2, not a traceback."""
    from fastsample.checkpoint import CheckpointError
    from fastsample.samplers import MissingExtra
    from fastsample.train import TrainingError
    try:
        return fn(ns)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingError, MissingExtra) as e:
        print(f"fastsample {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
