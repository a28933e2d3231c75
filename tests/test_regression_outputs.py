"""Regression: every sampling path gives the outputs recorded in tests/regression/.

The cases (tests/regression/cases.py) are `fastsample sample` for every sampler of every
released checkpoint at one or two budgets, the same through `--engine` where the Engine serves
the sampler, and the exported schedule tables run by `run_table`. tests/regression/record.py
wrote, with the code of the recording commit, each case's sha256 (float32 samples, little-endian,
C order), shape and NFE to hashes.json and the samples themselves to outputs.npz.

On the recording platform (same fingerprint: a fixed conv2d / matmul / group_norm / exp
computation hashes the same, same torch, machine and CPU kernel capability) every output must be
bit-identical. Elsewhere float rounding may differ, so the outputs are compared with the stored
arrays within a tolerance instead (digits: <= 1% of values one grey level off; 2D toys: 1e-4;
raw model-space loop outputs: 1e-3). NFE, shapes and the schedule tables' text always match
exactly. Everything runs on one thread (the thread count changes CPU reduction order).

A deliberate output change (new weights, a different noise stream) is re-recorded with
`python tests/regression/record.py` and committed with the change that caused it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent / "regression"


def _load_cases():
    name = "fastsample_regression_cases"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "cases.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


cases = _load_cases()
RECORDED = json.loads((HERE / "hashes.json").read_text())


@pytest.fixture(scope="module")
def stored():
    with np.load(HERE / "outputs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def exact():
    """True when this platform rounds as the recording one did (bit-exact comparison)."""
    now = cases.platform_fingerprint()
    same = cases.same_platform(RECORDED["platform"], now)
    if not same:
        diff = {k: (RECORDED["platform"].get(k), now.get(k)) for k in cases.MATCH_KEYS
                if RECORDED["platform"].get(k) != now.get(k)}
        print(f"\nregression: platform fingerprint differs from the recording one {diff}: "
              f"comparing within tolerances, not bit for bit", file=sys.stderr)
    return same


def test_case_list_matches_the_recording(stored):
    ids = [c.id for c in cases.CASES]
    assert ids == list(RECORDED["cases"]), "cases.py and hashes.json list different cases; " \
        "re-record only for a deliberate output change"
    assert sorted(stored) == sorted(ids)
    for k, rec in RECORDED["cases"].items():          # the stored arrays are the hashed ones
        assert cases.array_sha256(stored[k]) == rec["sha256"], k


def test_every_family_sampler_pair_is_covered():
    pairs = {(c.ckpt, c.sampler) for c in cases.CASES if c.kind == "cli"}
    want = {"ddgan": {"posterior"}, "cld": {"sscs", "em", "ode"}, "lsgm": {"ode", "em"},
            "ddpm": {"ancestral", "ddim", "em", "ode"}}
    for ckpt in {c.ckpt for c in cases.CASES}:
        fam = Path(ckpt).stem
        assert {s for p, s in pairs if p == ckpt} == want[fam], ckpt


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.id)
def test_output_unchanged(case, stored, exact):
    rec = RECORDED["cases"][case.id]
    res = cases.compute(case)
    got, want = res["samples"], stored[case.id]
    assert list(got.shape) == rec["shape"], f"{case.id}: shape {got.shape} != {rec['shape']}"
    assert res["nfe"] == rec["nfe"], f"{case.id}: nfe {res['nfe']} != {rec['nfe']}"
    if "text_sha256" in rec:
        assert cases.text_sha256(res["text"]) == rec["text_sha256"], \
            f"{case.id}: the schedule table's text changed"
    s = cases.summary(res)
    diag = (f"{case.id} ({rec['what']}): sum {s['sum']!r} vs recorded {rec['sum']!r}, mean "
            f"{s['mean']!r} vs {rec['mean']!r}; {int((got != want).sum())} of {got.size} "
            f"values differ, max abs {float(np.abs(got - want).max()):.3g}")
    if exact:
        assert s["sha256"] == rec["sha256"], f"not bit-identical: {diag}"
    else:
        ok, why = cases.within_tolerance(case.tol, got, want)
        assert ok, f"beyond the cross-platform tolerance ({why}): {diag}"
