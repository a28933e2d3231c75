"""Train and release the shipped checkpoints (`make checkpoints`).

    python -m fastsample.train.release [--device cpu|cuda] [--jobs N] [--only FAMILY:DATA,...]

Each model is trained by the very `fastsample train` command a user would type (default
hyper-parameters of its family), then released into checkpoints/<digits|toy name>/<family>
.safetensors with fp16 storage (the shipped set must stay under 16 MB) and a readable copy of
its card in <family>.json. Training logs stay in runs/release/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ("ddgan:digits", "cld:digits", "lsgm:digits", "ddpm:digits",
            "ddgan:toy2d:grid25", "cld:toy2d:grid25", "ddpm:toy2d:grid25",
            "latent-cld:digits", "latent-ddgan:digits")
SEED = 0
# The latent models train their prior on the released LSGM's VAE (frozen: no VAE stage), so
# they come after it in RELEASED and share its encoder and decoder. Both model only that VAE's
# one active channel (docs/latent.md): latent-cld 12000 steps (24 min on one thread),
# latent-ddgan 15000 steps (45 min on one thread), each in one leg.
_LATENT_PRIOR = ("--set", "vae_init=checkpoints/digits/lsgm.safetensors", "--set", "vae_steps=0",
                 "--ema", "0.995")
RELEASE_ARGS = {"latent-cld:digits": _LATENT_PRIOR + ("--set", "latent_channels=0",
                                                      "--steps", "12000"),
                "latent-ddgan:digits": _LATENT_PRIOR + ("--set", "latent_channels=0",
                                                        "--steps", "15000")}


def _dest(family: str, data: str, out: Path) -> Path:
    folder = data.split(":", 1)[1] if data.startswith("toy2d:") else data
    return out / folder / f"{family}.safetensors"


def release_one(spec: str, device: str, runs: Path, out: Path, commit: str | None,
                train_args: tuple[str, ...] = ()) -> dict:
    family, data = spec.split(":", 1)
    run_dir = runs / f"{family}-{data.replace(':', '-')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fastsample", "train", "--model", family, "--data", data,
           "--out", str(run_dir), "--seed", str(SEED), "--device", device, "--no-progress",
           *RELEASE_ARGS.get(spec, ()), *train_args]
    t0 = time.time()
    with open(run_dir / "stdout.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = (run_dir / "stdout.log").read_text()[-2000:]
        raise RuntimeError(f"training {spec} failed (exit {rc}):\n{tail}")
    return publish(spec, run_dir, out, "fastsample train " + " ".join(cmd[4:]), device, commit,
                   wall_incl_startup_s=time.time() - t0)


def publish(spec: str, run_dir: Path, out: Path, command: str, device: str, commit: str | None,
            wall_incl_startup_s: float | None = None) -> dict:
    """Release the checkpoint a finished `fastsample train` run left in run_dir: fp16 storage
    plus the card's exact command, into out/<data>/<family>.safetensors and its .json."""
    from fastsample import checkpoint as ck

    family, data = spec.split(":", 1)
    src = Path(run_dir) / f"{family}.safetensors"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no {family} checkpoint in that run directory")
    sd, card = ck.load_checkpoint(src, expect_family=family)
    if card.dataset != data:
        raise ValueError(f"{src} was trained on {card.dataset!r}, not {data!r}")
    extra = dict(card.extra)
    extra["command"] = command
    extra["trained_on"] = device
    if wall_incl_startup_s is not None:
        extra["wall_time_incl_startup_s"] = round(wall_incl_startup_s, 1)
    fields = {"extra": extra}
    if commit and card.git_commit == "unknown":
        fields["git_commit"] = commit       # trained from a copy of the tree without .git
    import dataclasses
    card = dataclasses.replace(card, **fields)
    dest = _dest(family, data, out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = ck.save_checkpoint(dest, sd, card, dtype="float16")
    dest.with_suffix(".json").write_text(written.to_json() + "\n")
    return {"spec": spec, "dest": str(dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest),
            "bytes": dest.stat().st_size, "wall_time_s": card.wall_time_s,
            "metrics": card.extra.get("metrics", {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument("--only", default=None, help="comma-separated FAMILY:DATA subset")
    p.add_argument("--runs", default=str(ROOT / "runs" / "release"))
    p.add_argument("--out", default=str(ROOT / "checkpoints"))
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="passed to every `fastsample train` (0 = train to the default steps)")
    p.add_argument("--set", action="append", default=[], metavar="FAMILY:DATA:KEY=VALUE",
                   help="a --set override for one released model (repeatable)")
    p.add_argument("--commit", default=os.environ.get("FASTSAMPLE_COMMIT"),
                   help="git commit to record when the tree has no .git")
    a = p.parse_args(argv)
    specs = a.only.split(",") if a.only else list(RELEASED)
    unknown = [s for s in specs if s not in RELEASED]
    if unknown:
        p.error(f"unknown release spec(s) {unknown}; choose from {', '.join(RELEASED)}")
    runs, out = Path(a.runs), Path(a.out)
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        def args_for(spec):
            extra = ["--max-minutes", str(a.max_minutes)] if a.max_minutes else []
            for item in a.set:
                target, _, kv = item.rpartition(":")
                if target == spec:
                    extra += ["--set", kv]
            return tuple(extra)
        futs = {s: pool.submit(release_one, s, a.device, runs, out, a.commit, args_for(s))
                for s in specs}
        results, failed = [], []
        for s, f in futs.items():
            try:
                results.append(f.result())
                print(json.dumps(results[-1]), flush=True)
            except Exception as e:  # report every failure, not just the first
                failed.append(s)
                print(f"FAILED {s}: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
