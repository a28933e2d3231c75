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


_METRICS = ("fd", "precision", "recall", "c2st", "c2st_pixels", "c2st_features", "classes_hit",
            "kl_uniform", "ms_per_sample", "nfe", "seconds", "zero_frac", "border_lit")
# Which way is better for each metric a family must beat the class Gaussian on.
_LOWER_IS_BETTER = {"fd": True, "c2st": True, "c2st_pixels": True, "c2st_features": True,
                    "precision": False, "recall": False}


def _quality_rows(bench_json: dict) -> list[dict]:
    """One row per case (family, sampler, steps, options) in the run's order: each metric is
    the mean over the case's seeds, <metric>_std the sample std (0 for one seed), and
    classes_hit_min the fewest classes any seed hit."""
    groups: dict[str, list[dict]] = {}
    for b in bench_json["benchmarks"]:
        e = b["extra_info"]
        if "fd" not in e:
            continue
        key = json.dumps([e["family"], e["sampler"], e.get("steps"),
                          e.get("options", {}), e.get("num")], sort_keys=True)
        groups.setdefault(key, []).append(e)
    rows = []
    for runs in groups.values():
        r = {k: v for k, v in runs[0].items() if k not in _METRICS and k != "seed"}
        r["seeds"] = sorted(e.get("seed") for e in runs if e.get("seed") is not None) or None
        r["n_seeds"] = len(runs)
        for k in _METRICS:
            vals = [float(e[k]) for e in runs if e.get(k) is not None]
            if not vals:
                continue
            m = sum(vals) / len(vals)
            r[k] = m
            r[f"{k}_std"] = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 \
                if len(vals) > 1 else 0.0
        r["classes_hit_min"] = min(int(e["classes_hit"]) for e in runs)
        rows.append(r)
    return rows


def _pm(r: dict, k: str, fmt: str = ".1f") -> str:
    if r.get(k) is None:
        return "-"
    return f"{r[k]:{fmt}}" + (f" ± {r[k + '_std']:{fmt}}" if r.get("n_seeds", 1) > 1 else "")


def _better(a: dict, b: dict, k: str) -> bool:
    """a beats b on metric k by a margin outside the seed spread (the gap exceeds the sum of
    the two stds; with one seed each, any gap)."""
    gap = (b[k] - a[k]) if _LOWER_IS_BETTER.get(k, True) else (a[k] - b[k])
    return gap > a.get(f"{k}_std", 0.0) + b.get(f"{k}_std", 0.0)


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
REFERENCE = "class-gaussian"


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
        out.append(f"<= {ddim['nfe']:.0f} calls: best peer {_label(best).split(' ', 1)[1]} "
                   f"(NFE {best['nfe']:.0f}) FD {_pm(best, 'fd')} vs our DDIM-{ddim['nfe']:.0f} "
                   f"FD {_pm(ddim, 'fd')}: our DDIM "
                   f"{'is' if ddim['fd'] <= best['fd'] else 'is NOT'} on the frontier")
    g = _find(rows, "ddgan", "posterior")
    if g:
        rivals = [r for r in rows if r["family"] not in ("ddgan", REFERENCE)
                  and r["nfe"] <= g["nfe"]]
        if rivals:
            best = min(rivals, key=lambda r: r["fd"])
            out.append(f"DDGAN (T={g['nfe']:.0f}) FD {_pm(g, 'fd')} vs the best other sampler at "
                       f"<= {g['nfe']:.0f} calls, {_label(best)} FD {_pm(best, 'fd')}: DDGAN "
                       f"{'has' if g['fd'] <= best['fd'] else 'does NOT have'} the best FD")
    return out


def reference_claims(rows: list[dict]) -> list[str]:
    """Every family's best-FD row (its own samplers; the peer samplers are not the family's)
    against the class-conditional Gaussian on every metric, each gap outside the seed spread
    (issue 20)."""
    ref = _find(rows, REFERENCE, "reference")
    if ref is None:
        return ["every family vs the class Gaussian: missing reference row"]
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows if r["family"] != REFERENCE):
        own = [r for r in rows if r["family"] == fam and r["sampler"] not in PEERS]
        if not own:
            continue
        best = min(own, key=lambda r: r["fd"])
        lost = [k for k in _LOWER_IS_BETTER if best.get(k) is not None and ref.get(k) is not None
                and not _better(best, ref, k)]
        out.append(f"{_label(best)} (its best FD) vs the class Gaussian on "
                   f"{', '.join(_LOWER_IS_BETTER)}: "
                   + ("beats it on every one (outside the spread)" if not lost else
                      "does NOT beat it on " + ", ".join(
                          f"{k} ({_pm(best, k, '.3g')} vs {_pm(ref, k, '.3g')})" for k in lost)))
    return out


