"""Reading an artifact directory's manifest.json and verifying the files it lists.

An artifact directory is executable code: `model.pt2` holds a shared library that
AOTInductor loads and runs, `model.onnx` a graph ONNX Runtime executes. Trust one as you would
a binary. What this module guarantees is narrower: every file the manifest lists is present and
has the sha256 the exporter recorded, so a swapped, truncated or tampered file is refused before
anything loads it (one line, ExportError; exit code 2 from the CLI). It does not authenticate
the manifest itself: whoever can rewrite the directory can rewrite manifest.json too.

    read_manifest(dir)    -> the parsed, structurally checked manifest (sizes bounded)
    verify_artifact(dir)  -> read_manifest + every listed file present with its sha256
    listed_files(man)     -> the relative paths the manifest lists

Bounds (a manifest beyond them is refused, not allocated for): the file itself at most
MAX_MANIFEST_BYTES, at most MAX_FILES listed files, batch sizes up to MAX_BATCH, tensor
dimensions up to MAX_DIM and MAX_ELEMENTS per sample, at most MAX_STEPS schedule rows.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath

from fastsample.export.core import FORMATS, MANIFEST_VERSION, ExportError, sha256
from fastsample.models.registry import REGISTRY

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILES = 1000
MAX_BATCH = 1 << 20
MAX_DIM = 1 << 20
MAX_ELEMENTS = 1 << 28            # per sample (non-batch dims multiplied)
MAX_STEPS = 100_000               # schedule rows / sampler steps
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(where, problem: str) -> ExportError:
    return ExportError(" ".join(f"{where}: {problem}".split()))


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _check_path(rel) -> str | None:
    """Why `rel` is not a safe relative path inside the artifact, or None."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return f"file name {rel!r} is not a relative path"
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return f"file name {rel!r} is not a plain relative path inside the artifact"
    if rel == MANIFEST:
        return f"lists {MANIFEST} itself"
    return None


def _check_tensors(where, key, value) -> None:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise _bad(where, f"{key!r} must be a non-empty list of tensors")
    for t in value:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _bad(where, f"{key!r} holds an entry without a name")
        shape = t.get("shape")
        if not isinstance(shape, list) or len(shape) > 8:
            raise _bad(where, f"{key} {t['name']!r}: shape must be a list of at most 8 dims")
        n = 1
        for d in shape:
            if d == "batch":
                continue
            if not _is_int(d) or not 1 <= d <= MAX_DIM:
                raise _bad(where, f"{key} {t['name']!r}: dimension {d!r} is not an int in "
                                  f"1..{MAX_DIM}")
            n *= d
        if n > MAX_ELEMENTS:
            raise _bad(where, f"{key} {t['name']!r}: {n} elements per sample exceed the limit "
                              f"{MAX_ELEMENTS}")


