"""`fastsample sample` / `eval` on bad input: every argument checked before any work, one line,
exit 2; a run whose samples are not finite fails in every family (issue 18)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastsample import samplers
from fastsample.cli import main
from fastsample.models import get, load_model
from fastsample.models.registry import released_checkpoint

CKPT = "checkpoints/grid25/cld.safetensors"


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert match in err, err


@pytest.fixture
def no_load(monkeypatch):
    """Argument errors must come before the checkpoint is read."""
    import fastsample.models as m

    def boom(*a, **k):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")
    monkeypatch.setattr(m, "load_model", boom)


@pytest.mark.parametrize("args,match", [
    (["--num", "1000000000"], "--num 1000000000 is above the limit 1000000"),
    (["--num", "0"], "--num must be >= 1, got 0"),
    (["--steps", "1000000000"], "--steps 1000000000 is above the limit 100000"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--seed", str(1 << 63)], "--seed 9223372036854775808 is above the limit 9223372036854775807"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--device", "foo"], "--device 'foo': not a device"),
])
def test_bad_numbers_and_devices_fail_before_any_work(tmp_path, capsys, no_load, args, match):
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "s.npz"), *args], match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, no_load):
    _fails(capsys, ["sample", CKPT, "--device", "cuda", "--out", str(tmp_path / "s.npz")],
           "CUDA is not available")


def test_output_paths_checked_before_sampling(tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.npz").mkdir()
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "file" / "s.npz")], "is not a directory")
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "dir.npz")], "is a directory")
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "nope" / "s.npz")], "does not exist")
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "s.txt")], "--out must name a .npz")
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "s.npz"), "--png", str(tmp_path)],
           "--png must name a .png")
    _fails(capsys, ["sample", CKPT, "--out", str(tmp_path / "s.npz"), "--png",
                    str(tmp_path / "nope" / "g.png")], "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz", "file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, ["sample", CKPT, "--out", str(ro / "s.npz")], "permission denied")
    finally:
        ro.chmod(0o700)


def test_eval_on_a_bare_npy(tmp_path, capsys):
    p = tmp_path / "s.npy"
    np.save(p, np.zeros((4, 2), np.float32))
    _fails(capsys, ["eval", str(p), "--data", "toy2d:grid25"], "a bare .npy array")


@pytest.mark.parametrize("family", ["ddgan", "cld", "lsgm", "ddpm"])
def test_non_finite_samples_fail_in_every_family(family, monkeypatch):
    """A network that returns NaN (a broken or diverged checkpoint) gives a SamplingError (a
    ValueError: exit 2 from the CLI), for the fixed plans and the adaptive solvers alike."""
    entry = get(family)
    model, _ = load_model(released_checkpoint(family, "digits"))
    for name in ("denoise", "alpha", "eps"):
        if hasattr(model, name):
            fn = getattr(model, name)
            monkeypatch.setattr(model, name,
                                lambda *a, _fn=fn: torch.full_like(_fn(*a), float("nan")))
    for sampler, spec in entry.sampling.samplers.items():
        if spec.needs is not None:
            try:
                spec.needs()
            except samplers.MissingExtra:
                continue    # an optional dependency's sampler: tested where it is installed
        opts = {"rtol": 1e-1, "atol": 1e-1} if "rtol" in spec.options else {}
        steps = None if spec.steps is None else 4
        with pytest.raises(samplers.SamplingError, match="non-finite"):
            samplers.sample(entry.sampling, model, sampler, steps, 2, 0, **opts)


def test_non_finite_samples_exit_2_from_the_cli(tmp_path, capsys, monkeypatch):
    import fastsample.models as m
    real = m.load_model

    def broken(*a, **k):
        model, card = real(*a, **k)
        eps = model.eps
        model.eps = lambda *x: torch.full_like(eps(*x), float("inf"))
        return model, card
    monkeypatch.setattr(m, "load_model", broken)
    out = tmp_path / "s.npz"
    _fails(capsys, ["sample", "checkpoints/grid25/ddpm.safetensors", "--sampler", "ddim",
                    "--steps", "3", "--num", "4", "--out", str(out)], "non-finite")
    assert not out.exists()



@pytest.mark.parametrize("device,match", [("foo", "not a device"), ("cuda", "CUDA is not")])
def test_train_device_is_checked_first(tmp_path, capsys, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _fails(capsys, ["train", "--model", "ddpm", "--data", "toy2d:grid25", "--out",
                    str(tmp_path / "run"), "--steps", "2", "--device", device], match)
    assert not (tmp_path / "run").exists()
