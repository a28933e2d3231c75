"""What the server runs per model: a checkpoint behind one of two backends.

    onnx     the family's whole-sampler export (registry: an `exports` entry whose ExportPart
             has a `feed`) run by ONNX Runtime; exported once into the artifact cache and
             reused while the checkpoint's sha256 matches; the artifact's files are verified
             against its manifest (export.verify) before the session loads them. Requests merge:
             each request's inputs depend on its (seed, num) only, so a batch is the
             concatenation of its requests' inputs on axis 0.
    engine   fastsample.runtime.Engine on the family's default sampler (or its first Engine
             sampler), one Engine per distinct `num` (an Engine's batch is fixed and its whole
             batch comes from one seed, so requests do not merge). `fastsample sample --engine
             --seed S --num N` gives the same samples.

Nothing here names a family: everything comes from the registry entry of the checkpoint.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fastsample.models import load_model
from fastsample.models.registry import get

BACKENDS = ("auto", "onnx", "engine")
MAX_ENGINES = 4          # distinct `num` values with a built Engine (least recently used dropped)


class ModelError(ValueError):
    """A model the server cannot load: one line."""


def model_name(card_dataset: str, family: str) -> str:
    """`digits-ddgan`, `grid25-cld`: the data set (without its `toy2d:` kind) and the family,
    as the Triton repository's front model is named."""
    from fastsample.export.triton_repo import front_name
    return front_name(card_dataset, family)


def sampler_export(entry) -> str | None:
    """The `--what` of the family's whole-sampler export (one whose part has a feed), or None.
    Read from the module's EXPORTS without building anything: the export named "sampler"."""
    return "sampler" if "sampler" in entry.exports else None


def _onnx_servable(model, card, entry) -> bool:
    """Whether the family's whole-sampler export draws its inputs per request (a feed): one
    without would be exported for minutes only to be refused when loaded. Building the spec
    traces nothing, so this costs no export."""
    what = sampler_export(entry)
    if what is None:
        return False
    from fastsample.export import core
    return core.build_spec(model, card, what).feed is not None


class Served:
    """One served model: name, family, data shape, backend, and run([(seed, num), ...])."""

    merges = False

    def __init__(self, name: str, checkpoint: Path, model, card, entry):
        self.name, self.checkpoint, self.card, self.entry = name, checkpoint, card, entry
        self.family = entry.name
        self.data_shape = ()                # one sample's shape, set by the backend
        self.lock = threading.Lock()        # held while weights are swapped

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "backend": self.backend,
                "sampler": self.sampler, "checkpoint": str(self.checkpoint),
                "data_shape": list(self.data_shape)}


class OnnxServed(Served):
    backend = "onnx"
    merges = True

    def __init__(self, name, checkpoint, model, card, entry, *, cache: Path, max_batch: int,
                 threads: int | None):
        super().__init__(name, checkpoint, model, card, entry)
        self.what = sampler_export(entry)
        if self.what is None:
            raise ModelError(f"{checkpoint}: a {entry.name} checkpoint has no whole-sampler "
                             f"export for ONNX Runtime; serve it with --backend engine")
        self.cache, self.max_batch, self.threads = cache, max_batch, threads
        self._load(model, card)

    def _load(self, model, card) -> None:
        from fastsample.export import core
        from fastsample.export.onnx import ort_session
        art = self._artifact()
        man = json.loads((art / "manifest.json").read_text())
        spec = core.build_spec(model, card, man["what"], man["sampler"], man["steps"])
        if spec.feed is None:
            raise ModelError(f"{self.checkpoint}: the {self.family} {self.what} export has no "
                             f"per-request feed; serve it with --backend engine")
        outs = [t.name for t in spec.outputs]
        if "samples" not in outs:
            raise ModelError(f"{art}: the graph has no `samples` output ({outs})")
        shape = tuple(int(d) for d in spec.outputs[outs.index("samples")].shape[1:])
        if self.data_shape and shape != self.data_shape:
            raise ModelError(f"{self.checkpoint}: the new weights give samples of shape "
                             f"{shape}, the served model {self.data_shape}")
        sess = ort_session(art, "cpu", self.threads)      # a directory: sha256s verified first
        self.sampler, self.steps, self.data_shape = man["sampler"], man["steps"], shape
        # Swapped together, so a batch never mixes an old feed with a new session.
        self._run_parts = (sess, spec.feed, [t.name for t in spec.inputs], outs.index("samples"))

    def _artifact(self) -> Path:
        """The cached export for this checkpoint, exported when missing or stale (about a
        minute on 2 CPU cores for the digits DDGAN)."""
        from fastsample.export.core import ExportError, sha256
        art = self.cache / f"{self.name}-{self.what}-onnx"
        want = sha256(self.checkpoint)
        try:
            man = json.loads((art / "manifest.json").read_text())
            fresh = (man["checkpoint"]["sha256"] == want and man["batch"]["max"] >= self.max_batch
                     and man["what"] == self.what and man["format"] == "onnx")
        except (OSError, ValueError, KeyError, TypeError):
            fresh = False
        if not fresh:
            from fastsample.export.command import main as export_main
            print(f"serve: exporting {self.name} ({self.family} {self.what}) to ONNX in {art} "
                  f"(once per checkpoint; about a minute on 2 CPU cores)", file=sys.stderr)
            self.cache.mkdir(parents=True, exist_ok=True)
            rc = export_main([str(self.checkpoint), "--format", "onnx", "--what", self.what,
                              "--out", str(art), "--max-batch", str(max(self.max_batch, 2))])
            if rc != 0:
                raise ModelError(f"exporting {self.checkpoint} to ONNX failed (exit {rc})")
        try:
            from fastsample.export.verify import verify_artifact
            verify_artifact(art)
        except ExportError as e:
            raise ModelError(str(e)) from None
        return art

    def run(self, requests) -> list[np.ndarray]:
        with self.lock:
            sess, feed, names, k = self._run_parts
            parts = [feed(seed, num) for seed, num in requests]
            inputs = {n: torch.cat([p[i] for p in parts]).numpy() for i, n in enumerate(names)}
            out = sess.run(None, inputs)[k]
        res, s = [], 0
        for _, num in requests:
            res.append(out[s:s + num])
            s += num
        return res

    def reload(self) -> None:
        """Re-read the checkpoint file (re-exported when it changed); the running session
        serves until the new one is ready, then both are swapped between batches."""
        model, card = load_model(self.checkpoint, expect_family=self.family)
        old = self._run_parts
        self._load(model, card)
        new, self._run_parts = self._run_parts, old
        with self.lock:
            self._run_parts = new
            self.card = card


