"""One training loop for every family.

A family supplies its modules, its optimiser groups and a `step(ctx, batch)` that computes its
losses and hands each one to `ctx.optimize(name, loss)`; the loop owns everything else: EMA,
gradient clipping, autocast + loss scaling, the non-finite guard, DDP, logging, checkpoints and
exact resume.

Exact resume: every source of randomness is an explicit generator whose state goes into the
training state (data order, the family's noise, dropout's global RNG), so a run killed at any
step and resumed from its last checkpoint reaches bit-identical weights on CPU.

DDP: every rank draws the *global* batch and the global noise from the same generator and keeps
its slice, so N processes at global batch B follow the same loss curve as one process at B.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from fastsample.train import dist as fdist
from fastsample.train.ema import EMA

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """A run that cannot go on (bad config, non-finite loss, unwritable output)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000               # optimiser iterations
    batch_size: int = 128           # global batch, split evenly over ranks
    ema_decay: float = 0.999        # EMA of weights; the EMA copy is what checkpoints release
    grad_clip: float = 1.0          # max global grad norm per optimiser group; 0 = off
    amp: str = "none"               # none | bf16 | fp16 autocast (fp16 adds a GradScaler)
    log_every: int = 50             # JSONL + progress-bar period, in steps
    ckpt_every: int = 500           # checkpoint period, in steps (the last step always saves)
    eval_every: int = 0             # periodic family.evaluate() period; 0 = only at the end
    seed: int = 0
    device: str = "cpu"
    max_minutes: float = 0.0        # stop cleanly (final checkpoint + eval) after this much
                                    # training wall time; 0 = no limit. The card records it.
    progress: bool = True           # tqdm bar (rank 0 only)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp={self.amp!r}; choose one of {sorted(AMP_DTYPES)}")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise ValueError("ckpt_every and log_every must be >= 1")


