"""ctest: fastsample-run end to end on a fixture case.

    python check_cli.py FASTSAMPLE_RUN CASE_DIR NFE

--noise CASE_DIR/noise must reproduce the Python loop on the same model.pt2 (data space, equal);
the .npy it writes must load in numpy as float32 (N, *data_shape); stdout names the NFE and the
latency; its own draws (no --noise) are deterministic in --seed and do not depend on --batch.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(*args) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{args} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def main() -> int:
    exe, case, nfe = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    want = np.load(case / "expected" / "samples_aoti.npy")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.npy"
        text = run(exe, case, "--noise", case / "noise", "--out", out, "--repeat", "2",
                   "--threads", "1")
        print(text)
        for part in (f"nfe {nfe}", "run 2:", "ms/sample", "latency: p50", f"wrote {out}"):
            assert part in text, f"stdout lacks {part!r}"
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == want.shape, (got.dtype, got.shape)
        assert np.array_equal(got, want), f"max abs {np.abs(got - want).max()}"
        # Own draws: same seed same samples, whatever the batch; another seed differs.
        a, b, c = (Path(tmp) / f"{k}.npy" for k in "abc")
        run(exe, case, "--num", 5, "--seed", 7, "--out", a)
        run(exe, case, "--num", 5, "--seed", 7, "--batch", 2, "--out", b)
        run(exe, case, "--num", 5, "--seed", 8, "--out", c)
        xa, xb, xc = np.load(a), np.load(b), np.load(c)
        assert xa.shape == (5, *want.shape[1:])
        # (the compiled net's rounding depends on the batch: ~1e-5 in model space, which can
        # move a value across a quantisation edge, one level of 1/16)
        diff = np.abs(xa - xb)
        assert diff.max() <= 1 / 16 + 1e-6 and (diff > 0).mean() <= 0.01, diff.max()
        assert not np.array_equal(xa, xc)
    print(f"{case.name}: fastsample-run output equals the Python loop's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
