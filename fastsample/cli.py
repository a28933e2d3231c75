"""`fastsample train | sample | eval | export | demo` (also `python -m fastsample`).

Every subcommand parses its own options; the ones whose issue has not landed yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import sys

PENDING = {
    "train": "training core (issue #4)",
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
        sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if ns.command in PENDING:
        print(f"fastsample {ns.command}: not available yet: {PENDING[ns.command]} has not landed.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
