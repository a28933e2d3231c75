"""Checkpoint format: round trips, every documented error, atomicity, unwritable targets."""

import json
import os
import struct
import tempfile

import pytest
import torch

from fastsample import __version__
from fastsample import checkpoint as ck
from fastsample.checkpoint import (CheckpointCard, CheckpointError, load_checkpoint, load_training_state,
                                   save_checkpoint, save_training_state, training_state_path)


def _card(**kw):
    base = dict(family="cld", dataset="digits", net_config={"base_ch": 32, "ch_mult": [1, 2]},
                sde_config={"beta": 4.0, "Gamma": 0.04}, train_steps=1234, seed=7, wall_time_s=12.5,
                git_commit="abc123", extra={"argv": ["train", "--steps", "1234"], "fd": 1.5},
                config={"lr": 1e-3}, data_shape=[1, 8, 8])
    base.update(kw)
    return CheckpointCard(**base)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, 3, generator=g),
            "conv.bias": torch.randn(8, generator=g) * 1e-3,
            "fourier.W": torch.randn(16, generator=g) * 16,
            "step": torch.tensor(5, dtype=torch.int64)}


def _save(tmp_path, name="m.safetensors", **kw):
    p = tmp_path / name
    save_checkpoint(p, _weights(), _card(**kw))
    return p


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- round trips ------------------------------------------------------------------------------

def test_fp32_round_trip_is_bit_exact(tmp_path):
    p = _save(tmp_path)
    sd, card = load_checkpoint(p, expect_family="cld")
    w = _weights()
    assert set(sd) == set(w)
    for k in w:
        assert sd[k].dtype == w[k].dtype and sd[k].shape == w[k].shape
        assert torch.equal(sd[k], w[k]), k
    assert card == _card()


def test_fp16_storage_is_close_smaller_and_recorded(tmp_path):
    w = _weights()
    p16 = tmp_path / "h.safetensors"
    written = save_checkpoint(p16, w, _card(), dtype=torch.float16)
    assert written.stored_dtype == "float16"
    sd, card = load_checkpoint(p16)
    assert card.stored_dtype == "float16"
    for k in w:
        assert sd[k].dtype == w[k].dtype  # cast back to the dtype that was saved
        if w[k].is_floating_point():
            # fp16 has an 11-bit significand: relative rounding error <= 2^-11 for normal numbers.
            torch.testing.assert_close(sd[k], w[k], rtol=2 ** -11, atol=6e-8)
        else:
            assert torch.equal(sd[k], w[k])
    # The data section holds floats at 2 bytes each, other tensors unchanged.
    blob = p16.read_bytes()
    data_bytes = len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
    assert data_bytes == sum(v.numel() * (2 if v.is_floating_point() else v.element_size())
                             for v in w.values())


def test_card_json_round_trip_and_defaults():
    c = _card()
    assert CheckpointCard.from_json(c.to_json()) == c
    assert c.package_version == __version__ and c.format_version == ck.FORMAT_VERSION
    assert json.loads(c.to_json())["net_config"]["ch_mult"] == [1, 2]


def test_card_validation_names_the_field():
    with pytest.raises(ValueError, match="family"):
        _card(family="GAN model")
    with pytest.raises(ValueError, match="train_steps"):
        _card(train_steps=-1)
    with pytest.raises(ValueError, match="wall_time_s"):
        _card(wall_time_s=float("nan"))
    with pytest.raises(ValueError, match="config"):
        _card(config=None)
    for shape in ([], [0, 8], [1, 8, 8, 8, 8], [2.0], "1 8 8"):
        with pytest.raises(ValueError, match="data_shape"):
            _card(data_shape=shape)
    # Format 1 cards have neither (their family upgrades them on load).
    assert _card(format_version=1, config=None, data_shape=None).config is None
    with pytest.raises(ValueError, match="required fields.*seed"):
        d = json.loads(_card().to_json())
        del d["seed"]
        CheckpointCard.from_json(json.dumps(d))


def test_training_state_round_trip_and_path(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    sp = training_state_path(ckpt)
    assert sp.name == "run.state.pt" and sp.parent == tmp_path
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 17, "model": net.state_dict(), "optimizer": opt.state_dict(),
             "torch_rng": torch.get_rng_state(), "note": "x"}
    save_training_state(sp, state)
    back = load_training_state(sp)
    assert back["step"] == 17 and back["note"] == "x"
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_git_commit_never_fails(monkeypatch):
    c = ck.git_commit()
    assert isinstance(c, str) and c
    def boom(*a, **k):
        raise FileNotFoundError("git")
    monkeypatch.setattr(ck.subprocess, "run", boom)
    assert ck.git_commit() == "unknown"


# ---- read errors ------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as e:
        load_checkpoint(p)
    assert str(p) in _one_line(e)


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated_file(tmp_path, cut):
    p = _save(tmp_path)
    blob = p.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    keep = 8 + n // 2 if cut == "header" else len(blob) - cut
    p.write_bytes(blob[:keep])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(p)
    assert str(p) in _one_line(e)


def test_corrupt_header(tmp_path):
    p = _save(tmp_path)
    blob = bytearray(p.read_bytes())
    blob[8] = ord("#")  # the header's opening brace
    p.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        load_checkpoint(p)
    assert str(p) in _one_line(e)


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "text.safetensors"
    p.write_text("hello, I am a README and not a checkpoint at all\n" * 3)
    with pytest.raises(CheckpointError, match="not a safetensors file") as e:
        load_checkpoint(p)
    _one_line(e)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tiny)


