"""A tiny family for the training-loop tests: eps-prediction denoising of 2D Gaussian data
with dropout (so the global RNG matters for exact resume). Run as a script by subprocess tests."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fastsample.train import TrainConfig, train


class TinyFamily:
    name = "ddpm"
    released = ("net",)

    def __init__(self, nan_at: int = 0, dropout: float = 0.1, sleep: float = 0.0):
        self.nan_at, self.dropout, self.sleep = nan_at, dropout, sleep

    def modules(self):
        net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Dropout(self.dropout), nn.Linear(32, 2))
        return {"net": net}

    def optimizers(self, modules):
        return {"net": torch.optim.Adam(modules["net"].parameters(), lr=1e-2)}

    def step(self, ctx, x0):
        n = x0.shape[0]
        t = ctx.rand(n, 1)
        eps = ctx.randn(n, 2)
        xt = (1 - t) * x0 + t * eps
        pred = ctx.m("net")(torch.cat([xt, t], 1))
        loss = ((pred.float() - eps) ** 2).mean()
        if self.nan_at and ctx.step >= self.nan_at:
            loss = loss * float("nan")
        ctx.optimize("net", loss)
        if self.sleep:
            time.sleep(self.sleep)  # only so a test can kill the process mid-run
        return {"loss": loss.detach()}

    def card(self):
        return {"dataset": "toy2d:gauss", "config": {"width": 32}, "data_shape": [2],
                "net_config": {"net": {"kind": "mlp", "width": 32}}, "sde_config": {}}



def subprocess_env() -> dict:
    """The environment of a training subprocess: this checkout's package first, one OpenMP
    thread (2 shared cores; runs compared bit for bit must not depend on the load)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + \
        env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env

def sample_batch(n, g):
    return torch.randn(n, 2, generator=g) * 0.5 + 1.0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--amp", default="none")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, ckpt_every=a.ckpt_every,
                      log_every=a.log_every, ema_decay=0.9, amp=a.amp, progress=False)
    train(TinyFamily(a.nan_at, a.dropout, a.sleep), sample_batch, cfg, a.out, resume=a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
