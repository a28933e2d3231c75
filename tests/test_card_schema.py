"""Checkpoint card schema: format 2 is one schema for every family (config, data_shape,
net_config {module: net}, sde_config {kind, ...}); the released files are format 1, whose four
family-specific layouts are upgraded on load (one test per old layout), and a format-2 card
written from an upgraded one rebuilds the same model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastsample import checkpoint as ck
from fastsample.models import get, load_model
from fastsample.models.registry import released_checkpoint

# Where each family's format-1 card kept its Config, and what the data shape came from.
V1_LAYOUT = {
    "ddgan": (lambda c: c.net_config["config"], lambda c: c.net_config["data_shape"]),
    "cld": (lambda c: c.sde_config, lambda c: c.sde_config["data_shape"]),
    "lsgm": (lambda c: c.net_config["config"],
             lambda c: [c.net_config["vae"][k] for k in ("in_ch", "resolution", "resolution")]),
    "ddpm": (lambda c: c.sde_config["config"], lambda c: c.net_config["shape"]),
}


def _ddgan_format1_file(card_name: str, folder) -> tuple["Path", ck.CheckpointCard]:
    """A format-1 DDGAN file from a card kept in tests/data: the card over fresh weights of its
    upgraded config's generator (the weights are not what these tests read). -> (path, card)."""
    from pathlib import Path

    from fastsample.models import ddgan
    text = (Path(__file__).parent / "data" / card_name).read_text()
    old = ck.CheckpointCard.from_json(text)
    upgraded = ddgan.upgrade_card(dataclasses.asdict(old))
    cfg = ddgan.Config(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in upgraded["config"].items()})
    net = ddgan.build_generator(ddgan.generator_config(cfg, tuple(upgraded["data_shape"])))
    folder.mkdir(exist_ok=True)
    path = folder / "ddgan.safetensors"
    ck.save_checkpoint(path, net.state_dict(), old)
    return path, old


def _format1_file(family: str, tmp_path) -> "Path":
    """A format-1 file of `family`: the released one, or for ddgan (re-released as format 2 on
    2026-12-07) its last format-1 card (tests/data) over fresh weights."""
    if family != "ddgan":
        return released_checkpoint(family)
    return _ddgan_format1_file("ddgan-digits-format1-card.json", tmp_path / "format1")[0]


@pytest.mark.parametrize("family", sorted(V1_LAYOUT))
def test_format1_card_is_upgraded(family, tmp_path):
    path = _format1_file(family, tmp_path)
    old = ck.read_card(path)
    assert old.format_version == 1 and old.config is None, "the released file is format 1"
    config_of, shape_of = V1_LAYOUT[family]
    model, card = load_model(path)
    assert card.format_version == 2
    filled = getattr(get(family).module, "FORMAT1_FIELD_DEFAULTS", {})
    assert card.config == {**filled, **config_of(old)}
    assert card.data_shape == list(shape_of(old))
    assert set(card.net_config) == {"ddgan": {"generator"}, "cld": {"net"}, "ddpm": {"net"},
                                    "lsgm": {"vae", "prior"}}[family]
    assert "config" not in card.sde_config
    # The module built from the upgraded card holds exactly the file's weights.
    sd, _ = ck.load_checkpoint(path)
    own = model.state_dict()
    for k, t in sd.items():
        key = k if k in own else next(o for o in own if o.endswith("." + k))
        assert torch.equal(own[key], t.to(own[key].dtype))


@pytest.mark.parametrize("family", sorted(V1_LAYOUT))
def test_format2_card_round_trip(tmp_path, family):
    """An upgraded card saved as format 2 loads back to the same samples."""
    path = _format1_file(family, tmp_path)
    sd, old = ck.load_checkpoint(path)
    entry = get(family)
    new = ck.CheckpointCard(**{**dataclasses.asdict(entry.upgrade_card(old)),
                               "format_version": ck.FORMAT_VERSION})
    out = tmp_path / f"{family}.safetensors"
    ck.save_checkpoint(out, sd, new)
    assert ck.read_card(out).format_version == 2
    a, _ = load_model(path)
    b, _ = load_model(out)
    sampler, opts = entry.default
    x, _ = entry.sampling and __import__(f"fastsample.samplers.{family}",
                                         fromlist=["sample"]).sample(a, sampler, None, 4, 0, **opts)
    y, _ = __import__(f"fastsample.samplers.{family}", fromlist=["sample"]).sample(
        b, sampler, None, 4, 0, **opts)
    assert torch.equal(x, y)


def test_format1_card_missing_its_config_names_the_file(tmp_path):
    path = released_checkpoint("cld")
    sd, card = ck.load_checkpoint(path)
    bad = dataclasses.replace(card, sde_config={"kind": "cld"})
    out = tmp_path / "bad.safetensors"
    ck.save_checkpoint(out, sd, bad)
    with pytest.raises(ck.CheckpointError, match="bad.safetensors.*format 1"):
        load_model(out)


def test_format2_card_needs_config_and_shape():
    with pytest.raises(ValueError, match="lacks required fields.*config"):
        ck.CheckpointCard.from_json(
            '{"family": "cld", "dataset": "digits", "net_config": {}, "sde_config": {}, '
            '"train_steps": 1, "seed": 0, "wall_time_s": 0, "package_version": "0", '
            '"git_commit": "x", "format_version": 2}')


def test_format1_fields_added_later_get_their_values_of_the_time(tmp_path):
    """The first grid25 DDGAN card (tests/data: released until 2026-12-07, format 1) predates
    Config.grad_clip: it trained with the loop's clip of 1.0 (today's default is 0.0, the digits
    recipe's), and its upgraded card says so. Its weights are not needed: fresh ones of the
    upgraded config's generator stand in."""
    path, old = _ddgan_format1_file("ddgan-grid25-format1-card.json", tmp_path)
    assert old.format_version == 1 and "grad_clip" not in old.net_config["config"]
    model, card = load_model(path)
    assert card.format_version == 2 and card.config["grad_clip"] == 1.0
    # Fields added since take Config's defaults, which are the behaviour of the time.
    assert card.config["t_power"] == 1.0 and model.generator.inputs is None
    _, card = load_model(released_checkpoint("ddgan", "digits"))
    assert card.config["grad_clip"] == 0.0      # written explicitly in that card