class Family(Protocol):
    name: str                               # ddgan | cld | lsgm | ddpm
    released: tuple[str, ...]               # module names whose EMA weights a checkpoint releases

    def modules(self) -> dict[str, nn.Module]: ...
    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...
    def step(self, ctx: "StepContext", batch: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def card(self) -> dict: ...             # net/sde config for the checkpoint card


class StepContext:
    """What a family's step may use: wrapped modules, sliced noise, and `optimize`."""

    def __init__(self, loop: "_Loop"):
        self._loop = loop
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self._loop.device

    @property
    def total_steps(self) -> int:
        """The run's step budget (TrainConfig.steps), for schedules that span the whole run."""
        return self._loop.cfg.steps

    def m(self, name: str) -> nn.Module:
        """The module to call in the step (DDP-wrapped when distributed)."""
        return self._loop.wrapped[name]

    def raw(self, name: str) -> nn.Module:
        return self._loop.modules[name]

    def _global(self, draw: Callable, shape: tuple[int, ...]) -> torch.Tensor:
        info = self._loop.info
        n = shape[0]
        full = draw((n * info.world_size,) + tuple(shape[1:]))
        return full[info.rank * n:(info.rank + 1) * n].to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        g = self._loop.gen
        return self._global(lambda s: torch.randn(s, generator=g, dtype=torch.float32), shape)

    def rand(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        g = self._loop.gen
        return self._global(lambda s: torch.rand(s, generator=g, dtype=dtype), shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        g = self._loop.gen
        return self._global(lambda s: torch.randint(high, s, generator=g), shape)

    def autocast(self):
        dtype = AMP_DTYPES[self._loop.cfg.amp]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backward + clip + step for optimiser group `name`; refuses a non-finite loss."""
        lp = self._loop
        loss = loss.float()
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss.item()}) in group {name!r} at step {self.step}; "
                f"stopping. Last good checkpoint: {lp.last_ckpt or 'none yet'}")
        opt = lp.optimizers[name]
        opt.zero_grad(set_to_none=True)
        lp.scaler.scale(loss).backward()
        if lp.cfg.grad_clip > 0:
            lp.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, lp.cfg.grad_clip)
        lp.scaler.step(opt)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TrainingError(f"output directory {out} is not writable: {e.strerror or e}") from None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


class _Loop:
    def __init__(self, family: Family, sample_batch: Callable, cfg: TrainConfig, out: Path,
                 evaluate: Callable | None, card_extra: dict):
        self.family, self.sample_batch, self.cfg, self.out = family, sample_batch, cfg, Path(out)
        self.evaluate, self.card_extra = evaluate, card_extra
        self.device = torch.device(cfg.device)
        self.info = fdist.init_from_env(self.device)
        if cfg.batch_size % self.info.world_size:
            raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the "
                                f"{self.info.world_size} ranks")
        if self.info.is_main:
            _check_writable(self.out)
        torch.manual_seed(cfg.seed)
        self.modules = {k: m.to(self.device) for k, m in family.modules().items()}
        self.optimizers = family.optimizers(self.modules)
        self.ema = {k: EMA(self.modules[k], cfg.ema_decay) for k in family.released}
        self.wrapped = {k: self._wrap(m) for k, m in self.modules.items()}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        self.last_ckpt: str | None = None
        self.wall = 0.0
        self.stopped_early = False

    def _wrap(self, m: nn.Module) -> nn.Module:
        if not self.info.enabled or not any(p.requires_grad for p in m.parameters()):
            return m
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)

    # -- checkpointing -------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / f"{self.family.name}.safetensors"

    @property
    def state_path(self) -> Path:
        from fastsample import checkpoint as ck
        return ck.training_state_path(self.ckpt_path)

    def training_state(self) -> dict:
        return {
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "ema": {k: e.state_dict() for k, e in self.ema.items()},
            "gen": self.gen.get_state(),
            "rng": _rng_state(),
            "scaler": self.scaler.state_dict(),
            "wall": self.wall,
            "config": asdict(self.cfg),
        }

    def restore(self, state: dict) -> None:
        for k, sd in state["modules"].items():
            self.modules[k].load_state_dict(sd)
        for k, sd in state["optimizers"].items():
            self.optimizers[k].load_state_dict(sd)
        for k, sd in state["ema"].items():
            self.ema[k].load_state_dict(sd)
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"]["torch"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.wall = float(state.get("wall", 0.0))

    def save(self, metrics: dict | None = None) -> None:
        from fastsample import checkpoint as ck
        if self.info.is_main:
            released = {}
            for k, e in self.ema.items():
                prefix = "" if len(self.ema) == 1 else f"{k}."
                released.update({prefix + n: t for n, t in e.state_dict().items()})
            card = ck.CheckpointCard(
                family=self.family.name, train_steps=self.step, seed=self.cfg.seed,
                wall_time_s=round(self.wall, 3),
                extra={"train_config": asdict(self.cfg), "metrics": metrics or {},
                       "stopped_by_time_limit": self.stopped_early, **self.card_extra},
                **self.family.card())
            ck.save_training_state(self.state_path, self.training_state())
            ck.save_checkpoint(self.ckpt_path, released, card)
            self.last_ckpt = str(self.ckpt_path)
        fdist.barrier(self.info)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        from fastsample import checkpoint as ck
        if resume and self.state_path.exists():
            self.restore(ck.load_training_state(self.state_path))
            self.last_ckpt = str(self.ckpt_path)
            self._truncate_log()
        log = None
        if self.info.is_main:
            log = open(self.out / "train_log.jsonl", "a", encoding="utf-8")
        bar = None
        if self.info.is_main and self.cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.family.name}",
                       unit="it", dynamic_ncols=True)
        ctx = StepContext(self)
        n_local = self.cfg.batch_size // self.info.world_size
        metrics: dict = {}
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                ctx.step = self.step + 1
                full = self.sample_batch(self.cfg.batch_size, self.gen)
                r = self.info.rank
                batch = full[r * n_local:(r + 1) * n_local].to(self.device)
                for m in self.modules.values():
                    m.train()
                with ctx.autocast():
                    losses = self.family.step(ctx, batch)
                self.scaler.update()
                for k, e in self.ema.items():
                    e.update(self.modules[k])
                self.step += 1
                self.wall += time.perf_counter() - t0
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    vals = fdist.all_reduce_mean({k: float(v) for k, v in losses.items()},
                                                 self.info)
                    if log is not None:
                        log.write(json.dumps({"step": self.step, "wall": round(self.wall, 3),
                                              **vals}) + "\n")
                        log.flush()
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in vals.items()})
                if bar is not None:
                    bar.update(1)
                if (self.evaluate is not None and self.cfg.eval_every
                        and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps):
                    metrics = self._evaluate(log)
                if self.step % self.cfg.ckpt_every == 0 and self.step < self.cfg.steps:
                    self.save(metrics)
                if self.cfg.max_minutes and self.wall >= 60 * self.cfg.max_minutes:
                    self.stopped_early = True
                    break
            if self.evaluate is not None:
                metrics = self._evaluate(log)
            self.save(metrics)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return metrics

    def _truncate_log(self) -> None:
        # Steps after the restored checkpoint were logged by the killed run and are redone now.
        path = self.out / "train_log.jsonl"
        if not self.info.is_main or not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _evaluate(self, log) -> dict:
        if not self.info.is_main:
            return {}
        metrics = self.evaluate({k: e.module for k, e in self.ema.items()})
        if log is not None:
            log.write(json.dumps({"step": self.step, "eval": metrics}) + "\n")
            log.flush()
        return metrics


def train(family: Family, sample_batch: Callable[[int, torch.Generator], torch.Tensor],
          cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False,
          evaluate: Callable | None = None, card_extra: dict | None = None) -> dict:
    """Train `family` on batches from `sample_batch(global_batch, generator)`; returns the final
    metrics. Writes `<out>/<family>.safetensors` (EMA weights + card), `<family>.state.pt`
    (resume state) and `train_log.jsonl`. `resume=True` continues from the state file if any."""
    loop = _Loop(family, sample_batch, cfg, Path(out), evaluate, card_extra or {})
    try:
        return loop.run(resume)
    finally:
        fdist.shutdown(loop.info)

