"""The released checkpoints against issue #20's bars, measured as the bars say: 2000 samples, 3
sampler seeds, every seed must pass. A bar a release does not meet yet is an xfail(strict): it
documents the measured gap, and the day a release meets it the test XPASSes and fails, so the
mark must go.

grid25 (metrics.grid25_modes): >= 90% of samples within 3 std of their mode, all 25 modes with
>= 1% of the uniform share, and Pearson's chi-square of the mode counts within 3x the exact
data's (mean over the same seeds; ~24 for 25 counts)."""

from __future__ import annotations

import pytest
import torch

from fastsample import samplers
from fastsample.data.toy2d import grid25
from fastsample.metrics import grid25_modes
from fastsample.models import get, load_model

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py

N, SEEDS = 2000, (0, 1, 2)


@pytest.fixture(scope="module")
def exact_chi2():
    mix = grid25().mixture
    chi = [grid25_modes(mix.sample(N, torch.Generator().manual_seed(1000 + s)))["chi2"]
           for s in SEEDS]
    return sum(chi) / len(chi)


def _grid25_rows(family: str, sampler: str, steps: int | None, **opts) -> list[dict]:
    model, card = load_model(f"checkpoints/grid25/{family}.safetensors")
    entry = get(card.family)
    rows = []
    for seed in SEEDS:
        x, _ = samplers.sample(entry.sampling, model, sampler, steps, N, seed, "cpu",
                               progress=False, **opts)
        rows.append(grid25_modes(x, min_share=0.01))   # the driver returns data space
    return rows


def _check(rows: list[dict], exact_chi2: float) -> None:
    for r in rows:
        assert r["within_3std"] >= 0.90, rows
        assert r["modes_hit"] == 25, rows
        assert r["chi2"] <= 3 * exact_chi2, (rows, exact_chi2)


def test_grid25_ddpm_ddim50_is_sharp(exact_chi2):
    _check(_grid25_rows("ddpm", "ddim", 50), exact_chi2)


def test_grid25_cld_sscs50_is_sharp(exact_chi2):
    _check(_grid25_rows("cld", "sscs", 50, schedule="quadratic"), exact_chi2)


@pytest.mark.xfail(strict=True, reason="released grid25 DDGAN-4: 64.5-67.1% within 3 std, chi2 "
                   "118-151 (3 seeds, 2000 samples); its step 2 (the multimodal one under "
                   "t_power 3) is the gap, docs/grid25.md")
def test_grid25_ddgan4_is_sharp(exact_chi2):
    _check(_grid25_rows("ddgan", "posterior", 4), exact_chi2)


# ---------------------------------------------------------------------------------------------
# Issue #21 on the released digits latent CLD: its SSCS (the default, score at the step midpoint)
# against EM at 10 NFE. The bench measured FD 18.5 +- 3.5 against 63.1 +- 4.2 over 3 x 2000
# samples; 1000 samples of one seed keep this test cheap, and a 2x margin stays far outside
# FD's noise at that n.

def test_latent_cld_sscs_beats_em_at_10_nfe_and_covers_every_class():
    from fastsample.metrics import evaluate
    model, card = load_model("checkpoints/digits/latent-cld.safetensors")
    entry = get(card.family)
    got = {}
    for sampler in ("sscs", "em"):
        x, nfe = samplers.sample(entry.sampling, model, sampler, 10, 1000, 0, "cpu",
                                 progress=False)
        assert nfe == 10
        got[sampler] = evaluate(x, "digits", seed=0)
    assert got["sscs"]["fd"] * 2 < got["em"]["fd"], got
    assert got["sscs"]["classes_hit"] == 10, got


# ---------------------------------------------------------------------------------------------
# Issue #20's background bar on digits: the share of level-0 pixels and of lit border-column
# pixels each within 0.03 of the train split's (metrics.background_stats), every seed.

def _check_background(family: str) -> None:
    from fastsample.data.images import load_digits
    from fastsample.metrics import background_stats
    ref = background_stats(load_digits("train").x)
    model, card = load_model(f"checkpoints/digits/{family}.safetensors")
    entry = get(card.family)
    rows = []
    for seed in SEEDS:
        x, _ = samplers.sample(entry.sampling, model, "posterior", None, N, seed, "cpu",
                               progress=False)
        st = background_stats(x)
        rows.append({k: abs(st[k] - ref[k]) for k in st})
    assert all(r["zero_frac"] <= 0.03 and r["border_lit"] <= 0.03 for r in rows), rows


def test_digits_latent_ddgan_background_matches_the_data():
    """The DDGAN on LSGM's latent: its VAE decoder draws the background (measured gaps 0.005 /
    0.001 over 3 x 2000)."""
    _check_background("latent-ddgan")


@pytest.mark.xfail(strict=True, reason="released digits DDGAN-4: zero_frac 0.367 vs the data's "
                   "0.489, border_lit 0.244 vs 0.014 (3 x 2000); its last step is a denoiser "
                   "about one grey level too imprecise on the background, docs/ddgan_tuning.md")
def test_digits_ddgan4_background_matches_the_data():
    _check_background("ddgan")


# ---------------------------------------------------------------------------------------------
# Issue #20's z-usage bar on the released digits DDGAN: at every step G's spread over z is at
# least half the spread of the training set's own denoising posterior (metrics.ddgan_z_usage;
# measured 131 / 110 / 99 / 96% at i = 1..4 over 300 rows with the energy-score term; the
# diversity term's release read 81-319%, the DDGAN released before either 0.5-0.9%).

def test_digits_ddgan_uses_z_at_every_step():
    from fastsample.data.images import dequantize_digits, load_digits
    from fastsample.metrics import ddgan_z_usage
    model, _ = load_model("checkpoints/digits/ddgan.safetensors")
    g = torch.Generator().manual_seed(0)
    data = 2 * dequantize_digits(load_digits("train").x, g) - 1      # model space
    with torch.no_grad():
        rows = ddgan_z_usage(model, data[:300], data, draws=16)
    assert [r["i"] for r in rows] == [1, 2, 3, 4]
    assert all(r["generator_var"] >= 0.5 * r["posterior_var"] for r in rows), rows
