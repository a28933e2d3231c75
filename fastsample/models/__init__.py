"""One module per family (ddgan, cld, lsgm, ddpm): nets + sde + loss, and how a checkpoint
becomes a ready model; the registry (registry.py) declares each family once. Every family module
exposes the same names, so the CLI, export and the benches loop over families without special
cases:

    Config                    frozen dataclass of the family's hyper-parameters
    default_config(data)      the preset for a Dataset (digits vs 2D toy), as a Config
    Family(data, config)      the training-loop protocol (fastsample.train.loop.Family)
    Model                     nn.Module ready for sampling; Model.from_checkpoint(state_dict, card)
    SAMPLERS                  sampler names this family accepts (DESIGN.md contract)
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from fastsample.models.registry import FAMILIES, REGISTRY, Entry, family_of, get  # noqa: F401


def family_module(name: str) -> ModuleType:
    return get(name).module


def make_config(name: str, data, overrides: dict | None = None):
    """The family's default Config for `data`, with `overrides` (field -> value) applied."""
    mod = family_module(name)
    cfg = mod.default_config(data)
    overrides = overrides or {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - set(fields))
    if bad:
        raise ValueError(f"unknown {name} config field(s) {bad}; known: {sorted(fields)}")
    typed = {}
    for k, v in overrides.items():
        cur = getattr(cfg, k)
        if isinstance(v, str) and not isinstance(cur, str):
            v = _parse_value(v, type(cur), k)
        typed[k] = v
    return dataclasses.replace(cfg, **typed)


def _parse_value(text: str, kind: type, key: str):
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in (int, float):
            return kind(text)
        if kind is tuple:
            return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--set {key}={text!r}: expected a {kind.__name__}") from None
    return text


def load_model(path, device="cpu", expect_family: str | None = None):
    """Read a released checkpoint and return (Model, card) ready for sampling."""
    from fastsample import checkpoint as ck
    sd, card = ck.load_checkpoint(path, expect_family=expect_family)
    try:
        entry = get(card.family)
    except ValueError as e:
        raise ck.CheckpointError(path, str(e)) from None
    try:
        card = entry.upgrade_card(card)
    except ValueError as e:
        raise ck.CheckpointError(path, str(e)) from None
    model = ck.build_model(path, entry.module.Model.from_checkpoint, sd, card).to(device).eval()
    return model, card
