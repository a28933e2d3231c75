"""`fastsample train | sample | eval | export | demo` (also `python -m fastsample`).

Every subcommand parses its own options; the ones whose issue has not landed yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import sys

PENDING = {
    "sample": "samplers and `fastsample sample` (issue #5)",
    "eval": "`fastsample eval` (issue #5)",
    "export": "`python -m fastsample.export` (issue #6)",
    "demo": "`fastsample demo` (issue #5)",
}

HELP = {
    "train": "train a model (ddgan | cld | lsgm | ddpm) on digits or a 2D toy",
    "sample": "sample a checkpoint with a named sampler; writes samples.npz (+ optional PNG)",
    "eval": "compute metrics (FD, class coverage, MMD / sliced Wasserstein) of a samples.npz",
    "export": "export a checkpoint to ONNX / AOTInductor / TensorRT / Triton-server repo",
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
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,export,demo}")
    for name in ("train", "sample", "eval", "export", "demo"):
        sp = sub.add_parser(name, help=HELP[name], description=HELP[name])
        if name == "train":
            _train_args(sp)
        else:
            sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _train_args(sp: argparse.ArgumentParser) -> None:
    sp.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    sp.epilog = ("Family hyper-parameters (learning rates, T for ddgan, net width...) are fields "
                 "of the family's Config; see them with --dry-run and change them with --set "
                 "KEY=VALUE. Distributed: torchrun --nproc_per_node=2 -m fastsample train ...")
    sp.add_argument("--model", required=True, choices=("ddgan", "cld", "lsgm", "ddpm"),
                    help="model family")
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
    sp.add_argument("--resume", action="store_true",
                    help="continue from DIR/<model>.state.pt if present")
    sp.add_argument("--T", type=int, default=None, help="ddgan: number of denoising steps")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the family Config (repeatable)")
    sp.add_argument("--resolution", type=int, default=None,
                    help="folder:PATH data: square side to resize to")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the resolved configuration and exit")


def cmd_train(ns: argparse.Namespace) -> int:
    import dataclasses
    import json

    from fastsample import models
    from fastsample.data import load_dataset
    from fastsample.train import TrainConfig, train
    from fastsample.train.batches import batch_sampler

    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = value
    if ns.T is not None:
        if ns.model != "ddgan":
            raise ValueError(f"--T applies to --model ddgan only, not {ns.model}")
        overrides["T"] = ns.T
    data = load_dataset(ns.data, split="train", seed=ns.seed, resolution=ns.resolution)
    mod = models.family_module(ns.model)
    cfg = models.make_config(ns.model, data, overrides)
    tcfg = TrainConfig(
        steps=ns.steps or cfg.train_steps, batch_size=ns.batch_size or cfg.batch_size,
        ema_decay=cfg.ema_decay if ns.ema is None else ns.ema, amp=ns.amp, seed=ns.seed,
        device=ns.device, ckpt_every=ns.ckpt_every, log_every=ns.log_every,
        eval_every=ns.eval_every, progress=not ns.no_progress)
    if ns.dry_run:
        print(json.dumps({"family": ns.model, "data": ns.data,
                          "config": dataclasses.asdict(cfg),
                          "train": dataclasses.asdict(tcfg)}, indent=2, default=str))
        return 0
    family = mod.Family(data, cfg)
    evaluate = None if ns.no_eval else getattr(family, "evaluate", None)
    metrics = train(family, batch_sampler(data, dequantize=data.kind == "image"), tcfg, ns.out,
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
    if ns.command == "train":
        return _run(cmd_train, ns)
    if ns.command in PENDING:
        print(f"fastsample {ns.command}: not available yet: {PENDING[ns.command]} has not landed.",
              file=sys.stderr)
        return 2
    return 0


def _run(fn, ns) -> int:
    """User mistakes become one line on stderr and exit code 2, not a traceback."""
    from fastsample.checkpoint import CheckpointError
    from fastsample.train import TrainingError
    try:
        return fn(ns)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingError) as e:
        print(f"fastsample {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
