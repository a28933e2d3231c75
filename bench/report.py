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


def _quality_rows(bench_json: dict) -> list[dict]:
    return [b["extra_info"] for b in bench_json["benchmarks"] if "fd" in b["extra_info"]]


def _label(r: dict) -> str:
    # adaptive ODE rows carry a placeholder step count: the NFE column says what they used
    steps = f"-{r['steps']}" if r.get("steps") and r["sampler"] != "ode" else ""
    tol = f" tol {r['options']['rtol']:g}" if "rtol" in r.get("options", {}) else ""
    karras = " karras" if r.get("options", {}).get("karras") else ""
    return f"{r['family']} {r['sampler']}{steps}{tol}{karras}"


def _find(rows, family, sampler, steps=None, rtol=None, karras=False):
    for r in rows:
        if r["family"] == family and r["sampler"] == sampler and \
                (steps is None or r.get("steps") == steps) and \
                (rtol is None or r.get("options", {}).get("rtol") == rtol) and \
                bool(r.get("options", {}).get("karras")) == karras:
            return r
    return None


PEERS = ("dpmpp2m", "unipc", "euler", "heun")


def peer_claims(rows: list[dict]) -> list[str]:
    """Per NFE budget with a DDIM row: the best peer sampler (diffusers' schedulers, at most that
    many calls) against our DDIM by FD, and DDGAN-4 against all of them at <= 4 calls."""
    out = []
    for ddim in sorted((r for r in rows if r["family"] == "ddpm" and r["sampler"] == "ddim"),
                       key=lambda r: r["nfe"]):
        peers = [r for r in rows if r["sampler"] in PEERS and r["nfe"] <= ddim["nfe"]
                 and r["nfe"] > ddim["nfe"] // 2]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["fd"])
        out.append(f"<= {ddim['nfe']} calls: best peer {_label(best).split(' ', 1)[1]} "
                   f"(NFE {best['nfe']}) FD {best['fd']:.1f} vs our DDIM-{ddim['nfe']} FD "
                   f"{ddim['fd']:.1f}: our DDIM {'is' if ddim['fd'] <= best['fd'] else 'is NOT'} "
                   f"on the frontier")
    g = _find(rows, "ddgan", "posterior")
    if g:
        rivals = [r for r in rows if r["family"] != "ddgan" and r["nfe"] <= g["nfe"]]
        if rivals:
            best = min(rivals, key=lambda r: r["fd"])
            out.append(f"DDGAN (T={g['nfe']}) FD {g['fd']:.1f} vs the best other sampler at <= "
                       f"{g['nfe']} calls, {_label(best)} FD {best['fd']:.1f}: DDGAN "
                       f"{'has' if g['fd'] <= best['fd'] else 'does NOT have'} the best FD")
    return out


def quality_claims(rows: list[dict]) -> list[str]:
    """The issue's claims, each checked on this run's numbers (held / does NOT hold / missing)."""
    out = []
    g, d = _find(rows, "ddgan", "posterior"), _find(rows, "ddpm", "ancestral", 1000)
    if g and d:
        ok = g["fd"] <= 1.5 * d["fd"] and d["ms_per_sample"] >= 100 * g["ms_per_sample"]
        out.append(f"DDGAN (T={g['nfe']}) FD {g['fd']:.1f} vs DDPM ancestral-1000 FD {d['fd']:.1f} "
                   f"(ratio {g['fd'] / d['fd']:.2f}, bar <= 1.5) at "
                   f"{d['ms_per_sample'] / g['ms_per_sample']:.0f}x less time per sample "
                   f"(bar >= 100x): {'holds' if ok else 'does NOT hold'}")
    else:
        out.append("DDGAN vs DDPM-1000: missing rows")
    for n in (20, 50):
        a, b = _find(rows, "cld", "sscs", n), _find(rows, "cld", "em", n)
        if a and b:
            out.append(f"CLD SSCS-{n} FD {a['fd']:.1f} vs EM-{n} FD {b['fd']:.1f} at equal NFE: "
                       f"{'holds' if a['fd'] < b['fd'] else 'does NOT hold'}")
        else:
            out.append(f"CLD SSCS-{n} vs EM-{n}: missing rows")
    for tol in sorted({r.get("options", {}).get("rtol") for r in rows
                       if r["family"] == "lsgm" and r["sampler"] == "ode"} - {None}):
        a, b = _find(rows, "lsgm", "ode", rtol=tol), _find(rows, "ddpm", "ode", rtol=tol)
        if a and b:
            out.append(f"LSGM ODE NFE {a['nfe']} vs DDPM ODE NFE {b['nfe']} at tol {tol:g}: "
                       f"{'holds' if a['nfe'] < b['nfe'] else 'does NOT hold'}")
        elif a:
            out.append(f"LSGM ODE NFE {a['nfe']} at tol {tol:g}: no DDPM ODE row at that tolerance")
    return out


def quality_table(bench_json: dict) -> str:
    rows = _quality_rows(bench_json)
    meta = bench_json.get("fastsample", {})
    dev = rows[0]["device"] if rows else "?"
    lines = [f"Digits, {rows[0]['num'] if rows else '?'} samples per row, device {dev} "
             f"({meta.get('machine', bench_json.get('machine_info', {}).get('cpu', {}).get('brand_raw', ''))}); "
             f"commit {meta.get('commit', bench_json.get('commit_info', {}).get('id', '?'))[:12]}; "
             f"date {meta.get('date', bench_json.get('datetime', '?')[:10])}.",
             "",
             "C2ST: logistic regression in the classifier's features (5-fold); C2ST pix / feat: "
             "boosted trees, held out, on raw pixels / the features (fastsample.metrics; "
             "calibration in docs/metrics_calibration.md). Precision / recall: k-NN manifolds "
             "(k = 3) in the features.",
             "",
             "| family | sampler | NFE | ms / sample | FD | precision | recall | C2ST | "
             "C2ST pix | C2ST feat | classes hit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        return f"{r[k]:.3f}" if r.get(k) is not None else "-"

    for r in rows:
        lines.append(f"| {r['family']} | {_label(r).split(' ', 1)[1]} | {r['nfe']} | "
                     f"{r['ms_per_sample']:.3f} | {r['fd']:.1f} | {cell(r, 'precision')} | "
                     f"{cell(r, 'recall')} | {cell(r, 'c2st')} | {cell(r, 'c2st_pixels')} | "
                     f"{cell(r, 'c2st_features')} | {r['classes_hit']} |")
    lines += ["", "Claims, checked on this run:", ""]
    lines += [f"- {c}" for c in quality_claims(rows) + peer_claims(rows)]
    return "\n".join(lines) + "\n"


def quality_plot(bench_json: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _quality_rows(bench_json)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"ddgan": "tab:red", "cld": "tab:blue", "lsgm": "tab:green", "ddpm": "tab:gray"}
    for r in rows:
        # peer samplers (diffusers' schedulers on the DDPM net): hollow, so the families stand out
        peer = r["sampler"] in PEERS
        ax.scatter(r["ms_per_sample"], r["fd"], s=25, marker="D" if peer else "o",
                   facecolors="none" if peer else colors.get(r["family"], "k"),
                   edgecolors=colors.get(r["family"], "k"))
        ax.annotate(_label(r), (r["ms_per_sample"], r["fd"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling time per sample (ms, log)")
    ax.set_ylabel("FD in classifier features (log; lower is better)")
    ax.set_title("Quality vs sampling time, 8x8 digits")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["kernels", "quality"])
    p.add_argument("json", help="pytest-benchmark JSON file")
    p.add_argument("-o", "--out", help="write markdown here (default: stdout)")
    p.add_argument("--plot", help="quality: write the log-time vs FD plot (PNG) here")
    a = p.parse_args(argv)
    with open(a.json) as f:
        data = json.load(f)
    md = kernels_table(data) if a.kind == "kernels" else quality_table(data)
    if a.kind == "quality" and a.plot:
        quality_plot(data, a.plot)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
