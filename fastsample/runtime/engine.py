"""Engine: a fixed (family, sampler, steps, batch, dtype, device) sampling run, ready to replay.

Built once, an Engine owns every buffer the run touches (initial noise, state, latents, per-step
time inputs, the Philox seed cell, the output), warms up (Triton JIT, cuDNN/allocator state),
and on CUDA captures the whole run -- all network calls and fused step kernels -- in one CUDA
graph. A request is then `engine.sample(seed)`: write the seed into its device cell, replay.

The run is the family's sampler plan (fastsample/samplers/plan.py, the same rows the C++ runtime
reads) executed by the samplers' own loop (`plan.run`) on the Engine's static buffers; the
family's registry entry (fastsample.models.registry) supplies the prior, the network binding and
the data-space map. Noise sources:
  - "torch" (CPU default, and CUDA without a graph): x_T, v_T and z come from the same
    torch.Generator draws as the family's `sample()`, so on CPU
    `Engine(m, ...).sample(s)` equals `fastsample.samplers.<family>.sample(m, ..., num=batch,
    seed=s)` exactly (tested). Host-side generators cannot be replayed by a graph, hence:
  - "philox" (CUDA-graph default): the initial noise is drawn inside the run by the kernels'
    Philox stream keyed by the seed cell, at counters far above the step noise's
    (INIT_COUNTER), so a replay with a new seed is a new, independent sample. Same law as
    "torch", other numbers.

Not thread-safe by design (one set of static buffers); `sample` takes a lock, so concurrent
callers are serialised rather than corrupted. Use one Engine per stream for parallel serving.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import torch

from fastsample.kernels import dispatch
from fastsample.models import registry
from fastsample.nets.layers import GaussianFourierFeatures, SinusoidalFeatures
from fastsample.runtime import nvtx
from fastsample.samplers import plan as plans

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NOISE_SOURCES = ("auto", "torch", "philox")
# Philox counters of the in-run initial noise: 2^44 is beyond any step counter (a run uses
# rows * batch * numel < 2^40 for every size this package serves).
INIT_COUNTER = 1 << 44


def _cast_model(model, device, dtype):
    """A copy of `model` on `device` in `dtype`, except the time features' frequency tables:
    time features are computed in float32 whatever the dtype (log t and 1000 t lose too much
    in half precision), so those tables are copied over in float32 after the cast."""
    m = copy.deepcopy(model).to(device=device)
    feats = [mod for mod in m.modules()
             if isinstance(mod, (GaussianFourierFeatures, SinusoidalFeatures))]
    keep = {mod: {k: b.clone() for k, b in mod.named_buffers(recurse=False)} for mod in feats}
    m = m.to(dtype=dtype).eval()
    for mod, bufs in keep.items():
        for k, b in bufs.items():
            setattr(mod, k, b)
    return m


def request_seed(seed: int, j: int) -> int:
    """The seed of request j of a multi-batch run: the run's seed for j = 0, else a SplitMix64
    mix of (seed, j), so runs with neighbouring seeds do not share batches."""
    if j == 0:
        return seed
    return dispatch.splitmix64((seed << 24) + j) % (1 << 63)


class EngineError(ValueError):
    """A request the Engine cannot serve (sampler, dtype, device, weights): one clear line."""


@dataclass(frozen=True)
class EngineSpec:
    family: str
    sampler: str
    steps: int
    batch: int
    dtype: str
    device: str
    cuda_graph: bool
    noise: str


class Engine:
    """See the module docstring. `model` is a fastsample Model (or use `from_checkpoint`).

    sampler: one of the family's registry `engine` samplers (ddgan posterior, cld sscs|em,
    lsgm em|decode, ddpm ancestral|ddim|em); "decode" is a latent model's decoder alone on
    z_0 ~ N(0, I) (the decoder's latency). steps: the sampler's budget (None: its default; a
    DDGAN's is its T). opts: the sampler's options (e.g. cld `schedule`). The Engine keeps its
    own copy of the model in `dtype`.
    """

    def __init__(self, model, sampler: str, steps: int | None = None, *, batch: int = 1,
                 dtype: str = "fp32", device="cpu", cuda_graph: bool | None = None,
                 noise: str = "auto", warmup: int = 2, **opts):
        try:
            entry = registry.family_of(model)
        except ValueError as e:
            raise EngineError(f"Engine: {e}") from None
        if not entry.engine:
            raise EngineError(f"Engine: family {entry.name} has no fixed-step sampler to serve")
        if sampler not in entry.engine:
            raise EngineError(f"Engine: sampler {sampler!r} is not available for {entry.name}; "
                              f"choose {'|'.join(entry.engine)}")
        if dtype not in DTYPES:
            raise EngineError(f"Engine: dtype {dtype!r}; choose {'|'.join(DTYPES)}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise EngineError(f"Engine: batch must be an int >= 1, got {batch!r}")
        if noise not in NOISE_SOURCES:
            raise EngineError(f"Engine: noise {noise!r}; choose {'|'.join(NOISE_SOURCES)}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise EngineError(f"Engine: device {device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("Engine: device cuda requested but CUDA is not available")
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise EngineError("Engine: cuda_graph=True needs a CUDA device")
        if noise == "auto":
            noise = "philox" if cuda_graph else "torch"
        if cuda_graph and noise != "philox":
            raise EngineError("Engine: a CUDA graph cannot replay host-side torch.Generator "
                              "draws; use noise='philox' (the default with cuda_graph)")

        self.entry, self.family, self.sampler = entry, entry.name, sampler
        self.dtype = DTYPES[dtype]
        self.device = device
        self.table = self._table(model, sampler, steps, opts)
        self.steps = plans.net_calls(self.table) if self.table is not None else 1
        self.spec = EngineSpec(entry.name, sampler, self.steps, batch, dtype, str(device),
                               bool(cuda_graph), noise)
        self.model = _cast_model(model, device, self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._lock = threading.Lock()
        self._alloc(batch)
        self.graph = None
        with torch.no_grad():
            for _ in range(max(int(warmup), 1 if cuda_graph else 0)):
                self._prepare(0)
                self._run()
            if cuda_graph:
                self._capture()

    @classmethod
    def from_checkpoint(cls, path, sampler: str, steps: int | None = None, **kw) -> "Engine":
        from fastsample.models import load_model
        model, _ = load_model(path)
        return cls(model, sampler, steps, **kw)

    # ------------------------------------------------------------------------------------------
    # Build.

    def _table(self, model, sampler: str, steps, opts) -> plans.Table | None:
        sampling = self.entry.sampling
        if sampler == "decode":
            if opts:
                raise EngineError(f"Engine: unknown option(s) {sorted(opts)} for "
                                  f"{self.family} decode")
            if steps not in (None, 1):
                raise EngineError(f"Engine: {self.family} decode is one decoder call; steps "
                                  f"must be 1, got {steps}")
            return None
        bad = sorted(set(opts) - set(sampling.sampler(sampler).options))
        if bad:
            raise EngineError(f"Engine: unknown option(s) {bad} for {self.family} {sampler}")
        if steps is None:
            steps = sampling.default_steps(model, sampler)
        try:
            return sampling.plan(model, sampler, steps, **opts)
        except ValueError as e:
            raise EngineError(f"Engine: {e}") from None

    def _alloc(self, N: int) -> None:
        dev, dt, sampling = self.device, self.dtype, self.entry.sampling
        with torch.no_grad():
            probe = sampling.prior(self.model, N, 0, dev)
        # zeros_like keeps a prior view's strides (DDGAN's latents are a transposed view), so
        # the network sees the same layout as on the eager path.
        self.prior = tuple(torch.zeros_like(p, dtype=dt) for p in probe)
        self.scales = sampling.scales(self.model, len(self.prior))
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.state, self.net = sampling.bind(self.model, self.prior)
        self.times = (plans.time_inputs(self.table, N, dev, dt) if self.table is not None
                      else [])
        with torch.no_grad():
            shape = sampling.finish(self.model, self.state[0]).shape
        self.out = torch.zeros(shape, device=dev, dtype=torch.float32)

    def _capture(self) -> None:
        # Warm-up on a side stream is what torch.cuda.graphs asks for before capture.
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._prepare(0)
            self._run()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with nvtx.annotate("capture"), torch.cuda.graph(self.graph):
            self._run()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------------
    # One run.

    def _prepare(self, seed: int) -> None:
        """Outside any graph: the seed cell, and with noise='torch' the initial noise drawn as
        the family's sample() draws it."""
        self.seed.fill_(seed)
        if self.spec.noise != "torch":
            return
        parts = self.entry.sampling.prior(self.model, self.batch, seed, self.device)
        for buf, p in zip(self.prior, parts):
            buf.copy_(p)

    def _run(self) -> None:
        """The whole sampling run on the static buffers; nothing here reads a tensor on the
        host or allocates from host data, so it can be captured."""
        if self.spec.noise == "philox":
            c = INIT_COUNTER
            for buf, scale in zip(self.prior, self.scales):
                n = buf.numel()
                buf.copy_(dispatch.philox_normal(n, self.seed, c, 0).view(buf.shape) * scale)
                c += n
        for st, p in zip(self.state, self.prior):
            st.copy_(p)
        if self.table is not None:
            plans.run(self.table, self.net, *self.state, seed=self.seed, times=self.times,
                      annotate=nvtx.annotate)
        with nvtx.annotate("net" if self.table is None else "finish", "green"):
            self.out.copy_(self.entry.sampling.finish(self.model, self.state[0]))

    # ------------------------------------------------------------------------------------------
    # Requests.

    @property
    def batch(self) -> int:
        return self.state[0].shape[0]

    @property
    def x(self) -> torch.Tensor:
        return self.state[0]

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (counted from the plan's rows)."""
        return self.steps

    def sample(self, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`batch` samples in data space (float32) for `seed`; a fresh tensor, or written into
        `out` (same shape, any device) to avoid the allocation."""
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < (1 << 63):
            raise EngineError(f"seed must be an int in [0, 2^63), got {seed!r}")
        if out is not None and tuple(out.shape) != tuple(self.out.shape):
            raise EngineError(f"out has shape {tuple(out.shape)}; expected "
                              f"{tuple(self.out.shape)}")
        with self._lock, torch.no_grad():
            self._prepare(seed)
            if self.graph is not None:
                with nvtx.annotate("replay", "red"):
                    self.graph.replay()
            else:
                with nvtx.annotate("run", "red"):
                    self._run()
            if out is None:
                return self.out.clone()
            out.copy_(self.out)
            return out

    def time_sample(self, seed: int = 0, repeat: int = 10) -> list[float]:
        """Wall seconds of `repeat` requests (synchronised on CUDA), for quick latency checks."""
        times = []
        for i in range(repeat):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.sample(seed + i, out=self.out)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return times

    def load_weights_(self, source) -> None:
        """Copy new weights (a checkpoint path, a Model of the same architecture, or its
        state_dict) into the Engine's model in place: a captured graph keeps reading the same
        memory, so no recapture is needed. Shapes and names must match exactly."""
        if isinstance(source, dict):
            sd = source
        elif isinstance(source, torch.nn.Module):
            sd = source.state_dict()
        else:
            from fastsample.models import load_model
            try:
                m, card = load_model(source, expect_family=self.family)
            except Exception as e:          # the loader's one-line errors, re-labelled
                raise EngineError(f"load_weights_: {e}") from None
            sd = m.state_dict()
        own = self.model.state_dict()
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise EngineError(f"load_weights_: weights do not fit this Engine's model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for k, t in own.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise EngineError(f"load_weights_: {k} has shape {tuple(sd[k].shape)}, the "
                                  f"captured model has {tuple(t.shape)}")
            if sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all()):
                raise EngineError(f"load_weights_: {k} contains NaN or inf; nothing was copied")
        with self._lock, torch.no_grad():
            for k, t in own.items():
                t.copy_(sd[k])

    def __repr__(self) -> str:
        s = self.spec
        return (f"Engine({s.family} {s.sampler} nfe={s.steps} batch={s.batch} {s.dtype} "
                f"{s.device} graph={s.cuda_graph} noise={s.noise})")

