"""Record the exact outputs of every sampling path (tests/regression/cases.py) with the current
code: tests/regression/hashes.json (per case: sha256 of the float32 samples, shape, nfe, summary
numbers, the schedule text's sha256 for tables; the platform fingerprint) and
tests/regression/outputs.npz (every case's samples, compressed; keys = case ids).

    TRITON_INTERPRET=1 python tests/regression/record.py [--check] [--only SUBSTRING]

--check recomputes and compares with the recorded files instead of writing them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402


def _dumps(meta: dict) -> str:
    """JSON with one line per case (diff-friendly)."""
    head = {k: v for k, v in meta.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2]
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta["cases"].items())
    return text + ',\n "cases": {\n' + body + "\n }\n}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the recorded files")
    p.add_argument("--only", default=None, help="only case ids containing this substring "
                   "(with --check; recording always writes every case)")
    ns = p.parse_args(argv)
    import fastsample
    import torch
    print(f"fastsample from {fastsample.__file__}; torch {torch.__version__}", file=sys.stderr)
    todo = [c for c in cases.CASES if ns.only is None or ns.only in c.id]
    if not ns.check and len(todo) != len(cases.CASES):
        p.error("--only applies with --check")
    fp = cases.platform_fingerprint()
    results, arrays, total = {}, {}, time.perf_counter()
    for c in todo:
        t0 = time.perf_counter()
        res = cases.compute(c)
        dt = time.perf_counter() - t0
        s = cases.summary(res)
        s.update({"kind": c.kind, "tol": c.tol, "what": cases.describe(c)})
        results[c.id], arrays[c.id] = s, res["samples"]
        print(f"{c.id:<40} nfe={s['nfe']!s:<5} shape={tuple(s['shape'])!s:<16} "
              f"sum={s['sum']:<14.6f} {dt:6.2f} s  {s['sha256'][:16]}", file=sys.stderr)
    print(f"total {time.perf_counter() - total:.1f} s for {len(todo)} cases", file=sys.stderr)
    if ns.check:
        rec = json.loads((HERE / "hashes.json").read_text())
        bad = [k for k, s in results.items()
               if (s["sha256"], s["nfe"], s.get("text_sha256"))
               != (rec["cases"][k]["sha256"], rec["cases"][k]["nfe"],
                   rec["cases"][k].get("text_sha256"))]
        same = cases.same_platform(rec["platform"], fp)
        print(f"platform fingerprint {'matches' if same else 'DIFFERS'}; "
              f"{len(bad)} case(s) differ: {bad}", file=sys.stderr)
        return 1 if bad else 0
    meta = {"about": "exact outputs of every sampling path, recorded by tests/regression/record.py "
                     "(cases.py); checked by tests/test_regression_outputs.py",
            "num": cases.NUM, "seed": cases.SEED, "threads": 1,
            "platform": fp, "cases": results}
    (HERE / "hashes.json").write_text(_dumps(meta))
    np.savez_compressed(HERE / "outputs.npz", **arrays)
    print(f"wrote {HERE / 'hashes.json'} and {HERE / 'outputs.npz'} "
          f"({(HERE / 'outputs.npz').stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
