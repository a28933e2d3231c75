"""Checkpoint format (DESIGN.md, "Checkpoint" contract).

    <name>.safetensors   EMA weights; header metadata "fastsample_card" holds the JSON card
    <name>.state.pt      training state for exact resume (torch.save): optimiser, step, RNG
                         states, raw weights; written by the trainer, optional for sampling

safetensors header layout (what the integrity checks below rely on): 8 bytes little-endian
u64 header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}, then the data buffer; the largest `end` equals the buffer length.

Every write is atomic: temp file in the target directory, fsync, os.replace, so a crash leaves
either the old file or the new one, never half of one. Every read problem raises CheckpointError,
a ValueError whose one-line message starts with the file name.

This module imports nothing of fastsample except __version__, so any part may use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fastsample import __version__

# 1: each family kept its Config in its own place (ddgan and lsgm inside net_config, cld as the
#    whole sde_config, ddpm inside sde_config); read and upgraded by the family (registry).
# 2: one schema for every family: `config` (the family's Config), `data_shape` (one sample in
#    data space), `net_config` ({module: its network's config}), `sde_config` ({kind, params}).
FORMAT_VERSION = 2
# The format knows a family only as a name; which names exist is the registry's business
# (fastsample.models.registry: load_model refuses an unregistered one, naming the file).
FAMILY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
CARD_KEY = "fastsample_card"
ORIG_DTYPES_KEY = "fastsample_orig_dtypes"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger length field means corruption


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line naming the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.problem}")


def git_commit() -> str:
    """HEAD of the repository holding this file (suffix "+dirty" if modified), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=5)
        dirty = status.returncode == 0 and status.stdout.strip() != ""
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except Exception:  # no git, not a repo, timeout: the card must still be writable
        return "unknown"


def training_state_path(checkpoint_path) -> Path:
    """<dir>/<name>.safetensors -> <dir>/<name>.state.pt"""
    p = Path(checkpoint_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + ".state.pt")


# ---------------------------------------------------------------------------------------------
# The card.

_REQUIRED = ("family", "dataset", "net_config", "sde_config", "train_steps", "seed",
             "wall_time_s", "package_version", "git_commit", "format_version")
_REQUIRED_V2 = ("config", "data_shape")