class EngineServed(Served):
    backend = "engine"

    def __init__(self, name, checkpoint, model, card, entry, *, device: str):
        super().__init__(name, checkpoint, model, card, entry)
        if not entry.engine:
            raise ModelError(f"{checkpoint}: the Engine cannot run a {entry.name} checkpoint")
        sampler, opts = entry.default
        if sampler not in entry.engine:
            sampler, opts = (entry.export_sampler or entry.engine[0]), {}
        self.sampler, self.opts, self.device = sampler, dict(opts), device
        self.model = model
        self.engines: OrderedDict = OrderedDict()
        self.engine(1)                              # builds (and checks) one at startup
        self.steps = self.engines[1].nfe
        self.data_shape = tuple(int(d) for d in self.engines[1].out.shape[1:])

    def engine(self, num: int):
        from fastsample.runtime import Engine
        e = self.engines.pop(num, None)
        if e is None:
            # No warm-up runs on the CPU: there is no graph to capture, only time to lose.
            e = Engine(self.model, self.sampler, batch=num, device=self.device,
                       warmup=0 if self.device == "cpu" else 2, **self.opts)
            while len(self.engines) >= MAX_ENGINES:
                self.engines.popitem(last=False)
        self.engines[num] = e
        return e

    def run(self, requests) -> list[np.ndarray]:
        with self.lock:
            return [self.engine(num).sample(seed).cpu().numpy() for seed, num in requests]

    def reload(self) -> None:
        """New weights from the checkpoint file, copied into every built Engine in place
        (Engine.load_weights_: a captured CUDA graph keeps reading the same memory)."""
        model, card = load_model(self.checkpoint, device=self.device, expect_family=self.family)
        with self.lock:
            for e in self.engines.values():
                e.load_weights_(model)
            self.model, self.card = model, card


def load(spec: str, *, backend: str, cache: Path, max_batch: int, threads: int | None,
         device: str) -> Served:
    """`[NAME=]CHECKPOINT[@BACKEND]` -> a Served model (NAME default: data set and family;
    BACKEND default: `backend`)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    head, at, tail = path.rpartition("@")
    if at and tail in BACKENDS:
        path, backend = head, tail
    ckpt = Path(path)
    if not ckpt.is_file():
        raise ModelError(f"{ckpt}: no such checkpoint file")
    model, card = load_model(ckpt, device=device if backend == "engine" else "cpu")
    entry = get(card.family)
    name = name or model_name(card.dataset, entry.name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ModelError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    if backend == "auto":
        backend = "onnx" if device == "cpu" and _onnx_servable(model, card, entry) else "engine"
    if backend == "onnx":
        return OnnxServed(name, ckpt, model, card, entry, cache=cache, max_batch=max_batch,
                          threads=threads)
    return EngineServed(name, ckpt, model, card, entry, device=device)
