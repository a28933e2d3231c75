"""Sample files (.npz) and PNG previews: atomic writes and validated reads."""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


# A samples array whose .npy header claims more than this many elements is refused before numpy
# allocates it (2^31 float32 = 8 GiB; `fastsample sample --num` stays far below).
MAX_SAMPLE_ELEMENTS = 1 << 31


def atomic_save_npz(path, **arrays) -> None:
    """np.savez to a temp file beside `path`, then rename: a crash never leaves half a file.
    The file gets the mode an ordinary open() would (0o666 minus the umask), not mkstemp's
    0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_file_mode())
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path, flag: str, suffix: str) -> Path:
    """Refuse, before any work, an output path that cannot be written: wrong suffix, an existing
    directory, a parent that is missing, not a directory, or not writable."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{flag} must name a {suffix} file, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a {suffix} file in it")
    parent = path.parent if str(path.parent) else Path(".")
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is not a directory")
            break
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {parent} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the existing file is read-only")
    return path


def load_samples_npz(path) -> tuple[torch.Tensor, dict]:
    """Read a `fastsample sample` file: (samples float32 tensor, {nfe, seconds, ...})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise ValueError(f"{path}: a bare .npy array, not a `fastsample sample` .npz "
                             f"(samples + nfe + seconds)")
        with loaded as z:
            if "samples" not in z.files:
                raise ValueError(f"{path}: no `samples` array (keys: {', '.join(z.files)})")
            _check_npy_header(path, "samples")
            samples = np.asarray(z["samples"], dtype=np.float32)
            meta = {k: z[k].item() for k in z.files if k != "samples" and z[k].ndim == 0}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not np.isfinite(samples).all():
        raise ValueError(f"{path}: samples contain NaN or inf")
    return torch.from_numpy(samples), meta


def _check_npy_header(path: Path, name: str) -> None:
    """Read `name`.npy's header inside the npz and refuse a shape the member cannot hold (or
    beyond MAX_SAMPLE_ELEMENTS) before numpy allocates the array for it."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(name + ".npy")
        except KeyError:
            return              # not an .npy member: np.load's own checks apply
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: `{name}` has .npy format version {version}")
            start = f.tell()
    count = math.prod(shape)
    if count > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"{path}: `{name}` claims shape {shape}, more than the "
                         f"{MAX_SAMPLE_ELEMENTS} elements a samples file may hold")
    if count * dtype.itemsize > info.file_size - start:
        raise ValueError(f"{path}: `{name}` claims shape {shape} ({count * dtype.itemsize} "
                         f"bytes) but holds {info.file_size - start} bytes")


def default_file_mode() -> int:
    """0o666 minus this process's umask: the mode open() would give a new file."""
    from fastsample.checkpoint import default_file_mode as mode
    return mode()


def save_png(path, samples: np.ndarray, cols: int | None = None) -> None:
    """Image samples (K,C,H,W) in [0,1] -> a grid; 2D samples (K,2) -> a scatter plot. `path`
    may also be a binary file object (a server answers with the bytes)."""
    if not hasattr(path, "write"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2 and samples.shape[1] == 2:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        return
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"cannot draw samples of shape {samples.shape}; expected (K,C,H,W) "
                         f"with C in (1,3) or (K,2)")
    from PIL import Image
    k, c, h, w = samples.shape
    cols = cols or max(1, math.ceil(math.sqrt(k)))
    if cols < 1:
        raise ValueError(f"grid columns must be >= 1, got {cols}")
    rows = math.ceil(k / cols)
    pad = 1
    grid = np.ones((c, rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i in range(k):
        r, q = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + q * (w + pad):pad + q * (w + pad) + w] = samples[i]
    img = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    scale = max(1, 256 // max(grid.shape[1:]))    # 8x8 digits: blow up so they can be seen
    arr = img[0] if c == 1 else img.transpose(1, 2, 0)
    im = Image.fromarray(arr)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path, format="PNG")
