"""Data sets: `load_dataset(spec)` for digits, 2D toys, .npz arrays and image folders.

Spec forms (one string, so a checkpoint card or a CLI flag can name the data):

    digits          scikit-learn's bundled 8x8 digits (no download), (N,1,8,8) in [0,1]
    toy2d:NAME      a 2D toy distribution from fastsample.data.toy2d, (N,2) points
    npz:PATH        an image array stored in an .npz file
    folder:PATH     a directory of PNG/JPEG files

toy2d is imported lazily so the image loaders work without it.
"""

from __future__ import annotations

import torch

from fastsample.data.images import (
    DIGITS_LEVELS,
    DIGITS_TEST_FRACTION,
    Dataset,
    dequantize_digits,
    load_digits,
    load_folder,
    load_npz,
    quantize_digits,
)

SPEC_FORMS = ("digits", "toy2d:NAME", "npz:PATH", "folder:PATH")
SPLITS = ("train", "test", "all")

# Number of exact samples drawn for a toy "data set"; the toys are sampled exactly, so any size works.
TOY2D_TRAIN_SIZE = 65536
TOY2D_TEST_SIZE = 8192

__all__ = [
    "DIGITS_LEVELS", "DIGITS_TEST_FRACTION", "Dataset", "SPEC_FORMS", "TOY2D_TEST_SIZE",
    "TOY2D_TRAIN_SIZE", "dequantize_digits", "load_dataset", "load_toy2d", "parse_spec",
    "quantize_digits",
]


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a data spec into (source, argument): "toy2d:grid25" -> ("toy2d", "grid25")."""
    if not isinstance(spec, str):
        raise ValueError(f"data spec must be a string, got {type(spec).__name__} {spec!r}; "
                         f"allowed forms: {', '.join(SPEC_FORMS)}")
    if spec == "digits":
        return "digits", ""
    source, sep, arg = spec.partition(":")
    if sep and source in ("toy2d", "npz", "folder") and arg:
        return source, arg
    raise ValueError(f"unknown data spec {spec!r}; allowed forms: {', '.join(SPEC_FORMS)}")


def _toy_generator(seed: int, split: str) -> torch.Generator:
    # Train and test get disjoint streams (2*seed, 2*seed+1) so no seed reuses another's points.
    return torch.Generator().manual_seed(2 * seed + (1 if split == "test" else 0))


def load_toy2d(name: str, split: str = "train", seed: int = 0) -> Dataset:
    """Exact samples of a 2D toy: TOY2D_TRAIN_SIZE points for train/all, TOY2D_TEST_SIZE for test."""
    from fastsample.data import toy2d  # lazy: toy2d is written in parallel and may be absent

    toy = toy2d.get_toy(name)
    n = TOY2D_TEST_SIZE if split == "test" else TOY2D_TRAIN_SIZE
    x = toy.sample(n, _toy_generator(seed, split))
    if tuple(x.shape) != (n, 2):
        raise RuntimeError(f"toy2d {name!r} returned shape {tuple(x.shape)}, expected ({n}, 2)")
    return Dataset(name=f"toy2d:{name}", kind="points", x=x.float(), labels=None, split=split)


def load_dataset(spec: str, split: str = "train", seed: int = 0, resolution: int | None = None,
                 dequantize: bool = False, channels: int = 1) -> Dataset:
    """Load the data set named by `spec` (see the module docstring for the forms).

    split: "train" | "test" | "all". digits: a fixed stratified 80/20 split chosen by `seed`.
        toy2d: fresh exact samples, a different stream per split. npz/folder: files carry no
        held-out part, so "train" and "all" return every image and "test" is an error.
    seed: digits split seed / toy2d sampling seed / dequantisation noise seed.
    resolution: folder only, the square side images are resized to (None: keep the common size).
    dequantize: digits only; add uniform noise once with `seed` (see `dequantize_digits`).
        Trainers that want fresh noise every step call `dequantize_digits` per batch instead.
    channels: folder only, 1 (grayscale) or 3 (RGB).
    """
    source, arg = parse_spec(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if dequantize and source != "digits":
        raise ValueError(f"dequantize=True applies only to 'digits' (known quantisation levels), "
                         f"got spec {spec!r}")
    if resolution is not None and source != "folder":
        raise ValueError(f"resolution applies only to 'folder:PATH' specs, got spec {spec!r}")
    if source == "digits":
        ds = load_digits(split=split, seed=seed)
        if dequantize:
            x = dequantize_digits(ds.x, torch.Generator().manual_seed(seed))
            ds = Dataset(name=ds.name, kind=ds.kind, x=x, labels=ds.labels, split=ds.split,
                         dequantized=True)
        return ds
    if source == "toy2d":
        return load_toy2d(arg, split=split, seed=seed)
    if split == "test":
        raise ValueError(f"split='test' is not available for {spec!r}: an npz file or image folder "
                         f"has no held-out part; use split='train' or 'all'")
    if source == "npz":
        return load_npz(arg, split=split)
    return load_folder(arg, resolution=resolution, channels=channels, split=split)
