"""The family registry: one entry per model family, the only place that knows every family.

An entry declares everything the CLI, training, export, the Engine and the benches need, so none
of them branches on a family name:

    name              "ddgan", "cld", ...
    module            the family's module (Config, default_config, Family, Model)
    sampling          its samplers: prior, plans, adaptive solvers, data-space map
                      (fastsample.samplers.Sampling, defined in samplers/<family>.py)
    default           (sampler, options): the fast sampler `fastsample sample` and the demo use
                      when no --sampler is given; steps come from sampling.default_steps
    engine            the samplers the Engine can run (fixed plans, plus "decode" for a latent
                      model's decoder alone)
    export_sampler    the fixed-plan sampler whose table an export writes by default
    exports           the module's EXPORTS: {what: builder(model, table) -> ExportPart}, the
                      first the default `--what`
    upgrade_card      the module's upgrade_card(card dict) -> the format-2 card dict (a format-1
                      card kept the Config in a family-specific place)

Adding a family: write its model module (models/<name>.py) and its samplers module
(samplers/<name>.py, with a SAMPLING), then one `Entry` in `_ENTRIES` below
(docs/architecture.md walks through it).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from torch import nn


@dataclass
class IOTensor:
    """One named input or output of an exported module."""
    name: str
    shape: tuple            # ints, with the string "batch" on the dynamic axis
    dtype: str = "float32"
    level: float = 0.0      # > 0: a quantised output on a grid of this step (parity allows flips)

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index("batch") if "batch" in self.shape else None

    def concrete(self, n: int) -> tuple:
        return tuple(n if d == "batch" else d for d in self.shape)

    def to_json(self) -> dict:
        ax = self.batch_axis
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "dynamic_axes": {} if ax is None else {str(ax): "batch"}}


@dataclass
class ExportPart:
    """What one `--what` of a family exports: the module, its I/O contract and the plan that
    goes beside it as schedule.txt."""
    module: nn.Module
    inputs: list
    outputs: list
    table: object             # samplers.plan.Table
    sampler: str
    steps: int
    draw: Callable            # draw(n, generator) -> tuple of float32 input tensors
    inputs_doc: str           # how the parity inputs are drawn (for the manifest)
    extra: dict = field(default_factory=dict)
    calls: int = 1            # network evaluations in the graph (scales the parity tolerance)
    # A whole-sampler export only: feed(seed, num) -> the graph's inputs (float32, batch-first)
    # drawn exactly as `fastsample sample --seed seed --num num` draws them, so the graph's
    # `samples` output is that command's samples (a server computes them per request; since
    # they depend on (seed, num) only, requests can be concatenated on axis 0).
    feed: Callable | None = None


def card_dict(card) -> dict:
    """A checkpoint card (CheckpointCard or its dict) as a plain dict."""
    if isinstance(card, dict):
        return dict(card)
    if dataclasses.is_dataclass(card):
        return dataclasses.asdict(card)
    return {k: getattr(card, k) for k in dir(card) if not k.startswith("_")}


@dataclass(frozen=True)
class Entry:
    name: str
    module_name: str
    sampling_name: str
    default: tuple
    engine: tuple = ()
    export_sampler: str | None = None

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    @property
    def sampling(self):
        return importlib.import_module(self.sampling_name).SAMPLING

    @property
    def samplers(self) -> tuple:
        return tuple(self.sampling.samplers)

    def upgrade_card(self, card):
        """A loaded card in the current schema (format 1 is upgraded by the family)."""
        up = self.module.upgrade_card(card_dict(card))
        return type(card)(**up) if not isinstance(card, dict) else up

    @property
    def exports(self) -> dict:
        return getattr(self.module, "EXPORTS", {})

    def default_steps(self, model, sampler: str) -> int | None:
        return self.sampling.default_steps(model, sampler)


_ENTRIES = (
    Entry("ddgan", "fastsample.models.ddgan", "fastsample.samplers.ddgan", ("posterior", {}),
          engine=("posterior",), export_sampler="posterior"),
    Entry("cld", "fastsample.models.cld", "fastsample.samplers.cld",
          ("sscs", {"schedule": "quadratic"}), engine=("sscs", "em"), export_sampler="sscs"),
    Entry("lsgm", "fastsample.models.lsgm", "fastsample.samplers.lsgm",
          ("ode", {"rtol": 1e-3, "atol": 1e-3}), engine=("em", "decode"), export_sampler="em"),
    Entry("ddpm", "fastsample.models.ddpm", "fastsample.samplers.ddpm", ("ddim", {}),
          engine=("ancestral", "ddim", "em")),
    Entry("latent-cld", "fastsample.models.latent_cld", "fastsample.samplers.latent_cld",
          ("sscs", {"schedule": "quadratic"}), engine=("sscs", "em"), export_sampler="sscs"),
    Entry("latent-ddgan", "fastsample.models.latent_ddgan", "fastsample.samplers.latent_ddgan",
          ("posterior", {}), engine=("posterior",), export_sampler="posterior"),
)
REGISTRY = {e.name: e for e in _ENTRIES}
FAMILIES = tuple(REGISTRY)


def get(name: str) -> Entry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r}; choose one of {'|'.join(FAMILIES)}")
    return REGISTRY[name]


def family_of(model) -> Entry:
    """The entry of a loaded Model (its `family` attribute)."""
    name = getattr(model, "family", None)
    if name not in REGISTRY:
        raise ValueError(f"{type(model).__name__} is not a model of a registered family "
                         f"({'|'.join(FAMILIES)})")
    return REGISTRY[name]


def released_checkpoint(family: str, dataset: str = "digits") -> Path:
    """Where `make checkpoints` puts the released `family` model for `dataset`."""
    return Path(__file__).resolve().parents[2] / "checkpoints" / dataset / f"{family}.safetensors"
