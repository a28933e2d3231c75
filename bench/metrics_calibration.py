"""The table of docs/metrics_calibration.md: every digits metric on the data-only reference sets
(fastsample.metrics.reference_sets) plus two DDGAN rows, the released generator and the same
generator with its latent z fixed to 0 (a deliberately collapsed conditional generator: each
step becomes a deterministic denoiser, the regime ddgan_z_usage measures).

    python bench/metrics_calibration.py --seeds 0 1 2 --json bench/results/calibration.json

Lives in bench/ because the model rows load checkpoints, which metrics.py (layer 1) may not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastsample import metrics
from fastsample.models import load_model
from fastsample.samplers import ddgan as ddgan_samplers

ROOT = Path(__file__).resolve().parents[1]
DDGAN = ROOT / "checkpoints" / "digits" / "ddgan.safetensors"


class ZeroLatent:
    """A DDGAN model whose generator is always fed z = 0 (everything else delegated)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def denoise(self, x, z, t):
        return self._model.denoise(x, torch.zeros_like(z), t)


def model_sets(num: int):
    model, _ = load_model(DDGAN)

    def extra(seed: int):
        x, _ = ddgan_samplers.sample(model, "posterior", None, num, seed, "cpu")
        x0, _ = ddgan_samplers.sample(ZeroLatent(model), "posterior", None, num, seed, "cpu")
        return [("d: DDGAN released (posterior T=4)", x), ("e: DDGAN with z = 0 (collapsed)", x0)]
    return extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[360, 2000])
    p.add_argument("--num", type=int, default=2000, help="DDGAN samples per row")
    p.add_argument("--json", default=None, metavar="FILE")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = metrics.calibrate(ns.seeds, ns.sizes, log=lambda s: print(s, file=sys.stderr),
                             extra=model_sets(ns.num))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(metrics.calibration_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