def test_safetensors_without_card(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(CheckpointError, match="without a fastsample card") as e:
        load_checkpoint(p)
    _one_line(e)


def _rewrite_card(src, dst, mutate):
    """Write a copy of checkpoint `src` whose card dict went through mutate(d), bypassing validation."""
    from safetensors.torch import save as st_save
    sd, _ = load_checkpoint(src)
    d = json.loads(_card().to_json())
    mutate(d)
    dst.write_bytes(st_save(sd, metadata={ck.CARD_KEY: json.dumps(d)}))
    return dst


def test_newer_format_version(tmp_path):
    p = _rewrite_card(_save(tmp_path), tmp_path / "new.safetensors",
                      lambda d: d.update(format_version=999, some_future_field=1))
    with pytest.raises(CheckpointError, match="written by a newer fastsample") as e:
        load_checkpoint(p)
    assert "999" in _one_line(e) and str(p) in str(e.value)


def test_invalid_card(tmp_path):
    p = _rewrite_card(_save(tmp_path), tmp_path / "bad.safetensors", lambda d: d.pop("family"))
    with pytest.raises(CheckpointError, match="invalid card.*family") as e:
        load_checkpoint(p)
    _one_line(e)
    q = _rewrite_card(_save(tmp_path), tmp_path / "bad2.safetensors", lambda d: d.update(seed="seven"))
    with pytest.raises(CheckpointError, match="seed"):
        load_checkpoint(q)


def test_wrong_family(tmp_path):
    p = _save(tmp_path, family="ddgan")
    with pytest.raises(CheckpointError, match="'ddgan' checkpoint, expected family 'cld'") as e:
        load_checkpoint(p, expect_family="cld")
    assert str(p) in _one_line(e)
    with pytest.raises(ValueError, match="expect_family"):
        load_checkpoint(p, expect_family="no family!")


def test_corrupt_training_state(tmp_path):
    p = tmp_path / "run.state.pt"
    save_training_state(p, {"step": 3, "w": torch.randn(1000)})
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_training_state(p)
    _one_line(e)
    with pytest.raises(CheckpointError, match="no such file"):
        load_training_state(tmp_path / "missing.state.pt")


# ---- bad inputs to save -----------------------------------------------------------------------

def test_save_rejects_bad_inputs(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"state_dict\['w'\] contains NaN"):
        save_checkpoint(p, {"w": torch.tensor([1.0, float("nan")])}, _card())
    with pytest.raises(ValueError, match=r"state_dict\['w'\] is a list"):
        save_checkpoint(p, {"w": [1.0]}, _card())
    with pytest.raises(ValueError, match="dtype"):
        save_checkpoint(p, _weights(), _card(), dtype=torch.int8)
    with pytest.raises(ValueError, match="overflows"):
        save_checkpoint(p, {"w": torch.tensor([1e6])}, _card(), dtype=torch.float16)
    with pytest.raises(TypeError, match="CheckpointCard"):
        save_checkpoint(p, _weights(), {"family": "cld"})
    assert not p.exists() and os.listdir(tmp_path) == []


# ---- atomicity and unwritable targets ---------------------------------------------------------

def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    p = _save(tmp_path)
    before = p.read_bytes()

    def crash(fd):
        raise OSError(28, "No space left on device")  # as if the disk filled during fsync
    monkeypatch.setattr(ck.os, "fsync", crash)
    new = {k: v + 1 if v.is_floating_point() else v for k, v in _weights().items()}
    with pytest.raises(CheckpointError, match="write failed: No space left") as e:
        save_checkpoint(p, new, _card(train_steps=9999))
    _one_line(e)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert load_checkpoint(p)[1].train_steps == 1234


def test_interrupt_mid_write_leaves_no_temp(tmp_path, monkeypatch):
    # A non-OSError (KeyboardInterrupt) must also clean up, and propagate unchanged.
    p = tmp_path / "s.state.pt"
    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(p, {"step": 1})
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_via_permission_error(tmp_path, monkeypatch):
    # Tests run as root here, where chmod does not stop writes; so simulate what the OS does for a
    # read-only directory: the temp-file creation fails with EACCES. What this checks is our
    # handling (clear one-line error, nothing left behind), not the OS's permission logic.
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ck.tempfile, "mkstemp", denied)
    p = tmp_path / "ro.safetensors"
    with pytest.raises(CheckpointError, match="cannot write into directory.*Permission denied") as e:
        save_checkpoint(p, _weights(), _card())
    _one_line(e)
    assert os.listdir(tmp_path) == []


def test_real_chmod_read_only_directory_when_not_root(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        with pytest.raises(CheckpointError, match="cannot write into directory"):
            save_checkpoint(ro / "m.safetensors", _weights(), _card())
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_target_under_a_file_or_missing_dir(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="does not exist") as e:
        save_checkpoint(f / "m.safetensors", _weights(), _card())
    _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_training_state(tmp_path / "no" / "dir" / "s.state.pt", {"step": 1})
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_temp_file_is_in_target_directory(tmp_path, monkeypatch):
    # os.replace is only atomic within one filesystem: the temp file must sit beside the target.
    seen = {}
    real = tempfile.mkstemp
    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen["dir"] = os.path.dirname(name)
        return fd, name
    monkeypatch.setattr(ck.tempfile, "mkstemp", spy)
    save_checkpoint(tmp_path / "m.safetensors", _weights(), _card())
    assert seen["dir"] == str(tmp_path)


def test_unregistered_family_is_refused_by_load_model(tmp_path):
    """The format accepts any family name; load_model refuses one the registry does not know,
    naming the file."""
    from fastsample.models import load_model
    p = _save(tmp_path, family="gan")
    assert load_checkpoint(p)[1].family == "gan"
    with pytest.raises(CheckpointError, match=r"unknown model family 'gan'.*ddgan") as e:
        load_model(p)
    assert str(p) in str(e.value)

