"""Image data: scikit-learn's 8x8 digits, .npz image arrays, and folders of PNG/JPEG files.

Every loader returns a `Dataset` whose images are float32 (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# Digits pixels are integers 0..16 divided by 16, so there are 17 grey levels.
DIGITS_LEVELS = 17
DIGITS_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set: images (N,C,H,W) or points (N,D) in `x`, optional integer labels (N,)."""

    name: str                               # the spec it came from, e.g. "digits", "npz:/a/b.npz"
    kind: Literal["image", "points"]        # "image": x is (N,C,H,W) in [0,1]; "points": (N,D)
    x: torch.Tensor                         # float32 data
    labels: torch.Tensor | None             # int64 (N,) class labels, None when the source has none
    split: str                              # "train" | "test" | "all"
    dequantized: bool = False               # uniform dequantisation noise already added

    def __post_init__(self):
        if self.kind not in ("image", "points"):
            raise ValueError(f"Dataset.kind must be 'image' or 'points', got {self.kind!r}")
        want_dim = 4 if self.kind == "image" else 2
        if self.x.dim() != want_dim:
            raise ValueError(f"Dataset.x for kind {self.kind!r} must have {want_dim} dims, "
                             f"got shape {tuple(self.x.shape)}")
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            raise ValueError(f"Dataset.labels must have shape ({self.x.shape[0]},), "
                             f"got {tuple(self.labels.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item: (C,H,W) for images, (D,) for points."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


# ---------------------------------------------------------------------------------------------
# Digits: scikit-learn's bundled copy of the UCI optical digits test set (1797 images, no download).

def digits_split_indices(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices into load_digits(): stratified 80/20, a pure function of seed."""
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    y = _sk_load_digits().target
    train, test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION,
                                   stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def load_digits(split: str = "train", seed: int = 0) -> Dataset:
    """Digits as (N,1,8,8) float32 pixel/16 in [0,1] (exact multiples of 1/16) with int64 labels."""
    from sklearn.datasets import load_digits as _sk_load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32) / (DIGITS_LEVELS - 1)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        train, test = digits_split_indices(seed)
        idx = train if split == "train" else test
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(images[:, None]))  # (N, 1, 8, 8)
    return Dataset(name="digits", kind="image", x=x, labels=torch.from_numpy(labels), split=split)


def dequantize_digits(x: torch.Tensor, generator: torch.Generator | None = None,
                      u: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform dequantisation of digits: y = (16 x + u) / 17, u ~ U[0,1) (drawn here unless given).

    A pixel at level k = 16 x fills its own bin [k/17, (k+1)/17), so y stays in [0, 1) and the
    17 bins tile [0,1) without overlap; `quantize_digits` is the exact inverse of the binning.
    """
    if u is None:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return ((DIGITS_LEVELS - 1) * x + u) / DIGITS_LEVELS


def quantize_digits(y: torch.Tensor) -> torch.Tensor:
    """Map dequantised values in [0,1] back to the digits levels k/16: k = clamp(floor(17 y), 0, 16)."""
    k = torch.floor(y * DIGITS_LEVELS).clamp(0, DIGITS_LEVELS - 1)
    return k / (DIGITS_LEVELS - 1)


# ---------------------------------------------------------------------------------------------
# .npz image arrays.

def _to_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    """Accept (N,H,W), (N,C,H,W) or (N,H,W,C) with C in {1,3}; channels-first wins when ambiguous."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3):
            return arr
        if arr.shape[-1] in (1, 3):
            return np.moveaxis(arr, -1, 1)
    raise ValueError(f"{where}: image array has shape {arr.shape}; allowed: (N,H,W), (N,C,H,W) or "
                     f"(N,H,W,C) with C = 1 or 3")


def _to_unit_float(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 is read as 0..255 and divided by 255; floats must already lie in [0,1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{where}: image array holds {bad} NaN/inf values; only finite "
                             f"values in [0,1] are allowed")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float images must lie in [0,1], got range [{lo:.4g}, "
                             f"{hi:.4g}] (store uint8 0..255 or rescale floats to [0,1])")
        return arr.astype(np.float32)
    raise ValueError(f"{where}: image dtype {arr.dtype} is not supported; allowed: uint8 (0..255) "
                     f"or float16/32/64 in [0,1]")


def load_npz(path: str | Path, split: str = "all") -> Dataset:
    """Images from an .npz: the array under key 'images', else the file's only array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            arr = f[key] if key is not None else None
    except Exception as e:  # BadZipFile, OSError, ValueError (pickle refusal): all mean a bad file
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if key is None:
        raise ValueError(f"{path}: no 'images' key and not exactly one array (keys: {keys}); "
                         f"store the images under 'images'")
    where = f"{path}[{key!r}]"
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{where}: holds no images (shape {arr.shape})")
    x = _to_unit_float(_to_nchw(arr, where), where)
    return Dataset(name=f"npz:{path}", kind="image", x=torch.from_numpy(np.ascontiguousarray(x)),
                   labels=None, split=split)


# ---------------------------------------------------------------------------------------------
# Folders of PNG/JPEG files.

def _load_image(file: Path, mode: str, resolution: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()  # decode now so a truncated file fails here, naming the file
            im = im.convert(mode)
            if resolution is not None:
                # Centre-crop to a square first so the digit/face is not squashed by resizing.
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                if s != resolution:
                    im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image file {str(file)!r} is corrupt or not a PNG/JPEG ({e})") from e
    return arr if arr.ndim == 3 else arr[:, :, None]  # (H, W, C)


def load_folder(path: str | Path, resolution: int | None = None, channels: int = 1,
                split: str = "all") -> Dataset:
    """All *.png/*.jpg/*.jpeg files of a folder (sorted by name, not recursive) as (N,C,R,R) in [0,1].

    resolution: centre-crop to a square and resize (bicubic) to resolution x resolution; None keeps
        the files' own size, which must then be square and the same for all files.
    channels: 1 converts to grayscale (Pillow "L"), 3 to RGB.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {str(path)!r} does not exist or is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool)
                                   or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(path)!r} holds no files ending in "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    mode = "L" if channels == 1 else "RGB"
    arrays = [_load_image(f, mode, resolution) for f in files]
    sizes = {a.shape[:2] for a in arrays}
    if resolution is None:
        first = arrays[0].shape[:2]
        if len(sizes) != 1 or first[0] != first[1]:
            raise ValueError(f"images in {str(path)!r} have sizes {sorted(sizes)}; with "
                             f"resolution=None they must all be the same square size, so pass "
                             f"resolution (e.g. 32 or 64)")
    x = np.stack(arrays).astype(np.float32) / 255.0  # (N, R, R, C)
    x = np.ascontiguousarray(np.moveaxis(x, -1, 1))  # (N, C, R, R)
    return Dataset(name=f"folder:{path}", kind="image", x=torch.from_numpy(x), labels=None,
                   split=split)
