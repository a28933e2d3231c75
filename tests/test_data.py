"""fastsample.data: digits split/dequantisation, npz and folder loaders, spec routing."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fastsample.data as fdata
from fastsample.data import (DIGITS_LEVELS, Dataset, dequantize_digits, load_dataset, parse_spec,
                             quantize_digits)
from fastsample.data.images import digits_split_indices


# ---------------------------------------------------------------------------------------------
# digits

def test_digits_shapes_ranges_levels():
    train, test, full = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1437, 360, 1797)
    for ds in (train, test, full):
        assert ds.kind == "image" and ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32
        assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    # Pixels are k/16 for integers k: exactly DIGITS_LEVELS distinct values over the whole set.
    k = full.x * (DIGITS_LEVELS - 1)
    assert torch.equal(k, k.round())
    assert len(torch.unique(full.x)) == DIGITS_LEVELS


def test_digits_split_is_fixed_disjoint_and_stratified():
    tr0, te0 = digits_split_indices(0)
    tr0b, te0b = digits_split_indices(0)
    tr1, te1 = digits_split_indices(1)
    assert np.array_equal(tr0, tr0b) and np.array_equal(te0, te0b)
    assert not np.array_equal(te0, te1)
    for tr, te in ((tr0, te0), (tr1, te1)):
        assert len(np.intersect1d(tr, te)) == 0
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    # Same images reach the Dataset: test split rows are the corresponding rows of "all".
    full, test = load_dataset("digits", split="all"), load_dataset("digits", split="test")
    assert torch.equal(full.x[te0], test.x) and torch.equal(full.labels[te0], test.labels)
    # Stratified: each class has ~20% of its images in the test split.
    counts_all = torch.bincount(full.labels, minlength=10)
    counts_test = torch.bincount(test.labels, minlength=10)
    assert ((counts_test - 0.2 * counts_all).abs() <= 1).all()


def test_dequantisation_stays_in_unit_interval_and_inverts():
    x = load_dataset("digits", split="all").x
    y = dequantize_digits(x, torch.Generator().manual_seed(0))
    assert float(y.min()) >= 0.0 and float(y.max()) < 1.0
    assert torch.equal(quantize_digits(y), x)
    # Bin k is [k/17, (k+1)/17) filled uniformly: mean offset u has mean 1/2 (Monte Carlo, n ~ 1e5).
    u = y * DIGITS_LEVELS - x * (DIGITS_LEVELS - 1)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12) ** 0.5 / u.numel() ** 0.5
    a = load_dataset("digits", dequantize=True, seed=3)
    b = load_dataset("digits", dequantize=True, seed=3)
    assert a.dequantized and torch.equal(a.x, b.x)
    assert torch.equal(quantize_digits(a.x), load_dataset("digits", seed=3).x)


# ---------------------------------------------------------------------------------------------
# npz

def _save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_layouts_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)  # NHWC
    ds = load_dataset(_save(tmp_path / "a.npz", images=u8, other=np.zeros(3)))
    assert ds.x.shape == (5, 3, 6, 6)
    assert torch.allclose(ds.x, torch.from_numpy(u8.transpose(0, 3, 1, 2) / 255.0).float())
    f = rng.random((4, 1, 5, 5))  # NCHW float, single array under another key
    ds = load_dataset(_save(tmp_path / "b.npz", arr=f))
    assert ds.x.shape == (4, 1, 5, 5) and torch.allclose(ds.x, torch.from_numpy(f).float())
    g = rng.random((3, 7, 7)).astype(np.float32)  # NHW
    ds = load_dataset(_save(tmp_path / "c.npz", images=g))
    assert ds.x.shape == (3, 1, 7, 7) and ds.kind == "image" and ds.labels is None


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.full((2, 1, 4, 4), np.nan)}, "NaN"),
    ({"images": np.zeros((2, 5, 4, 4))}, "shape"),
    ({"images": np.zeros((2, 4))}, "shape"),
    ({"images": np.full((2, 1, 4, 4), 2.0)}, r"\[0,1\]"),
    ({"images": np.zeros((2, 1, 4, 4), dtype=np.int32)}, "dtype"),
    ({"images": np.zeros((0, 1, 4, 4))}, "no images"),
    ({"a": np.zeros((2, 1, 4, 4)), "b": np.zeros((2, 1, 4, 4))}, "'images'"),
])
def test_npz_bad_arrays(tmp_path, arrays, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(_save(tmp_path / "bad.npz", **arrays))


def test_npz_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_dataset(f"npz:{bad}")
    with pytest.raises(ValueError, match="held-out"):
        load_dataset(_save(tmp_path / "ok.npz", images=np.zeros((2, 4, 4))), split="test")


# ---------------------------------------------------------------------------------------------
# folder

def _write_gray(path, arr):
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def test_folder_grayscale_rgb_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(3, 8, 8))
    for i, a in enumerate(imgs):
        _write_gray(tmp_path / f"{i}.png", a)
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x.shape == (3, 1, 8, 8)
    assert torch.allclose(ds.x, torch.from_numpy(imgs[:, None] / 255.0).float())  # PNG is lossless
    rgb = load_dataset(f"folder:{tmp_path}", channels=3)
    assert rgb.x.shape == (3, 3, 8, 8)
    assert torch.allclose(rgb.x[:, 0], rgb.x[:, 1]) and torch.allclose(rgb.x[:, 1], rgb.x[:, 2])
    # Resizing a constant image keeps the constant; a non-square one is centre-cropped first.
    const = tmp_path / "const"
    const.mkdir()
    _write_gray(const / "a.png", np.full((8, 8), 100))
    wide = np.zeros((8, 16))
    wide[:, 4:12] = 200  # the centre 8x8 crop is all 200
    _write_gray(const / "b.png", wide)
    Image.fromarray(np.full((10, 10, 3), 50, dtype=np.uint8)).save(const / "c.jpg", quality=100)
    ds = load_dataset(f"folder:{const}", resolution=4)
    assert ds.x.shape == (3, 1, 4, 4)
    assert torch.allclose(ds.x[0], torch.tensor(100 / 255))
    assert torch.allclose(ds.x[1], torch.tensor(200 / 255))
    assert torch.allclose(ds.x[2], torch.tensor(50 / 255), atol=2 / 255)  # JPEG rounding


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_dataset(f"folder:{empty}")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_gray(bad / "good.png", np.zeros((8, 8)))
    full = (bad / "good.png").read_bytes()
    (bad / "broken.png").write_bytes(full[: len(full) // 2])  # truncated PNG
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(f"folder:{bad}", resolution=8)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_gray(mixed / "a.png", np.zeros((8, 8)))
    _write_gray(mixed / "b.png", np.zeros((6, 6)))
    with pytest.raises(ValueError, match="resolution"):
        load_dataset(f"folder:{mixed}")
    assert load_dataset(f"folder:{mixed}", resolution=6).x.shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="channels"):
        load_dataset(f"folder:{mixed}", resolution=6, channels=2)
    with pytest.raises(ValueError, match="resolution"):
        load_dataset(f"folder:{mixed}", resolution=0)


# ---------------------------------------------------------------------------------------------
# spec routing

@pytest.mark.parametrize("spec", ["mnist", "digits:", "npz:", "toy2d", "folder", "", "Digits"])
def test_unknown_spec_lists_allowed_forms(spec):
    with pytest.raises(ValueError, match="toy2d:NAME"):
        load_dataset(spec)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="seed"):
        load_dataset("digits", seed=-1)
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("digits", resolution=32)
    with pytest.raises(ValueError, match="spec"):
        parse_spec(3)
    with pytest.raises(ValueError, match="kind"):
        Dataset(name="x", kind="video", x=torch.zeros(2, 2), labels=None, split="all")


def test_toy2d_routing_with_fake_module(monkeypatch):
    calls = []

    class FakeToy:
        def sample(self, n, generator):
            calls.append(n)
            return torch.randn(n, 2, generator=generator)

    fake = types.ModuleType("fastsample.data.toy2d")
    fake.get_toy = lambda name: FakeToy() if name == "ring" else (_ for _ in ()).throw(
        ValueError(f"unknown toy {name!r}"))
    monkeypatch.setitem(sys.modules, "fastsample.data.toy2d", fake)
    monkeypatch.setattr(fdata, "toy2d", fake, raising=False)
    tr = load_dataset("toy2d:ring", seed=5)
    te = load_dataset("toy2d:ring", split="test", seed=5)
    assert tr.kind == "points" and tr.shape == (2,) and tr.name == "toy2d:ring"
    assert calls == [fdata.TOY2D_TRAIN_SIZE, fdata.TOY2D_TEST_SIZE]
    assert torch.equal(tr.x, load_dataset("toy2d:ring", seed=5).x)
    assert not torch.equal(tr.x[: len(te)], te.x)  # train and test draw from different streams
    with pytest.raises(ValueError, match="unknown toy"):
        load_dataset("toy2d:nope")
