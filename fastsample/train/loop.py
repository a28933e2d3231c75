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

Safety of a run directory (issue 18):
- one run at a time: an exclusive fcntl.flock on DIR/.lock (holding the holder's PID) for the
  whole run; a second run or a --resume on a busy DIR stops with TrainingError naming the PID.
  While holding it, temp files a killed run left (.<family>.state.pt.*.tmp, ...) are removed.
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written at that step and
  TrainingInterrupted (exit_code 130 / 143) is raised; `fastsample train` prints one line.
- divergence guard: a loss with |loss| > LOSS_BOUND or a parameter with max |w| > WEIGHT_BOUND
  (or any non-finite value) stops the run with TrainingError before anything is saved, so the
  last checkpoint on disk is the last good one. The released recipes stay far below both bounds:
  measured with each family's default recipe (first 15 steps on digits, 300 on toy2d:grid25),
  every loss handed to optimize() was at most 7.2 and every parameter's max |w| at most 3.1;
  the released checkpoints' tensors are at most 34 in magnitude.
- --resume checks the state against the run: same family, data set and family config (net and
  sde config; train_steps may differ), a step in 0..steps; mismatches are TrainingError.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
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
LOSS_BOUND = 1e6            # |loss| beyond this is divergence (see the module docstring)
WEIGHT_BOUND = 1e6          # max |w| of any trained parameter beyond this is divergence
MAX_STEPS = 100_000_000     # --steps / a resumed state's step beyond this is refused
MAX_BATCH = 1 << 16         # global batch
LOCK_NAME = ".lock"


class TrainingError(RuntimeError):
    """A run that cannot go on (bad config, non-finite loss, unwritable output)."""


class TrainingInterrupted(TrainingError):
    """SIGINT / SIGTERM: a checkpoint was written at `step`; exit with `exit_code` (128 + sig)."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step, self.exit_code = signum, step, 128 + signum


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
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for name, lo, hi in (("steps", 1, MAX_STEPS), ("batch_size", 1, MAX_BATCH),
                             ("ckpt_every", 1, None), ("log_every", 1, None),
                             ("eval_every", 0, None)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"{name} {v} is above the limit {hi}")
        if not is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in 0..2^63-1, got {self.seed!r}")
        if not is_num(self.max_minutes) or self.max_minutes < 0:
            raise ValueError(f"max_minutes must be a finite number >= 0 (0 = no limit), got "
                             f"{self.max_minutes!r}")
        if not is_num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not is_num(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"grad_clip must be a finite number >= 0, got {self.grad_clip!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp={self.amp!r}; choose one of {sorted(AMP_DTYPES)}")


class Family(Protocol):
    name: str                               # ddgan | cld | lsgm | ddpm
    released: tuple[str, ...]               # module names whose EMA weights a checkpoint releases

    def modules(self) -> dict[str, nn.Module]: ...
    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...
    def step(self, ctx: "StepContext", batch: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def card(self) -> dict: ...             # config, data_shape, net_config, sde_config (card format 2)


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

    def lr_scale(self, warmup: int, min_frac: float = 1.0, offset: int = 0) -> float:
        """Learning-rate multiplier at this step: linear warm-up over `warmup` steps, then a cosine
        from 1 down to `min_frac` at the end of the run (min_frac 1 = constant). `offset` steps at
        the start belong to another stage (a latent model's VAE) and are not counted. Read from the
        step counter, so an exact resume needs no scheduler state."""
        step = self.step - offset
        total = max(1, self.total_steps - offset)
        warm = min(1.0, step / warmup) if warmup else 1.0
        frac = min(max(step, 0), total) / total
        return warm * (min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * frac)))

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
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite loss ({value}) in group {name!r} at step {self.step}; "
                f"stopping. Last good checkpoint: {lp.last_ckpt or 'none yet'}")
        if abs(value) > LOSS_BOUND:
            raise TrainingError(
                f"training diverged: loss {value:.3g} in group {name!r} at step "
                f"{self.step} is beyond +-{LOSS_BOUND:g}; stopping. Last good checkpoint: "
                f"{lp.last_ckpt or 'none yet'}")
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


class _DirLock:
    """An exclusive fcntl.flock on DIR/.lock for the life of a run; the file holds the PID."""

    def __init__(self, out: Path):
        import fcntl
        self.path = out / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TrainingError(f"cannot create the lock file {self.path}: "
                                f"{e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(self.fd, 64, 0).decode("ascii", "replace").strip() or "?"
            except OSError:
                holder = "?"
            os.close(self.fd)
            raise TrainingError(f"{out} is in use by another training run (PID {holder}, "
                                f"holding {self.path}); wait for it to finish or choose "
                                f"another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _clean_stale_temps(out: Path, family: str) -> list[str]:
    """Remove the temp files of atomic writes a killed run left behind (checkpoint._atomic_write
    names them .<target name>.<random>.tmp); only called while holding the run's lock."""
    removed = []
    for target in (f"{family}.state.pt", f"{family}.safetensors"):
        for p in out.glob(f".{target}.*.tmp"):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def _config_diff(a, b, where: str = "") -> list[str]:
    """Key paths where two JSON-like configs differ (train_steps, a run length, may differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k == "train_steps":
                continue
            out += _config_diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if a == b else [where or "<root>"]


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
        self.lock = None
        if self.info.is_main:
            _check_writable(self.out)
            self.lock = _DirLock(self.out)
        try:
            self._setup(family, cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, family: Family, cfg: TrainConfig) -> None:
        if self.info.is_main:
            _clean_stale_temps(self.out, family.name)
        self.family_card = json.loads(json.dumps(family.card(), sort_keys=True, default=list))
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
        self.signal: int | None = None

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
            "family": self.family.name,
            "card": json.dumps(self.family_card, sort_keys=True),
        }

    def check_state(self, state: dict) -> None:
        """Refuse a state that does not belong to this run: another family, data set or family
        config (the card would lie), or a step outside 0..steps. States written before these
        fields existed carry no family/card and are checked by step and tensor shapes only."""
        where = self.state_path
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise TrainingError(f"{where}: step {step!r} is not an integer; not a training "
                                f"state this version wrote")
        if not 0 <= step <= self.cfg.steps:
            raise TrainingError(f"{where}: the state is at step {step}, outside 0..{self.cfg.steps}"
                                f" (--steps); refusing to resume from it")
        fam = state.get("family", self.family.name)
        if fam != self.family.name:
            raise TrainingError(f"{where}: a {fam!r} training state; this run trains "
                                f"{self.family.name!r}")
        if "card" in state:
            try:
                card = json.loads(state["card"])
            except (TypeError, ValueError):
                raise TrainingError(f"{where}: corrupt 'card' field in the state") from None
            if not isinstance(card, dict):
                raise TrainingError(f"{where}: corrupt 'card' field in the state")
            if card.get("dataset") != self.family_card.get("dataset"):
                raise TrainingError(f"{where}: trained on {card.get('dataset')!r}, this run's "
                                    f"--data is {self.family_card.get('dataset')!r}; refusing "
                                    f"to resume (use another --out)")
            keys = ("config", "data_shape", "net_config", "sde_config")
            diff = _config_diff({k: card.get(k) for k in keys},
                                {k: self.family_card.get(k) for k in keys})
            if diff:
                more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
                raise TrainingError(f"{where}: the state's {self.family.name} config differs "
                                    f"from this run's in {', '.join(diff[:4])}{more}; resume "
                                    f"with the same --set/--T options, or use another --out")
        for key in ("modules", "optimizers", "ema", "gen", "rng", "scaler"):
            if key not in state:
                raise TrainingError(f"{where}: the state has no {key!r}; not a complete "
                                    f"training state")

    def restore(self, state: dict) -> None:
        self.check_state(state)
        try:
            for k, sd in state["modules"].items():
                self.modules[k].load_state_dict(sd)
            for k, sd in state["optimizers"].items():
                self.optimizers[k].load_state_dict(sd)
            for k, sd in state["ema"].items():
                self.ema[k].load_state_dict(sd)
            self.gen.set_state(state["gen"])
            torch.set_rng_state(state["rng"]["torch"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise TrainingError(f"{self.state_path}: does not fit this run's "
                                f"{self.family.name} modules ({type(e).__name__}: "
                                f"{text[:300]}); resume with the same options or use another "
                                f"--out") from None
        self.step = int(state["step"])
        self.wall = float(state.get("wall", 0.0))

    def check_weights(self, step: int) -> None:
        """The divergence guard on the weights: max |w| of every trained parameter."""
        params = [p.detach() for m in self.modules.values() for p in m.parameters()
                  if p.requires_grad]
        if not params:
            return
        peaks = torch.stack([p.abs().max().float() for p in params if p.numel()])
        peak = float(peaks.max())
        if math.isfinite(peak) and peak <= WEIGHT_BOUND and bool(torch.isfinite(peaks).all()):
            return
        names = [(f"{k}.{n}", p) for k, m in self.modules.items()
                 for n, p in m.named_parameters() if p.requires_grad and p.numel()]
        worst = max(names, key=lambda np_: float(np_[1].detach().abs().max().nan_to_num(
            float("inf"))))[0]
        raise TrainingError(f"training diverged: parameter {worst} reached max |w| = "
                            f"{peak:.3g} at step {step} (bound {WEIGHT_BOUND:g}); "
                            f"stopping. Last good checkpoint: {self.last_ckpt or 'none yet'}")

    def save(self, metrics: dict | None = None) -> None:
        from fastsample import checkpoint as ck
        if self.info.is_main:
            released = {}
            for k, e in self.ema.items():
                prefix = "" if len(self.ema) == 1 else f"{k}."
                released.update({prefix + n: t for n, t in e.state_dict().items()})
            extra = {"train_config": asdict(self.cfg), "metrics": metrics or {},
                     "stopped_by_time_limit": self.stopped_early, **self.card_extra}
            if self.signal is not None:
                extra["stopped_by_signal"] = signal.Signals(self.signal).name
            card = ck.CheckpointCard(
                family=self.family.name, train_steps=self.step, seed=self.cfg.seed,
                wall_time_s=round(self.wall, 3), extra=extra, **self.family.card())
            ck.save_training_state(self.state_path, self.training_state())
            ck.save_checkpoint(self.ckpt_path, released, card)
            self.last_ckpt = str(self.ckpt_path)
        fdist.barrier(self.info)

    # -- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum          # acted on at the next step boundary

    def _signalled(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM (all ranks stop at the same step)."""
        if not self.info.enabled:
            return self.signal is not None
        return fdist.any_flag(self.signal is not None, self.info, self.device)

    def _interrupt(self, metrics: dict):
        self.save(metrics)
        sig = self.signal if self.signal is not None else signal.SIGTERM
        name = signal.Signals(sig).name
        where = self.last_ckpt or str(self.ckpt_path)
        return TrainingInterrupted(f"interrupted by {name} at step {self.step}: checkpoint "
                                   f"{where} written (continue with --resume)", sig, self.step)

    def run(self, resume: bool) -> dict:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._run(resume)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _run(self, resume: bool) -> dict:
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
                self.check_weights(self.step + 1)
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
                if self._signalled():
                    raise self._interrupt(metrics)
            if self.evaluate is not None and not self._signalled():
                metrics = self._evaluate(log)
            self.save(metrics)
            if self._signalled():
                raise self._interrupt(metrics)
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
        if loop.lock is not None:
            loop.lock.release()
        fdist.shutdown(loop.info)

