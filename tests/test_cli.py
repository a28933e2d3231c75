"""CLI: help, one-line errors with exit code 2, eval on real data, sample-file I/O."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastsample.cli import main
from fastsample.data import load_dataset
from fastsample.io import atomic_save_npz, load_samples_npz, save_png


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "fastsample", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("train", "sample", "eval", "export", "demo"):
        assert cmd in out


def test_pending_commands_say_so(capsys):
    assert main(["export", "x"]) == 2
    assert "not available yet" in capsys.readouterr().err


def test_eval_of_the_test_split_reads_the_calibrated_floor(tmp_path, capsys):
    x = load_dataset("digits", split="test").x.numpy()
    f = tmp_path / "s.npz"
    atomic_save_npz(f, samples=x, nfe=np.int64(0), seconds=np.float64(1.0))
    assert main(["eval", str(f), "--data", "digits"]) == 0
    m = json.loads((tmp_path / "s.metrics.json").read_text())
    # The same number docs/metrics_calibration.md reports for the floor (360 test images).
    assert m["fd"] == pytest.approx(14.98, abs=0.01)
    assert m["classes_hit"] == 10
    assert m["seconds_per_sample"] == pytest.approx(1.0 / len(x))


@pytest.mark.parametrize("argv, msg", [
    (["eval", "/no/such.npz", "--data", "digits"], "no such file"),
    (["sample", "/no/such.safetensors", "--sampler", "sscs", "--out", "x.npz"], "such"),
    (["sample", "c.safetensors", "--sampler", "sscs", "--out", "x.npz", "--num", "0"], "--num"),
    (["sample", "c.safetensors", "--sampler", "sscs", "--out", "x.txt"], ".npz"),
    (["train", "--model", "cld", "--data", "nope", "--out", "o"], "unknown data spec"),
])
def test_bad_input_is_one_line_and_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


def test_corrupt_and_nonfinite_sample_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_samples_npz(bad)
    nan = tmp_path / "nan.npz"
    atomic_save_npz(nan, samples=np.full((3, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_samples_npz(nan)
    assert not list(tmp_path.glob("*.tmp.npz"))


def test_png_grid_and_scatter(tmp_path):
    from PIL import Image
    imgs = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    save_png(tmp_path / "g.png", imgs, cols=5)
    im = Image.open(tmp_path / "g.png")
    # 5 columns x 2 rows of 8x8 cells with 1-pixel gutters: 46 x 19, scaled by 256 // 46
    assert im.size == (46 * (256 // 46), 19 * (256 // 46))
    save_png(tmp_path / "s.png", np.random.default_rng(0).normal(size=(100, 2)))
    assert Image.open(tmp_path / "s.png").size[0] > 0
    with pytest.raises(ValueError, match="cannot draw"):
        save_png(tmp_path / "x.png", np.zeros((3, 5)))
