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


def test_export_is_wired_to_its_parser(capsys):
    assert main(["export", "/no/such.safetensors", "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsample export: error:") and "such.safetensors" in err


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


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TOY_DDGAN = ROOT / "checkpoints" / "grid25" / "ddgan.safetensors"


@pytest.mark.skipif(not TOY_DDGAN.exists(), reason="released grid25 DDGAN checkpoint missing")
def test_sample_writes_the_npz_contract_and_a_scatter(tmp_path):
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    assert main(["sample", str(TOY_DDGAN), "--sampler", "posterior", "--num", "40",
                 "--batch", "16", "--seed", "3", "--out", str(out), "--png", str(png)]) == 0
    with np.load(out) as z:
        assert z["samples"].shape == (40, 2) and z["samples"].dtype == np.float32
        assert int(z["nfe"]) == 4 and float(z["seconds"]) > 0
        first = z["samples"].copy()
    assert png.stat().st_size > 0
    # same seed, same batch: same samples (the progress bar changes nothing)
    assert main(["sample", str(TOY_DDGAN), "--sampler", "posterior", "--num", "40",
                 "--batch", "16", "--seed", "3", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert np.array_equal(z["samples"], first)


@pytest.mark.skipif(not TOY_DDGAN.exists(), reason="released grid25 DDGAN checkpoint missing")
@pytest.mark.parametrize("extra, msg", [
    (["--sampler", "sscs"], "unknown sampler 'sscs' for family ddgan"),
    (["--sampler", "posterior", "--steps", "2"], "trained with T=4"),
    (["--sampler", "posterior", "--grid-cols", "4"], "--grid-cols applies to image samples"),
    (["--sampler", "posterior", "--steps", "0"], "--steps must be >= 1"),
])
def test_sample_bad_input_for_a_toy_ddgan(tmp_path, capsys, extra, msg):
    out = tmp_path / "s.npz"
    assert main(["sample", str(TOY_DDGAN), "--num", "8", "--out", str(out), *extra]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not TOY_DDGAN.exists(), reason="released grid25 DDGAN checkpoint missing")
def test_sample_engine_matches_plain_path_and_splits_batches(tmp_path):
    plain, eng = tmp_path / "p.npz", tmp_path / "e.npz"
    args = ["sample", str(TOY_DDGAN), "--sampler", "posterior", "--seed", "3"]
    assert main([*args, "--num", "16", "--out", str(plain)]) == 0
    assert main([*args, "--num", "16", "--engine", "--out", str(eng)]) == 0
    with np.load(plain) as p, np.load(eng) as e:
        assert np.array_equal(p["samples"], e["samples"]) and int(e["nfe"]) == 4
    # 3 requests of 16 (the last one cut to 8): batch j > 0 gets its own seed.
    assert main([*args, "--num", "40", "--batch", "16", "--engine", "--out", str(eng)]) == 0
    with np.load(eng) as e, np.load(plain) as p:
        s = e["samples"]
        assert s.shape == (40, 2) and np.array_equal(s[:16], p["samples"])
        assert not np.array_equal(s[16:32], s[:16]) and np.isfinite(s).all()


@pytest.mark.parametrize("extra, msg", [
    (["--dtype", "bf16"], "--dtype applies to --engine"),
    (["--engine", "--steps", "3"], "trained with T="),
])
def test_sample_engine_bad_input(tmp_path, capsys, extra, msg):
    out = tmp_path / "s.npz"
    assert main(["sample", "checkpoints/digits/ddgan.safetensors", "--sampler", "posterior",
                 "--num", "4", "--out", str(out), *extra]) == 2
    assert msg in capsys.readouterr().err and not out.exists()


def test_sample_engine_runs_ddpm_and_refuses_adaptive(tmp_path, capsys):
    """Every fixed plan runs on the Engine (ddpm ddim included, the same samples as the plain
    path); an adaptive sampler has no plan and is refused before any work."""
    import numpy as np
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for out, extra in ((a, ["--engine"]), (b, [])):
        assert main(["sample", "checkpoints/digits/ddpm.safetensors", "--sampler", "ddim",
                     "--steps", "5", "--num", "4", "--out", str(out), *extra]) == 0
    assert np.array_equal(np.load(a)["samples"], np.load(b)["samples"])
    out = tmp_path / "s.npz"
    assert main(["sample", "checkpoints/digits/ddpm.safetensors", "--sampler", "ode", "--num",
                 "4", "--engine", "--out", str(out)]) == 2
    assert "'ode' is not available for ddpm" in capsys.readouterr().err and not out.exists()


def test_sample_without_sampler_uses_the_family_default(tmp_path, capsys):
    """No --sampler: the registry's default fast sampler and budget (cld: SSCS-50 quadratic),
    the same samples as naming them."""
    import numpy as np
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", "checkpoints/grid25/cld.safetensors", "--num", "8",
                 "--out", str(a)]) == 0
    assert main(["sample", "checkpoints/grid25/cld.safetensors", "--sampler", "sscs", "--steps",
                 "50", "--schedule", "quadratic", "--num", "8", "--out", str(b)]) == 0
    za, zb = np.load(a), np.load(b)
    assert str(za["sampler"]) == "sscs" and int(za["nfe"]) == 50
    assert np.array_equal(za["samples"], zb["samples"])


def test_score_time_selects_the_sscs_midpoint_rule(tmp_path, capsys):
    """--score-time: latent-cld's SSCS defaults to the midpoint (the same samples as naming it),
    start gives other samples, on the plain path and the Engine alike; a sampler without the
    option refuses it before any work."""
    import numpy as np
    ck = "checkpoints/digits/latent-cld.safetensors"
    runs = {}
    for name, extra in (("default", []), ("mid", ["--score-time", "midpoint"]),
                        ("start", ["--score-time", "start"]),
                        ("start_engine", ["--score-time", "start", "--engine"])):
        runs[name] = tmp_path / f"{name}.npz"
        assert main(["sample", ck, "--sampler", "sscs", "--steps", "6", "--num", "4",
                     "--out", str(runs[name]), *extra]) == 0
    got = {k: np.load(v)["samples"] for k, v in runs.items()}
    assert np.array_equal(got["default"], got["mid"])
    assert not np.array_equal(got["default"], got["start"])
    assert np.array_equal(got["start"], got["start_engine"])
    out = tmp_path / "em.npz"
    assert main(["sample", ck, "--sampler", "em", "--steps", "6", "--num", "4",
                 "--score-time", "start", "--out", str(out)]) == 2
    assert "midpoint" in capsys.readouterr().err and not out.exists()


def test_demo_table(tmp_path, capsys):
    # 10 samples per family: the table and grids are what is checked, not the metrics' values.
    assert main(["demo", "--num", "10", "--out", str(tmp_path), "--no-latency"]) == 0
    out = capsys.readouterr().out
    fast = {"ddgan": "posterior", "cld": "sscs", "lsgm": "ode", "ddpm": "ddim"}
    for fam, sampler in fast.items():
        assert f"\n{fam} " in out and (tmp_path / f"{fam}-{sampler}.png").exists()
    assert "latency" not in out
