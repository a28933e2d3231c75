"""Engine: a fixed (family, sampler, steps, batch, dtype, device) sampling run, ready to replay.

Built once, an Engine owns every buffer the run touches (initial noise, state, latents, per-step
time inputs, the Philox seed cell, the output), warms up (Triton JIT, cuDNN/allocator state),
and on CUDA captures the whole run -- all network calls and fused step kernels -- in one CUDA
graph. A request is then `engine.sample(seed)`: write the seed into its device cell, replay.

The loop runs the rows of the sampler's schedule table (fastsample/export/schedule.py, the same
table the C++ runtime reads), with the step kernels of fastsample.kernels.dispatch at the
samplers' Philox counters. Noise sources:
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

from fastsample.export.schedule import Table, cld_table, ddgan_table, noise_draws, postprocess
from fastsample.kernels import dispatch
from fastsample.nets.layers import GaussianFourierFeatures, SinusoidalFeatures
from fastsample.runtime import nvtx

ENGINE_SAMPLERS = {"ddgan": ("posterior",), "cld": ("sscs", "em"), "lsgm": ("decode",)}
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

    sampler/steps: ddgan posterior (steps = its T), cld sscs|em (steps = NFE, >= 2),
    lsgm decode (one decoder call on z_0 ~ N(0, I): the decoder's latency). opts: cld `schedule`
    (uniform|quadratic). The Engine keeps its own copy of the model in `dtype`.
    """

    def __init__(self, model, sampler: str, steps: int | None = None, *, batch: int = 1,
                 dtype: str = "fp32", device="cpu", cuda_graph: bool | None = None,
                 noise: str = "auto", warmup: int = 2, **opts):
        family = getattr(model, "family", None) or type(model).__module__.rsplit(".", 1)[-1]
        if family not in ENGINE_SAMPLERS:
            raise EngineError(f"Engine serves {sorted(ENGINE_SAMPLERS)} models, got "
                              f"{type(model).__name__} (family {family!r}); ddpm and the ODE "
                              f"samplers have no fixed-step engine")
        if sampler not in ENGINE_SAMPLERS[family]:
            raise EngineError(f"Engine: sampler {sampler!r} is not available for {family}; "
                              f"choose {'|'.join(ENGINE_SAMPLERS[family])}")
        if dtype not in DTYPES:
            raise EngineError(f"Engine: dtype {dtype!r}; choose {'|'.join(DTYPES)}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise EngineError(f"Engine: batch must be an int >= 1, got {batch!r}")
        if noise not in NOISE_SOURCES:
            raise EngineError(f"Engine: noise {noise!r}; choose {'|'.join(NOISE_SOURCES)}")
        device = torch.device(device)
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
        bad = sorted(set(opts) - ({"schedule"} if family == "cld" else set()))
        if bad:
            raise EngineError(f"Engine: unknown option(s) {bad} for {family} {sampler}")

        self.family, self.sampler = family, sampler
        self.dtype = DTYPES[dtype]
        self.device = device
        self.table = self._table(model, sampler, steps, opts)
        self.steps = int(self.table.header["nfe"][0]) if self.table is not None else 1
        self.spec = EngineSpec(family, sampler, self.steps, batch, dtype, str(device),
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

    def _table(self, model, sampler: str, steps, opts) -> Table | None:
        if self.family == "ddgan":
            if steps is not None and steps != model.T:
                raise EngineError(f"this DDGAN was trained with T={model.T}; steps must be "
                                  f"{model.T}, got {steps}")
            return ddgan_table(model)
        if self.family == "cld":
            if steps is None:
                raise EngineError("Engine: cld needs steps (the NFE budget, >= 2)")
            try:
                return cld_table(model, sampler, steps, opts.get("schedule", "quadratic"))
            except ValueError as e:
                raise EngineError(f"Engine: {e}") from None
        if steps not in (None, 1):
            raise EngineError(f"Engine: lsgm decode is one decoder call; steps must be 1, got "
                              f"{steps}")
        return None

    def _alloc(self, N: int) -> None:
        dev, dt, m = self.device, self.dtype, self.model
        shape = (N, *m.latent_shape) if self.family == "lsgm" else (N, *m.data_shape)
        self.x_T = torch.zeros(shape, device=dev, dtype=dt)
        self.x = torch.zeros_like(self.x_T)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.v_T = self.v = self.z = None
        self.times = []
        if self.family == "ddgan":
            self.z = torch.zeros((m.T, N, m.z_dim), device=dev, dtype=dt)
            self.times = [torch.full((N,), r[0], device=dev, dtype=dt) for r in self.table.rows]
        elif self.family == "cld":
            self.v_T = torch.zeros_like(self.x_T)
            self.v = torch.zeros_like(self.x_T)
            self.times = [torch.full((N,), r[1], device=dev, dtype=dt) for r in self.table.rows]
        self.out = torch.zeros((N, *m.data_shape) if self.family != "lsgm" else
                               (N, *self._lsgm_out_shape()), device=dev, dtype=torch.float32)
        self.draws = noise_draws(self.table) if self.table is not None else []

    def _lsgm_out_shape(self) -> tuple:
        with torch.no_grad():
            probe = torch.zeros((1, *self.model.latent_shape), device=self.device,
                                dtype=self.dtype)
            return tuple(self.model.decode(probe).shape[1:])

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
        N, dev = self.x_T.shape[0], self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        if self.family == "ddgan":
            from fastsample.samplers.ddgan import draw_latents
            self.x_T.copy_(torch.randn(self.x_T.shape, generator=g, device=dev))
            self.z.copy_(draw_latents(self.model.T, N, self.model.z_dim, seed, dev))
        elif self.family == "cld":
            from fastsample.samplers.cld import prior
            x, v = prior(self.model.cld, N, self.model.data_shape, g, dev)
            self.x_T.copy_(x)
            self.v_T.copy_(v)
        else:
            self.x_T.copy_(torch.randn(self.x_T.shape, generator=g, device=dev))

    def _philox_fill(self, buf: torch.Tensor, counter: int, scale: float = 1.0) -> int:
        n = buf.numel()
        buf.copy_(dispatch.philox_normal(n, self.seed, counter, 0).view(buf.shape) * scale)
        return counter + n

    def _run(self) -> None:
        """The whole sampling run on the static buffers; nothing here reads a tensor on the
        host or allocates from host data, so it can be captured."""
        if self.spec.noise == "philox":
            c = self._philox_fill(self.x_T, INIT_COUNTER)
            if self.v_T is not None:
                c = self._philox_fill(self.v_T, c, self.table.header["prior_v_scale"][0])
            if self.z is not None:
                self._philox_fill(self.z, c)
        self.x.copy_(self.x_T)
        if self.family == "ddgan":
            self._run_ddgan()
        elif self.family == "cld":
            self.v.copy_(self.v_T)
            self._run_cld()
        else:
            with nvtx.annotate("net", "green"):
                self.out.copy_(self.model.to_data(self.model.decode(self.x)))
            return
        self.out.copy_(postprocess(self.table, self.x))

    def _run_ddgan(self) -> None:
        x, stride = self.x, self.x.numel()
        for k, (_, c0, c1, sigma) in enumerate(self.table.rows):
            with nvtx.annotate(f"step {k}"):
                with nvtx.annotate("net", "green"):
                    x0 = self.model.denoise(x, self.z[k], self.times[k]).to(x.dtype)
                dispatch.ddgan_posterior_step_(x, x0.contiguous(), c0, c1, sigma, self.seed,
                                               k * stride)

    def _run_cld(self) -> None:
        x, v, stride, counter = self.x, self.v, self.x.numel(), 0
        for k, r in enumerate(self.table.rows):
            net, _, k_v, k_a, T_xx, T_xv, T_vx, T_vv, K11, K21, K22, D_xv = r
            with nvtx.annotate(f"step {k}"):
                alpha = None
                if net:
                    with nvtx.annotate("net", "green"):
                        alpha = self.model.alpha(x, v, self.times[k]).to(x.dtype).contiguous()
                noisy = self.draws[k] > 0
                dispatch.cld_affine_step_(x, v, alpha, k_v, k_a, (T_xx, T_xv, T_vx, T_vv),
                                          (K11, K21, K22), self.seed if noisy else None,
                                          counter if noisy else 0, D_xv)
                counter += stride if noisy else 0

    # ------------------------------------------------------------------------------------------
    # Requests.

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (counted from the table's rows)."""
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