def parse_manifest(text, where="manifest.json") -> dict:
    """Parse and structurally check a manifest's text (bytes or str); ExportError if it is not
    a fastsample manifest this version reads, or any size in it is beyond the bounds above."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_MANIFEST_BYTES:
            raise _bad(where, f"{len(text)} bytes, more than the {MAX_MANIFEST_BYTES} a "
                              f"manifest may have")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(where, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) > MAX_MANIFEST_BYTES:
        raise _bad(where, f"more than {MAX_MANIFEST_BYTES} bytes")
    try:
        man = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _bad(where, f"not valid JSON ({msg[:200]})") from None
    if not isinstance(man, dict):
        raise _bad(where, f"a JSON {type(man).__name__}, not a fastsample manifest")
    ver = man.get("manifest_version")
    if not _is_int(ver):
        raise _bad(where, "no integer manifest_version: not a fastsample manifest")
    if ver > MANIFEST_VERSION:
        raise _bad(where, f"manifest_version {ver} was written by a newer fastsample (this one "
                          f"reads {MANIFEST_VERSION}); upgrade fastsample")
    if ver != MANIFEST_VERSION:
        raise _bad(where, f"manifest_version {ver} is not {MANIFEST_VERSION}")
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad(where, "'files' must be a non-empty object of name -> sha256")
    if len(files) > MAX_FILES:
        raise _bad(where, f"lists {len(files)} files, more than the limit {MAX_FILES}")
    for rel, digest in files.items():
        why = _check_path(rel)
        if why:
            raise _bad(where, why)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _bad(where, f"the sha256 of {rel!r} is not 64 lowercase hex digits")
    if man.get("format") not in FORMATS:
        raise _bad(where, f"format {man.get('format')!r} is not one of {'|'.join(FORMATS)}")
    fam = man.get("family")
    if fam not in REGISTRY or man.get("what") not in REGISTRY[fam].exports:
        raise _bad(where, f"family/what {fam!r}/{man.get('what')!r} is not an exportable pair")
    batch = man.get("batch")
    if not isinstance(batch, dict) or not all(_is_int(batch.get(k)) for k in ("min", "max")) \
            or not 1 <= batch["min"] <= batch["max"] <= MAX_BATCH:
        raise _bad(where, f"batch {batch!r} must have ints 1 <= min <= max <= {MAX_BATCH}")
    steps = man.get("steps")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise _bad(where, f"steps {steps!r} is not an int in 1..{MAX_STEPS}")
    _check_tensors(where, "inputs", man.get("inputs"))
    _check_tensors(where, "outputs", man.get("outputs"))
    sched = man.get("schedule")
    if sched is not None:
        rows = sched.get("rows") if isinstance(sched, dict) else None
        if not isinstance(rows, list) or len(rows) > MAX_STEPS:
            raise _bad(where, f"schedule rows must be a list of at most {MAX_STEPS}")
        for r in rows:
            if not isinstance(r, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in r):
                raise _bad(where, "a schedule row is not a list of finite numbers")
    return man


def read_manifest(artifact) -> dict:
    """DIR/manifest.json, parsed and checked (parse_manifest); names the file in every error."""
    d = Path(artifact)
    path = d / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _bad(d, f"no {MANIFEST}: not a fastsample artifact directory") from None
    except OSError as e:
        raise _bad(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise _bad(path, f"{st.st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest "
                         f"may have")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise _bad(path, f"cannot read: {e.strerror or e}") from None
    return parse_manifest(blob, str(path))


def listed_files(man: dict) -> list[str]:
    return sorted(man["files"])


def artifact_file(artifact, man: dict, name: str) -> Path:
    """The one listed file called `name` (e.g. model.onnx, possibly under a Triton model dir)."""
    hits = [f for f in man["files"] if PurePosixPath(f).name == name]
    if len(hits) != 1:
        raise _bad(artifact, f"{MANIFEST} lists {len(hits)} files named {name}, expected one")
    return Path(artifact) / hits[0]


def verify_artifact(artifact) -> dict:
    """-> the manifest, after checking that every file it lists is a regular file inside the
    directory (no symlink out of it) with the recorded sha256. ExportError (one line) naming
    the first missing or mismatching file otherwise."""
    d = Path(artifact)
    if not d.is_dir():
        raise _bad(d, "not a directory (an artifact directory was expected)")
    man = read_manifest(d)
    root = d.resolve()
    for rel, want in sorted(man["files"].items()):
        p = d / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise _bad(d, f"{rel} is listed in {MANIFEST} but missing") from None
        except OSError as e:
            raise _bad(p, f"cannot read: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode) or not p.resolve().is_relative_to(root):
            raise _bad(d, f"{rel} is not a regular file inside the artifact")
        try:
            got = sha256(p)
        except OSError as e:
            raise _bad(p, f"cannot read: {e.strerror or e}") from None
        if got != want:
            raise _bad(d, f"{rel} does not match its sha256 in {MANIFEST} (expected "
                          f"{want[:12]}..., found {got[:12]}...): the artifact was modified or "
                          f"corrupted; re-export it")
    return man