def _sscs_vs_em(rows: list[dict], family: str, name: str, budgets) -> list[str]:
    """SSCS against EM at equal NFE: better by an FD gap outside the seed spread?"""
    out = []
    for n in budgets:
        a, b = _find(rows, family, "sscs", n), _find(rows, family, "em", n)
        if a and b:
            out.append(f"{name} SSCS-{n} FD {_pm(a, 'fd')} vs EM-{n} FD {_pm(b, 'fd')} at equal "
                       f"NFE, gap outside the spread: "
                       f"{'holds' if _better(a, b, 'fd') else 'does NOT hold'}")
        else:
            out.append(f"{name} SSCS-{n} vs EM-{n}: missing rows")
    return out


def latent_claims(rows: list[dict]) -> list[str]:
    """Issue 21's done-when claims for the combined latent models, on this run's numbers."""
    out = []
    lg, g = _find(rows, "latent-ddgan", "posterior"), _find(rows, "ddgan", "posterior")
    if lg:
        models = [r for r in rows if r["family"] != REFERENCE]
        fastest = min(models, key=lambda r: r["ms_per_sample"])
        out.append(f"latent DDGAN {lg['ms_per_sample']:.2f} ms / sample: "
                   + ("the lowest of every row" if fastest is lg else
                      f"NOT the lowest ({_label(fastest)} {fastest['ms_per_sample']:.2f} ms)"))
        if g:
            ok = lg["fd"] <= g["fd"] and lg["c2st"] <= 0.60
            out.append(f"latent DDGAN FD {_pm(lg, 'fd')} vs pixel DDGAN {_pm(g, 'fd')}, C2ST "
                       f"{_pm(lg, 'c2st', '.3f')} (bar <= 0.60): "
                       f"{'holds' if ok else 'does NOT hold'}")
    else:
        out.append("latent DDGAN: missing row")
    sscs = [r for r in rows if r["family"] == "latent-cld" and r["sampler"] == "sscs"]
    for ode in (r for r in rows if r["family"] == "lsgm" and r["sampler"] == "ode"):
        fits = [r for r in sscs if r["nfe"] <= ode["nfe"] / 2]
        reach = [r for r in fits if r["fd"] - ode["fd"] <= r["fd_std"] + ode["fd_std"]]
        tol = ode["options"].get("rtol")
        if reach:
            r = min(reach, key=lambda r: r["nfe"])
            out.append(f"latent CLD {_label(r).split(' ', 1)[1]} FD {_pm(r, 'fd')} reaches LSGM ODE "
                       f"(tol {tol:g}, NFE {ode['nfe']:.0f}) FD {_pm(ode, 'fd')} within the "
                       f"spread at <= half its NFE: holds")
        else:
            best = min(fits, key=lambda r: r["fd"]) if fits else None
            out.append(f"latent CLD SSCS at <= {ode['nfe'] / 2:.0f} NFE vs LSGM ODE (tol {tol:g}) "
                       f"FD {_pm(ode, 'fd')}: does NOT hold"
                       + (f" (best {_label(best).split(' ', 1)[1]} FD {_pm(best, 'fd')})"
                          if best else " (no SSCS row that cheap)"))
    out += _sscs_vs_em(rows, "latent-cld", "latent CLD", (10, 20))
    lat = [r for r in rows if r["family"].startswith("latent-")]
    if lat:
        short = [f"{_label(r)} {r['classes_hit_min']}" for r in lat if r["classes_hit_min"] < 10]
        out.append("latent models cover 10/10 classes in every seed: "
                   + ("holds" if not short else "does NOT hold (" + ", ".join(short) + ")"))
    return out


def quality_claims(rows: list[dict]) -> list[str]:
    """The issue's claims, each checked on this run's numbers (held / does NOT hold / missing)."""
    out = []
    g, d = _find(rows, "ddgan", "posterior"), _find(rows, "ddpm", "ancestral", 1000)
    if g and d:
        out.append(f"DDGAN (T={g['nfe']:.0f}) FD {_pm(g, 'fd')} vs DDPM ancestral-1000 FD "
                   f"{_pm(d, 'fd')}: ratio {g['fd'] / d['fd']:.2f} (goal 1.5) at "
                   f"{d['ms_per_sample'] / g['ms_per_sample']:.0f}x less time per sample")
    else:
        out.append("DDGAN vs DDPM-1000: missing rows")
    out += _sscs_vs_em(rows, "cld", "CLD", (10, 20, 50))
    for tol in sorted({r.get("options", {}).get("rtol") for r in rows
                       if r["family"] == "lsgm" and r["sampler"] == "ode"} - {None}):
        a, b = _find(rows, "lsgm", "ode", rtol=tol), _find(rows, "ddpm", "ode", rtol=tol)
        if a and b:
            out.append(f"LSGM ODE NFE {a['nfe']:.0f} vs DDPM ODE NFE {b['nfe']:.0f} at tol "
                       f"{tol:g}: {'holds' if a['nfe'] < b['nfe'] else 'does NOT hold'}")
        elif a:
            out.append(f"LSGM ODE NFE {a['nfe']:.0f} at tol {tol:g}: no DDPM ODE row at that "
                       f"tolerance")
    return out


