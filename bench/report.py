"""Render committed bench JSON (pytest-benchmark --benchmark-json) into markdown tables.

    python bench/report.py kernels bench/results/kernels-h100-2026-11-25.json [-o OUT.md]

Ratios are computed between rows of ONE run (same machine, same session), never across files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict


def _cases(bench_json: dict) -> dict[str, dict[str, dict]]:
    """{case name without impl: {impl: extra_info}}"""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in bench_json["benchmarks"]:
        e = b["extra_info"]
        impl = e["impl"]
        case = re.sub(r"-?" + re.escape(impl) + r"(?=\])", "", b["name"])
        out[case][impl] = e
    return out


def kernels_table(bench_json: dict) -> str:
    meta = bench_json.get("fastsample", {})
    lines = [f"Device: {meta.get('device', bench_json['machine_info'].get('cpu', {}).get('brand_raw', '?'))}; "
             f"commit {meta.get('commit', '?')[:12]}; date {meta.get('date', '?')}.",
             "",
             "Per-call time in us (median). `triton` = eager launch from Python (host launch cost "
             "included); `graph` = the same kernel replayed from a CUDA graph (device time); "
             "speed-ups are eager-twin / triton and compile / triton; GB/s and % of peak are the "
             "triton launch's (bytes each op must move).",
             "",
             "| case | triton | graph | eager twin | compile(twin) | x eager | x compile | GB/s | % peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, impls in _cases(bench_json).items():
        t = impls.get("triton", {})
        g = impls.get("triton-graph", {})
        e = impls.get("eager", {})
        c = impls.get("compile", {})

        def us(d):
            return f"{d['us_per_call']:.1f}" if d else "-"

        def ratio(a, b):
            return f"{a['us_per_call'] / b['us_per_call']:.2f}" if a and b else "-"

        frac = t.get("fraction_of_peak")
        lines.append(f"| {case} | {us(t)} | {us(g)} | {us(e)} | {us(c)} | {ratio(e, t)} | "
                     f"{ratio(c, t)} | {t.get('achieved_GBps', 0):.0f} | "
                     f"{'-' if frac is None else f'{100 * frac:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["kernels"])
    p.add_argument("json", help="pytest-benchmark JSON file")
    p.add_argument("-o", "--out", help="write markdown here (default: stdout)")
    a = p.parse_args(argv)
    with open(a.json) as f:
        data = json.load(f)
    md = kernels_table(data)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
