"""Issue 18, checkpoints: non-finite or non-float weights, tensors that do not fit the net the
card describes, and cards of the wrong family are one CheckpointError line naming the file (exit
code 2 from `fastsample sample` / `export`), never a traceback or a silently wrong model."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastsample import checkpoint as ck
from fastsample.checkpoint import CheckpointError
from fastsample.models import load_model

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "checkpoints" / "grid25"
DIGITS = ROOT / "checkpoints" / "digits"


def raw_save(path, tensors: dict, card: ck.CheckpointCard) -> Path:
    """Write a checkpoint without save_checkpoint's own checks (it refuses NaN, as it should)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={ck.CARD_KEY: card.to_json(), "format": "pt"})
    return Path(path)


def _released(family, where=GRID):
    return ck.load_checkpoint(where / f"{family}.safetensors")


def _one_line(e) -> str:
    msg = str(e.value) if hasattr(e, "value") else str(e)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    """Before: loaded, and sampling gave all-NaN samples with exit 0."""
    sd, card = _released("ddgan")
    k = sorted(sd)[3]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = bad
    p = raw_save(tmp_path / "nan.safetensors", sd, card)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(p)
    msg = _one_line(e)
    assert msg.startswith(str(p)) and repr(k) in msg and "NaN/inf" in msg


def test_non_finite_weights_exit_2_from_sample(tmp_path, capsys):
    from fastsample.cli import main
    sd, card = _released("ddgan")
    k = sorted(sd)[0]
    sd[k] = torch.full_like(sd[k], float("nan"))
    p = raw_save(tmp_path / "nan.safetensors", sd, card)
    out = tmp_path / "s.npz"
    assert main(["sample", str(p), "--sampler", "posterior", "--num", "4", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastsample sample: error: {p}:")
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensor_in_place_of_a_float_one_is_refused(tmp_path, dtype):
    """Before: load_state_dict cast it silently into the float parameter."""
    sd, card = _released("ddgan")
    k = sorted(sd)[1]
    sd[k] = sd[k].round().to(dtype)
    p = raw_save(tmp_path / "int.safetensors", sd, card)
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    msg = _one_line(e)
    assert msg.startswith(str(p)) and repr(k) in msg and "expects a float tensor" in msg


def _mutate(sd, how):
    keys = sorted(sd)
    if how == "missing":
        del sd[keys[0]]
    elif how == "extra":
        sd["surplus.weight"] = torch.zeros(3)
    elif how == "shape":
        sd[keys[0]] = torch.zeros(*[d + 1 for d in sd[keys[0]].shape])
    return sd


@pytest.mark.parametrize("family,where", [("ddgan", GRID), ("cld", GRID), ("ddpm", GRID),
                                          ("lsgm", DIGITS)])
@pytest.mark.parametrize("how", ["missing", "extra", "shape"])
def test_tensors_that_do_not_fit_the_net_are_one_line(tmp_path, family, where, how):
    """Before: load_state_dict's multi-line RuntimeError (a traceback from the CLI), or a
    ValueError without the file name."""
    sd, card = _released(family, where)
    p = raw_save(tmp_path / f"{family}.safetensors", _mutate(sd, how), card)
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    msg = _one_line(e)
    assert msg.startswith(str(p)) and f"does not fit the {family} net" in msg


def test_state_from_another_family(tmp_path):
    """A ddgan's weights under a ddpm card (KeyError / RuntimeError inside the family)."""
    sd, _ = _released("ddgan")
    _, ddpm_card = _released("ddpm")
    p = raw_save(tmp_path / "mixed.safetensors", sd, ddpm_card)
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    assert _one_line(e).startswith(str(p))


@pytest.mark.parametrize("family", ["cld", "ddpm", "lsgm"])
def test_card_naming_the_wrong_family_names_the_file(tmp_path, family):
    """A ddgan checkpoint whose card says another family: the family's card parser fails; the
    error must name the file (before: a bare parser error)."""
    sd, card = _released("ddgan")
    p = raw_save(tmp_path / "wrong.safetensors", sd, dataclasses.replace(card, family=family))
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    msg = _one_line(e)
    assert msg.startswith(str(p)) and family in msg


@pytest.mark.parametrize("cmd", ["sample", "export"])
def test_cli_reports_a_misfit_checkpoint_in_one_line(tmp_path, capsys, cmd):
    from fastsample.cli import main
    sd, card = _released("cld")
    p = raw_save(tmp_path / "cld.safetensors", _mutate(sd, "missing"), card)
    if cmd == "sample":
        argv = ["sample", str(p), "--sampler", "em", "--steps", "2", "--num", "2", "--out",
                str(tmp_path / "s.npz")]
    else:
        argv = ["export", str(p), "--format", "onnx", "--out", str(tmp_path / "art")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{p}: does not fit the cld net" in err[0]


def test_released_checkpoints_still_load():
    for p in sorted(ROOT.glob("checkpoints/*/*.safetensors")):
        model, card = load_model(p)
        assert card.family in p.name


def test_card_json_beside_release_matches():
    """The released .json cards stay readable by the card parser (fuzzed in test_fuzz.py)."""
    for p in sorted(ROOT.glob("checkpoints/*/*.json")):
        card = ck.CheckpointCard.from_json(p.read_text())
        assert json.loads(card.to_json())["family"] == card.family