def quality_table(bench_json: dict) -> str:
    rows = _quality_rows(bench_json)
    meta = bench_json.get("fastsample", {})
    dev = rows[0]["device"] if rows else "?"
    seeds = sorted({tuple(r["seeds"] or ()) for r in rows})
    seed_txt = ("one sampler seed (not recorded)" if seeds in ([], [()]) else
                f"sampler seeds {', '.join(map(str, seeds[0])) if len(seeds) == 1 else seeds} "
                f"(mean ± std)")
    lines = [f"Digits, {rows[0]['num'] if rows else '?'} samples per row and seed, {seed_txt}, "
             f"device {dev} "
             f"({meta.get('machine', bench_json.get('machine_info', {}).get('cpu', {}).get('brand_raw', ''))}); "
             f"commit {meta.get('commit', bench_json.get('commit_info', {}).get('id', '?'))[:12]}; "
             f"date {meta.get('date', bench_json.get('datetime', '?')[:10])}.",
             "",
             "C2ST: logistic regression in the classifier's features (5-fold); C2ST pix / feat: "
             "boosted trees, held out, on raw pixels / the features (fastsample.metrics; "
             "calibration in docs/metrics_calibration.md). Precision / recall: k-NN manifolds "
             "(k = 3) in the features. Classes hit: the fewest over the seeds.",
             ""]
    # Runs recorded before metrics.background_stats have no background columns.
    bg = any(r.get("border_lit") is not None for r in rows)
    if bg:
        lines += ["Zeros / border lit: the share of level-0 pixels and of lit pixels in the two "
                  "border columns (metrics.background_stats; train split 0.489 / 0.014).", ""]
    lines += ["| family | sampler | NFE | ms / sample | FD | precision | recall | C2ST | "
              "C2ST pix | C2ST feat | classes hit |" + (" zeros | border lit |" if bg else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if bg else "")]
    for r in rows:
        nfe = f"{r['nfe']:.0f}" if r["nfe"] == int(r["nfe"]) else f"{r['nfe']:.1f}"
        lines.append(f"| {r['family']} | {_label(r).split(' ', 1)[1]} | {nfe} | "
                     f"{_pm(r, 'ms_per_sample', '.2f')} | {_pm(r, 'fd')} | "
                     f"{_pm(r, 'precision', '.3f')} | {_pm(r, 'recall', '.3f')} | "
                     f"{_pm(r, 'c2st', '.3f')} | {_pm(r, 'c2st_pixels', '.3f')} | "
                     f"{_pm(r, 'c2st_features', '.3f')} | {r['classes_hit_min']} |"
                     + (f" {_pm(r, 'zero_frac', '.3f')} | {_pm(r, 'border_lit', '.3f')} |"
                        if bg else ""))
    lines += ["", "Claims, checked on this run:", ""]
    lines += [f"- {c}" for c in quality_claims(rows) + peer_claims(rows) + latent_claims(rows)
              + reference_claims(rows)]
    return "\n".join(lines) + "\n"


def quality_plot(bench_json: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _quality_rows(bench_json)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"ddgan": "tab:red", "cld": "tab:blue", "lsgm": "tab:green", "ddpm": "tab:gray",
              "latent-ddgan": "tab:orange", "latent-cld": "tab:purple"}
    ref = _find(rows, REFERENCE, "reference")
    if ref is not None:     # not a sampler: no time to place it at; a line at its FD
        ax.axhline(ref["fd"], color="k", lw=0.8, ls="--")
        ax.annotate("class Gaussian (reference)", (0.01, ref["fd"]), fontsize=6,
                    xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points")
    for r in (r for r in rows if r["family"] != REFERENCE):
        # peer samplers (diffusers' schedulers on the DDPM net): hollow, so the families stand out
        peer = r["sampler"] in PEERS
        ax.errorbar(r["ms_per_sample"], r["fd"], yerr=r.get("fd_std", 0.0), fmt="none",
                    ecolor=colors.get(r["family"], "k"), elinewidth=0.7)
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
