"""ctest fixture for the hostile-input tests: copies of make_fixture.py's cases with one thing
changed each (issue 18). Every fastsample-run on them must exit 2 with one line.

    python make_bad_artifacts.py FIXTURE_DIR OUT_DIR

`rehash` updates the copy's manifest.json sha256 after a change, so that the check under test
(shapes, caps, values), not the hash check, has to catch it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("noise", "expected"))
    return dst


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, man: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")


def rehash(d: Path) -> None:
    man = _manifest(d)
    man["files"] = {name: hashlib.sha256((d / name).read_bytes()).hexdigest()
                    for name in man["files"]}
    _write_manifest(d, man)


def edit_schedule(d: Path, old: str, new: str, *, count: int = 1) -> None:
    text = (d / "schedule.txt").read_text()
    assert old in text, (d, old)
    (d / "schedule.txt").write_text(text.replace(old, new, count))


def _npy_with_header(path: Path, header_shape: str, data: bytes) -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + header_shape + ", }"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
                     + data)


def main() -> int:
    fx, out = Path(sys.argv[1]), Path(sys.argv[2])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ddgan, cld = fx / "ddgan", fx / "cld-sscs"

    # schedule vs manifest shapes (hashes updated: only the shape check can catch them)
    for name, old, new in (("zdim16", "z_dim 32", "z_dim 16"), ("zdim1", "z_dim 32", "z_dim 1"),
                           ("data_shape", "data_shape 1 8 8", "data_shape 1 4 4")):
        d = _copy(ddgan, out / name)
        edit_schedule(d, old, new)
        rehash(d)
    # a cld artifact's model + manifest in a ddgan directory (its schedule.txt kept)
    d = _copy(ddgan, out / "cld_in_ddgan")
    shutil.copyfile(cld / "model.pt2", d / "model.pt2")
    shutil.copyfile(cld / "manifest.json", d / "manifest.json")
    rehash(d)
    d = _copy(ddgan, out / "what_decoder")
    man = _manifest(d)
    man["what"] = "decoder"
    _write_manifest(d, man)

    # hashes: a swapped model, one flipped byte deep inside model.pt2 (the shared library's
    # region, not the zip directory), an edited schedule, a manifest without the model's hash,
    # the fixture's old minimal manifest
    d = _copy(ddgan, out / "swapped_model")
    shutil.copyfile(cld / "model.pt2", d / "model.pt2")
    d = _copy(ddgan, out / "flipped_byte")
    blob = bytearray((d / "model.pt2").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (d / "model.pt2").write_bytes(bytes(blob))
    d = _copy(ddgan, out / "edited_schedule")
    edit_schedule(d, "row 1 1 0 0", "row 1 1.0000001 0 0")
    d = _copy(ddgan, out / "unlisted")
    man = _manifest(d)
    del man["files"]["model.pt2"]
    _write_manifest(d, man)
    d = _copy(ddgan, out / "old_manifest")
    (d / "manifest.json").write_text(json.dumps({"family": "ddgan", "format": "aoti"}))

    # bounds and values (hashes updated)
    d = _copy(cld, out / "rows")
    text = (d / "schedule.txt").read_text()
    row = "row 0 0 1 0 1 0 0 1 0 0 0 0\n"
    (d / "schedule.txt").write_text(text + row * 100_001)
    rehash(d)
    for name, old, new in (("overflow", "row 4 0.057821542117799218", "row 4 1e39"),
                           ("step_index", "row 4 ", "row 5 "),
                           ("hex", "row 4 0.057821542117799218", "row 4 0x1.d9p-5"),
                           ("data_shape_cap", "data_shape 1 8 8", "data_shape 1 8192 8192")):
        d = _copy(ddgan, out / name)
        edit_schedule(d, old, new)
        rehash(d)

    # --noise directories
    src = ddgan / "noise"
    d = out / "noise_nan"
    shutil.copytree(src, d)
    noise = np.load(d / "noise.npy")
    noise.flat[7] = np.nan
    np.save(d / "noise.npy", noise)
    for name, shape in (("noise_negative_dim", "(-4, 1, 8, 8)"),
                        ("noise_huge_dim", "(99999999999999999999, 1, 8, 8)")):
        d = out / name
        shutil.copytree(src, d)
        x = np.load(d / "x_T.npy")
        _npy_with_header(d / "x_T.npy", shape, x.astype("<f4").tobytes())
    print(f"make_bad_artifacts: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
