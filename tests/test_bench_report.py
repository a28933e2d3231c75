"""bench/report.py's quality side: rows aggregated over sampler seeds (mean, sample std, the
fewest classes hit) and the claims read off them, on hand-built bench JSON whose answers are
known."""

from __future__ import annotations

import statistics

import pytest

from bench import report

METRICS = dict(precision=0.9, recall=0.9, c2st=0.52, c2st_pixels=0.55, c2st_features=0.53,
               kl_uniform=0.01)


def _row(family, sampler, steps, seed, fd, ms=1.0, nfe=None, classes=10, **kw):
    opts = kw.pop("options", {})
    return {"extra_info": {"family": family, "sampler": sampler, "steps": steps, "options": opts,
                           "num": 2000, "device": "cpu", "seed": seed, "fd": fd,
                           "ms_per_sample": ms, "seconds": ms * 2, "classes_hit": classes,
                           "nfe": nfe if nfe is not None else (steps or 4),
                           **{**METRICS, **kw}}}


def _bench(*rows):
    return {"benchmarks": list(rows), "machine_info": {}, "commit_info": {}, "datetime": "x"}


def test_rows_aggregate_over_seeds():
    fds = [10.0, 12.0, 17.0]
    rows = report._quality_rows(_bench(*[_row("ddgan", "posterior", None, s, fd, classes=c)
                                         for s, fd, c in zip((0, 1, 2), fds, (10, 9, 10))]))
    assert len(rows) == 1
    r = rows[0]
    assert r["fd"] == pytest.approx(statistics.mean(fds))
    assert r["fd_std"] == pytest.approx(statistics.stdev(fds))
    assert r["seeds"] == [0, 1, 2] and r["classes_hit_min"] == 9


def test_a_gap_inside_the_spread_is_not_a_win():
    a = {"fd": 10.0, "fd_std": 2.0, "recall": 0.9, "recall_std": 0.01}
    b = {"fd": 13.0, "fd_std": 2.0, "recall": 0.8, "recall_std": 0.01}
    assert not report._better(a, b, "fd")           # 3 < 2 + 2
    assert report._better(a, {**b, "fd": 15.0}, "fd")
    assert report._better(a, b, "recall") and not report._better(b, a, "recall")


def test_latent_and_reference_claims():
    seeds = (0, 1, 2)
    rows = report._quality_rows(_bench(
        *[_row("ddgan", "posterior", None, s, 16 + s, ms=6.0) for s in seeds],
        *[_row("latent-ddgan", "posterior", None, s, 12 + s, ms=2.0) for s in seeds],
        *[_row("lsgm", "ode", 1, s, 20 + s, ms=50.0, nfe=50, options={"rtol": 1e-3})
          for s in seeds],
        *[_row("latent-cld", "sscs", 20, s, 21 + s, ms=10.0) for s in seeds],
        *[_row("latent-cld", "em", 20, s, 22 + s, ms=10.0, classes=9 if s == 1 else 10)
          for s in seeds],
        *[_row("class-gaussian", "reference", None, s, 22 + s, ms=0.01, nfe=0,
               precision=0.85, recall=0.82, c2st=0.59, c2st_pixels=0.89, c2st_features=0.59)
          for s in seeds]))
    claims = "\n".join(report.latent_claims(rows))
    assert "latent DDGAN 2.00 ms / sample: the lowest of every row" in claims  # reference excluded
    assert "vs pixel DDGAN" in claims and "holds" in claims.split("\n")[1]
    assert "sscs-20 FD 22.0 ± 1.0 reaches LSGM ODE" in claims   # gap 1 <= 1 + 1
    assert "SSCS-20 FD 22.0 ± 1.0 vs EM-20 FD 23.0 ± 1.0" in claims
    assert "NFE, gap outside the spread: does NOT hold" in claims     # gap 1 < 2
    assert "SSCS-10 vs EM-10: missing rows" in claims
    assert "does NOT hold (latent-cld em-20 9)" in claims
    ref = report.reference_claims(rows)
    # ddgan's FD 17 +- 1 vs 23 +- 1: a win; its precision 0.9 vs 0.85 a win; every metric wins
    assert any(c.startswith("ddgan posterior (its best FD)") and "beats it on every one" in c for c in ref)
    # lsgm's FD 21 +- 1 vs 23 +- 1 is inside the spread
    assert any(c.startswith("lsgm ode") and "does NOT beat it on fd" in c for c in ref)
    md = report.quality_table(_bench(*[_row("ddgan", "posterior", None, s, 16 + s)
                                       for s in seeds]))
    assert "| ddgan | posterior | 4 | 1.00 ± 0.00 | 17.0 ± 1.0 |" in md


def test_background_columns_appear_only_when_the_run_recorded_them():
    old = report.quality_table(_bench(*[_row("ddgan", "posterior", None, s, 16.0) for s in (0, 1)]))
    assert "border lit" not in old
    new = report.quality_table(_bench(*[_row("ddgan", "posterior", None, s, 16.0,
                                             zero_frac=0.36 + 0.01 * s, border_lit=0.24)
                                        for s in (0, 1)]))
    row = [ln for ln in new.splitlines() if ln.startswith("| ddgan")][0]
    assert row.endswith("| 0.365 ± 0.007 | 0.240 ± 0.000 |"), row
    header = [ln for ln in new.splitlines() if ln.startswith("| family")][0]
    assert header.count("|") == row.count("|")