@dataclass(frozen=True)
class CheckpointCard:
    family: str                             # a registered family's name (FAMILY_NAME)
    dataset: str                            # e.g. "digits", "toy2d:gmm25"
    net_config: dict                        # {module name: its network's config dict} (v2)
    sde_config: dict                        # the forward process: {"kind": ..., parameters}
    train_steps: int                        # optimiser steps taken
    seed: int                               # training seed
    wall_time_s: float                      # training wall time, seconds
    package_version: str = __version__      # fastsample version that wrote the file
    git_commit: str = field(default_factory=git_commit)  # repo HEAD at write time, or "unknown"
    format_version: int = FORMAT_VERSION    # bumped on incompatible format changes
    stored_dtype: str = "float32"           # "float32" (as given) or the dtype floats were cast to
    extra: dict = field(default_factory=dict)  # free form: command line, final metrics, ...
    config: dict | None = None              # v2: the family's Config as a JSON dict
    data_shape: list | None = None          # v2: one sample's shape in data space

    def __post_init__(self):
        problems = _card_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError(f"invalid CheckpointCard: {problems}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointCard":
        """Parse and validate; a newer format_version is reported before anything else."""
        try:
            d = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            # ValueError: JSONDecodeError and ints beyond Python's digit limit; RecursionError:
            # nesting too deep for the decoder
            raise ValueError(f"card is not valid JSON ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"card is a JSON {type(d).__name__}, expected an object")
        fv = d.get("format_version")
        if isinstance(fv, int) and fv > FORMAT_VERSION:
            raise ValueError(f"written by a newer fastsample (card format_version {fv}, this "
                             f"fastsample {__version__} reads up to {FORMAT_VERSION}); upgrade fastsample")
        missing = [k for k in _REQUIRED if k not in d]
        if isinstance(fv, int) and fv >= 2:
            missing += [k for k in _REQUIRED_V2 if k not in d]
        if missing:
            raise ValueError(f"card lacks required fields {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"card has unknown fields {unknown}")
        return cls(**d)


def _card_problems(d: dict) -> str:
    """Empty string if the card's fields are valid, else a description of the first problem."""
    checks = [
        ("family", isinstance(d["family"], str) and FAMILY_NAME.fullmatch(d["family"]) is not None,
         "a family name (lowercase letters, digits, - and _)"),
        ("dataset", isinstance(d["dataset"], str) and d["dataset"] != "", "a non-empty string"),
        ("net_config", isinstance(d["net_config"], dict), "a dict"),
        ("sde_config", isinstance(d["sde_config"], dict), "a dict"),
        ("train_steps", _is_int(d["train_steps"]) and d["train_steps"] >= 0, "an int >= 0"),
        ("seed", _is_int(d["seed"]), "an int"),
        ("wall_time_s", _is_num(d["wall_time_s"]) and d["wall_time_s"] >= 0, "a number >= 0"),
        ("package_version", isinstance(d["package_version"], str), "a string"),
        ("git_commit", isinstance(d["git_commit"], str), "a string"),
        ("format_version", _is_int(d["format_version"]) and 1 <= d["format_version"] <= FORMAT_VERSION,
         f"an int in [1, {FORMAT_VERSION}]"),
        ("stored_dtype", isinstance(d["stored_dtype"], str)
         and (d["stored_dtype"] == "float32" or d["stored_dtype"] in STORE_DTYPES),
         f"float32|{'|'.join(STORE_DTYPES)}"),
        ("extra", isinstance(d["extra"], dict), "a dict"),
    ]
    if _is_int(d["format_version"]) and d["format_version"] >= 2:
        shape = d.get("data_shape")
        checks += [
            ("config", isinstance(d.get("config"), dict), "a dict (format 2)"),
            ("data_shape", isinstance(shape, list) and 1 <= len(shape) <= 4
             and all(_is_int(n) and 1 <= n <= 4096 for n in shape),
             "a list of 1-4 ints in [1, 4096] (format 2)"),
        ]
    for name, ok, allowed in checks:
        if not ok:
            return f"{name} = {d.get(name)!r}; must be {allowed}"
    try:
        json.dumps(d, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        return f"not JSON-serialisable ({e})"
    return ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# ---------------------------------------------------------------------------------------------
# Atomic write.

def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status), so
    other threads never see a temporary umask of 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """0o666 minus the umask: the mode open() gives a new file (mkstemp would give 0600)."""
    return 0o666 & ~current_umask()


def _atomic_write(path, write) -> None:
    """Call write(fileobj) on a temp file beside `path`, fsync, then os.replace onto `path`.

    On any failure the temp file is removed and the old `path` (if any) is untouched.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(path, f"cannot write: directory {str(parent)!r} does not exist "
                                    f"(or is not a directory)")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(path, f"cannot write into directory {str(parent)!r}: "
                                    f"{e.strerror or e} (read-only or no permission?)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(path, f"write failed: {e.strerror or e}") from None
        raise
    # Make the rename itself durable; not possible on every platform/filesystem, hence best effort.
    try:
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Weights + card.

def save_checkpoint(path, state_dict: dict, card: CheckpointCard, dtype=None) -> CheckpointCard:
    """Write state_dict (name -> tensor) and card to `path` (.safetensors), atomically.

    dtype None keeps every tensor's dtype; torch.float16 / torch.bfloat16 (or their names) stores
    floating tensors in that dtype to halve the file, records it in card.stored_dtype and the
    original dtypes in the header, and load_checkpoint casts back. Returns the card as written.
    """
    if not isinstance(card, CheckpointCard):
        raise TypeError(f"card must be a CheckpointCard, got {type(card).__name__}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"state_dict must be a non-empty dict of tensors, got {type(state_dict).__name__}"
                         f"{'' if not isinstance(state_dict, dict) else ' (empty)'}")
    store = None
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
        if name not in STORE_DTYPES:
            raise ValueError(f"dtype = {dtype!r}; choose None (keep) or {'|'.join(STORE_DTYPES)}")
        store = STORE_DTYPES[name]
    tensors: dict[str, torch.Tensor] = {}
    orig_dtypes: dict[str, str] = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise ValueError(f"state_dict key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state_dict[{k!r}] is a {type(v).__name__}, expected a torch.Tensor")
        # clone: safetensors refuses tensors that share storage (tied weights, views).
        v = v.detach().to("cpu").contiguous().clone()
        if v.is_floating_point():
            if not torch.isfinite(v).all():
                raise ValueError(f"state_dict[{k!r}] contains NaN or inf; refusing to save it")
            if store is not None and v.dtype != store:
                orig_dtypes[k] = str(v.dtype).replace("torch.", "")
                v = v.to(store)
                if not torch.isfinite(v).all():
                    raise ValueError(f"state_dict[{k!r}] overflows {store} (max |w| = "
                                     f"{float(state_dict[k].abs().max()):g}); save without dtype")
        tensors[k] = v
    card = dataclasses.replace(card, stored_dtype=str(store).replace("torch.", "") if store else "float32")
    metadata = {CARD_KEY: card.to_json(), "format": "pt"}
    if orig_dtypes:
        metadata[ORIG_DTYPES_KEY] = json.dumps(orig_dtypes, sort_keys=True)
    blob = _st_save(tensors, metadata=metadata)
    _atomic_write(path, lambda f: f.write(blob))
    return card


def _read_header(path: Path, blob: bytes) -> dict:
    """Parse and check the safetensors header, so truncation and corruption get precise names."""
    if len(blob) < 8:
        raise CheckpointError(path, f"not a safetensors file (only {len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n == 0 or n > _MAX_HEADER:
        raise CheckpointError(path, f"not a safetensors file (header length field {n} is implausible)")
    if 8 + n > len(blob):
        raise CheckpointError(path, f"truncated or not a safetensors file (header claims {n} bytes, "
                                    f"file has {len(blob) - 8} after the length field)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError, JSONDecodeError, ...
        raise CheckpointError(path, f"corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    ends = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            ends.append(int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors header (entry {name!r} has no data_offsets)") from None
    data_len = len(blob) - 8 - n
    expected = max(ends, default=0)
    if data_len < expected:
        raise CheckpointError(path, f"truncated: tensor data needs {expected} bytes, file has {data_len}")
    if data_len > expected:
        raise CheckpointError(path, f"corrupt: {data_len - expected} unexpected bytes after the tensor data")
    return header


def read_card(path) -> CheckpointCard:
    """The card alone, without loading tensors (for listing checkpoints)."""
    path = Path(path)
    return _card_from_header(path, _read_header(path, _read_bytes(path)))


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if not path.is_file():
        raise CheckpointError(path, "not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None


def _card_from_header(path: Path, header: dict) -> CheckpointCard:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or CARD_KEY not in meta:
        raise CheckpointError(path, "safetensors file without a fastsample card (metadata key "
                                    f"{CARD_KEY!r} missing); not written by fastsample.save_checkpoint")
    try:
        return CheckpointCard.from_json(meta[CARD_KEY])
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(path, f"invalid card: {e}") from None


def load_checkpoint(path, expect_family: str | None = None, map_location="cpu"):
    """-> (state_dict, card). Raises CheckpointError for a missing, truncated, corrupt or foreign
    file, a missing or invalid card, a card from a newer format, or a family other than
    expect_family. Tensors stored in fp16/bf16 by save_checkpoint come back in their original dtype.
    """
    path = Path(path)
    if expect_family is not None and (not isinstance(expect_family, str)
                                      or FAMILY_NAME.fullmatch(expect_family) is None):
        raise ValueError(f"expect_family = {expect_family!r}; a family name or None")
    blob = _read_bytes(path)
    header = _read_header(path, blob)
    card = _card_from_header(path, header)
    if expect_family is not None and card.family != expect_family:
        raise CheckpointError(path, f"is a {card.family!r} checkpoint, expected family {expect_family!r}")
    try:
        tensors = _st_load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError types
        raise CheckpointError(path, f"corrupt tensor data ({type(e).__name__}: {e})") from None
    orig = header["__metadata__"].get(ORIG_DTYPES_KEY)
    if orig is not None:
        try:
            orig = json.loads(orig)
            tensors = {k: v.to(getattr(torch, orig[k])) if k in orig else v for k, v in tensors.items()}
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise CheckpointError(path, f"corrupt {ORIG_DTYPES_KEY} metadata ({e})") from None
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(path, f"tensor {k!r} holds {bad} NaN/inf value(s) of "
                                        f"{v.numel()}; refusing to load non-finite weights")
    if str(map_location) != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, card


def build_model(path, build, state_dict: dict, card: CheckpointCard):
    """build(state_dict, card) -> nn.Module (a family's Model.from_checkpoint), with every way
    the weights can disagree with the net the card describes turned into one CheckpointError
    naming the file: missing / unexpected / wrong-shape tensors (load_state_dict's
    RuntimeError), a state or card of another family (KeyError, TypeError, ValueError), and a
    non-float tensor loaded into a float parameter (load_state_dict would cast it silently)."""
    try:
        model = build(state_dict, card)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if len(text) > 300:
            text = text[:300] + " ..."
        raise CheckpointError(path, f"does not fit the {card.family} net its card describes "
                                    f"({type(e).__name__}: {text})") from None
    expected = model.state_dict()
    for k, v in state_dict.items():
        if v.is_floating_point():
            continue
        targets = [m for m in expected if m == k or m.endswith("." + k)]
        if targets and all(expected[m].is_floating_point() for m in targets):
            raise CheckpointError(path, f"tensor {k!r} is {str(v.dtype).replace('torch.', '')}, "
                                        f"where the {card.family} net expects a float tensor")
    return model


# ---------------------------------------------------------------------------------------------
# Training state for resume.

def save_training_state(path, state: dict) -> None:
    """torch.save(state) to `path` (conventionally training_state_path(ckpt)), atomically."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    _atomic_write(path, lambda f: f.write(blob))


def load_training_state(path, trusted: bool = False, map_location="cpu") -> dict:
    """Load a training state. By default with torch.load(weights_only=True): tensors, dicts,
    lists, numbers, strings (store numpy RNG state as tensors). trusted=True allows arbitrary
    pickles, which can execute code: only for files you wrote yourself.
    """
    path = Path(path)
    _read_bytes(path)  # existence / readability checks with the common messages
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "; if you wrote it yourself and it holds non-tensor objects, pass trusted=True" \
            if "weights_only" in str(e) or "Unsupported global" in str(e) else ""
        raise CheckpointError(path, f"truncated or corrupt training state ({type(e).__name__}: {msg}){hint}") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"training state is a {type(state).__name__}, expected a dict")
    return state
