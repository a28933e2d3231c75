"""fastsample.metrics: oracles for FD (independent sqrtm formula), coverage (closed-form KL),
MMD^2 (closed form for Gaussians), sliced W2 (closed form for shifted Gaussians), calibration order."""

import json
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

import fastsample.data as fdata
import fastsample.metrics as M
from fastsample.data.images import load_digits


@pytest.fixture(scope="module")
def test_split():
    return load_digits("test")


@pytest.fixture(scope="module")
def train_split():
    return load_digits("train")


# ---------------------------------------------------------------------------------------------
# classifier

def test_shipped_classifier_accuracy_and_card(test_split):
    clf = M.load_classifier()
    acc = M.classifier_accuracy(clf, test_split.x, test_split.labels)
    assert acc > 0.95
    card = json.loads((M.ASSETS / M.CARD_FILE).read_text())
    assert card["data"] == "digits" and card["num_features"] == M.NUM_FEATURES
    assert abs(card["test_accuracy"] - acc) < 1e-6  # the card reports what the weights do
    assert (M.ASSETS / M.CLASSIFIER_FILE).stat().st_size < 1_000_000


def test_training_is_deterministic_given_seed():
    a, _ = M.train_classifier(seed=3, epochs=1, log=lambda s: None)
    b, _ = M.train_classifier(seed=3, epochs=1, log=lambda s: None)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_classifier_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        M.load_classifier(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="bad.safetensors"):
        M.load_classifier(bad)


# ---------------------------------------------------------------------------------------------
# Frechet distance

def _fd_scipy(f1, f2):
    """Independent FD: closed form with scipy's matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_matches_independent_formula(test_split, train_split):
    x = test_split.x[:200]
    want = _fd_scipy(M.digits_features(x), M.digits_features(train_split.x))
    got = M.frechet_distance(x, "train")
    assert got == pytest.approx(want, rel=1e-6)
    # The cached reference statistics give the same number on a second call.
    assert M.frechet_distance(x, "train") == got


def test_fd_of_a_set_with_itself_is_zero(test_split):
    x = test_split.x
    scale = float(np.trace(np.cov(M.digits_features(x), rowvar=False)))
    assert abs(M.frechet_distance(x, ref=x)) < 1e-6 * scale


def test_fd_grows_with_pixel_noise(test_split):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(test_split.x.shape, generator=g)
    fds = [M.frechet_distance((test_split.x + s * z).clamp(0, 1)) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


# ---------------------------------------------------------------------------------------------
# class coverage

def test_coverage_of_test_split_and_of_one_digit(test_split):
    cov = M.class_coverage(test_split.x)
    assert cov["classes_hit"] == 10 and cov["kl_uniform"] < 0.05
    one = test_split.x[:1].repeat(100, 1, 1, 1)
    cov = M.class_coverage(one)
    assert cov["classes_hit"] == 1
    assert cov["kl_uniform"] == pytest.approx(math.log(10), abs=1e-12)  # KL(delta || uniform)


def test_coverage_threshold_and_kl_closed_form(test_split):
    pred = M.predict_classes(test_split.x)
    a = test_split.x[pred == 0][:1]
    b = test_split.x[pred == 1][:1]
    # 50/50 over two classes: KL = log 10 - log 2 = log 5.
    cov = M.class_coverage(torch.cat([a.repeat(50, 1, 1, 1), b.repeat(50, 1, 1, 1)]))
    assert cov["classes_hit"] == 2 and cov["kl_uniform"] == pytest.approx(math.log(5), abs=1e-12)
    # One stray sample in 100 (1% < MIN_CLASS_SHARE = 2%) is not coverage.
    cov = M.class_coverage(torch.cat([a.repeat(99, 1, 1, 1), b]))
    assert cov["classes_hit"] == 1
    assert M.class_coverage(torch.cat([a.repeat(99, 1, 1, 1), b]), min_share=0.01)["classes_hit"] == 2
    with pytest.raises(ValueError, match="min_share"):
        M.class_coverage(test_split.x, min_share=0.0)


# ---------------------------------------------------------------------------------------------
# MMD and sliced Wasserstein on Gaussians, where both have closed forms

def _mmd2_gauss(delta2, s2, sigma, d=2):
    """MMD^2 of N(mu1, s2 I) vs N(mu2, s2 I), kernel exp(-|a-b|^2/(2 sigma^2)); |mu1-mu2|^2 = delta2."""
    c = (sigma**2 / (sigma**2 + 2 * s2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-delta2 / (2 * (sigma**2 + 2 * s2))))


def test_mmd_unbiased_and_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    bw = (0.5, 1.0, 2.0)
    shift = torch.tensor([1.0, 0.0])
    same, shifted = [], []
    for _ in range(30):
        x, y, z = (torch.randn(150, 2, generator=g) for _ in range(3))
        same.append(M.mmd_rbf(x, y, bandwidths=bw))
        shifted.append(M.mmd_rbf(x, z + shift, bandwidths=bw))
    same, shifted = np.array(same), np.array(shifted)
    # Unbiased estimator: the mean of replicates is 0 / the closed form within 4 standard errors.
    se = lambda v: v.std(ddof=1) / len(v) ** 0.5
    assert abs(same.mean()) < 4 * se(same)
    want = sum(_mmd2_gauss(1.0, 1.0, s) for s in bw)
    assert abs(shifted.mean() - want) < 4 * se(shifted)
    assert shifted.mean() > 10 * abs(same.mean()) and want > 0.1


def test_mmd_median_bandwidth_and_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 2, generator=g), torch.randn(30, 2, generator=g) + 0.5
    sig = M.median_bandwidth(y)
    bw = [m * sig for m in M.MEDIAN_MULTIPLIERS]
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b).square() / (2 * s**2)) for s in bw).double()
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    brute = ((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum())
             / (n * (n - 1)) - 2 * kxy.mean())
    assert M.mmd_rbf(x, y) == pytest.approx(float(brute), rel=1e-5)


def test_sliced_wasserstein_closed_form():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g)
    delta = torch.tensor([2.0, 0.0])
    same = M.sliced_wasserstein(x, y, n_projections=500, seed=0)
    shifted = M.sliced_wasserstein(x, y + delta, n_projections=500, seed=0)
    # SW_2^2 = E_theta[(theta . delta)^2] = |delta|^2 / d for shifted equal Gaussians.
    assert shifted == pytest.approx(2.0 / math.sqrt(2), rel=0.05)
    # Same law: only finite-sample error, O(n^-1/2) per direction.
    assert same < 0.1


def test_class_mix_split_separates_proportions_from_shapes(train_split):
    pred = M.predict_classes(train_split.x)
    # Real train digits with two thirds of the 8s dropped: every image is real, only the class
    # mix is off, so resampling to the train shares must remove most of the FD.
    keep = (pred != 8) | (torch.arange(len(pred)) % 3 == 0)
    x = train_split.x[keep]
    out = M.class_mix_split(x, "train", seed=0)
    p = torch.bincount(pred[keep], minlength=10).double() / int(keep.sum())
    q = torch.bincount(pred, minlength=10).double() / len(pred)
    assert out["class_shares"] == pytest.approx(p.tolist(), abs=1e-12)
    assert out["ref_shares"] == pytest.approx(q.tolist(), abs=1e-12)
    assert out["kl_ref"] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-10)
    assert out["fd"] == pytest.approx(M.frechet_distance(x), rel=1e-9)
    assert out["fd_balanced"] < 0.5 * out["fd"], out
    # The reference itself: no class-mix error at all.
    same = M.class_mix_split(train_split.x, "train", seed=0)
    assert same["kl_ref"] == pytest.approx(0.0, abs=1e-12) and same["fd"] < 1e-3
    one = train_split.x[pred == 3][:50]
    with pytest.raises(ValueError, match=r"no sample is classified as \[0, 1, 2, 4"):
        M.class_mix_split(one)


# ---------------------------------------------------------------------------------------------
# evaluate and calibration order

def test_evaluate_digits_and_ordering(test_split, train_split):
    fit = M.fit_class_gaussian(train_split.x, train_split.labels)
    n = len(test_split)
    mediocre = M.sample_class_gaussian(n, fit, torch.Generator().manual_seed(0))
    bad = M.sample_pixel_gaussian(n, train_split.x, torch.Generator().manual_seed(0))
    floor = M.evaluate(test_split.x, "digits", seed=0)
    mid = M.evaluate(mediocre, "digits", seed=0)
    worst = M.evaluate(bad, "digits", seed=0)
    assert set(floor) == {"n", "fd", "classes_hit", "kl_uniform", "c2st", "precision", "recall",
                          "c2st_pixels", "c2st_features", "zero_frac", "border_lit"}
    assert floor["n"] == n
    assert floor["fd"] < mid["fd"] < worst["fd"]
    assert floor["c2st"] < mid["c2st"] < worst["c2st"]
    assert abs(floor["c2st"] - 0.5) < 0.1  # held-out real digits are indistinguishable
    # held-out real digits pass the trees on both spaces (4 sd of Binomial(2n, 1/2) / 2n) ...
    bound = 4 * 0.5 / math.sqrt(2 * n)
    assert abs(floor["c2st_pixels"] - 0.5) < bound and abs(floor["c2st_features"] - 0.5) < bound
    # ... the Gaussians fail on pixels; diversity (recall) orders the three
    assert mid["c2st_pixels"] > 0.95 and worst["c2st_pixels"] > 0.95
    assert floor["recall"] > mid["recall"] > worst["recall"]
    assert worst["precision"] < min(floor["precision"], mid["precision"])


def test_evaluate_toy2d_with_fake_module(monkeypatch):
    class FakeToy:
        def sample(self, n, generator):
            return torch.randn(n, 2, generator=generator)

    fake = types.ModuleType("fastsample.data.toy2d")
    fake.get_toy = lambda name: FakeToy()
    monkeypatch.setitem(sys.modules, "fastsample.data.toy2d", fake)
    monkeypatch.setattr(fdata, "toy2d", fake, raising=False)
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(7))
    good = M.evaluate(x, "toy2d:gauss")
    far = M.evaluate(x + 3.0, "toy2d:gauss")
    assert set(good) == {"n", "mmd", "swd"}
    assert far["mmd"] > 20 * abs(good["mmd"]) and far["swd"] > 10 * good["swd"]


# ---------------------------------------------------------------------------------------------
# improved precision / recall (k-NN manifolds)

def test_precision_recall_identical_and_far_apart():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    assert M.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert M.precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}
    # duplicating every sample changes neither manifold's coverage
    assert M.precision_recall(x, torch.cat([x, x])) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_of_a_subset():
    """Every sample of a subset lies on its superset (distance 0 to itself): precision 1 for
    the subset as samples, recall 1 for the subset as reference; the other side loses."""
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(1))
    sub = x[:40]
    as_fake, as_real = M.precision_recall(x, sub), M.precision_recall(sub, x)
    assert as_fake["precision"] == 1.0 and as_real["recall"] == 1.0
    assert as_fake["recall"] < 1.0 and as_real["precision"] < 1.0


def test_precision_recall_closed_form_on_a_line():
    """Real points 0..9 on a line, k = 1: every real ball has radius 1, so of the samples
    -3, 4.5, 20 only 4.5 is inside (precision 1/3). The samples' own radii are 7.5, 7.5, 15.5
    (balls [-10.5, 4.5], [-3, 12], [4.5, 35.5]), which cover every real point (recall 1).
    k = 2: real radii 2 (1 ... 8) and 2 at the ends, the samples' 23, 15.5, 23: same answer."""
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[-3.0], [4.5], [20.0]])
    assert M.precision_recall(real, fake, k=1) == pytest.approx({"precision": 1 / 3, "recall": 1.0})
    assert M.precision_recall(real, fake, k=2) == pytest.approx({"precision": 1 / 3, "recall": 1.0})
    assert M.knn_radii(real.double(), 1).tolist() == [1.0] * 10
    assert M.knn_radii(fake.double(), 1).tolist() == [7.5, 7.5, 15.5]


@pytest.mark.parametrize("real, fake, k, match", [
    (torch.randn(10, 3), torch.full((10, 3), float("nan")), 3, "NaN"),
    (torch.randn(10, 3), torch.randn(10, 4), 3, r"\(N, 3\)"),
    (torch.randn(10), torch.randn(10), 3, r"\(N, D\)"),
    (torch.randn(3, 2), torch.randn(10, 2), 3, "more than 3 real"),
    (torch.randn(10, 2), torch.randn(2, 2), 3, "at least 2|more than 3 fake"),
    (torch.randn(10, 2), torch.randn(10, 2), 0, "k must be"),
])
def test_precision_recall_bad_inputs(real, fake, k, match):
    with pytest.raises(ValueError, match=match):
        M.precision_recall(real, fake, k=k)


# ---------------------------------------------------------------------------------------------
# held-out boosted-trees C2ST

def test_c2st_heldout_same_distribution_is_chance():
    """Two draws of one distribution: held-out accuracy ~ Binomial(2n, 1/2) / 2n, within 4 sd
    on each seed, and the seeds' mean within 4 sd of the mean's own spread."""
    n, accs = 500, []
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        a, b = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        accs.append(M.c2st_heldout(a, b, seed=seed))
    sd = 0.5 / math.sqrt(2 * n)
    assert all(abs(a - 0.5) < 4 * sd for a in accs), accs
    assert abs(np.mean(accs) - 0.5) < 4 * sd / math.sqrt(len(accs)), accs


def test_c2st_heldout_separable_is_one():
    a = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    b = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) + 100.0
    # trees bin each feature by the fitted half's quantiles, so a held-out row beyond every
    # training value can still land on the wrong side of a leaf now and then: ~1, not exactly 1
    assert M.c2st_heldout(a, b) > 0.99


def test_c2st_heldout_bad_inputs():
    a = torch.randn(100, 4)
    with pytest.raises(ValueError, match=f"at least {M.C2ST_MIN}"):
        M.c2st_heldout(a, torch.randn(M.C2ST_MIN - 1, 4))
    with pytest.raises(ValueError, match="NaN"):
        M.c2st_heldout(a, torch.full((100, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        M.c2st_heldout(a, torch.randn(100, 5))


def test_strong_c2st_sees_what_the_logistic_one_misses(train_split):
    """Real digits with one lit pixel in a border column (a defect like the DDGAN's speckle)
    keep the classifier's features nearly intact; trees on raw pixels see it at once."""
    x = train_split.x[:700].clone()
    rows = torch.randint(0, 8, (len(x),), generator=torch.Generator().manual_seed(0))
    x[torch.arange(len(x)), 0, rows, 0] = 0.5
    strong = M.digits_c2st_strong(x, train_split.x[700:])
    assert strong["c2st_pixels"] > 0.95
    assert M.c2st(x, train_split.x[700:]) < strong["c2st_pixels"] - 0.2


def test_background_stats_count_zeros_and_lit_border_pixels(train_split):
    """Hand-built images: the counts are exact. Real digits read the data's own shares, and a
    speckle of one lit border pixel per image moves border_lit by exactly 1/16."""
    x = torch.zeros(4, 1, 8, 8)
    x[0, 0, 3, 0] = 1.0               # one lit border pixel (column 0)
    x[1, 0, 5, 7] = 2 / 16            # one in column 7, on a level
    x[2, 0, 4, 4] = 0.03              # under the first threshold 1/17 of dequantised values: 0
    x[3, 0, 2, 3] = 0.5               # lit, but not in a border column
    st = M.background_stats(x)
    assert st["zero_frac"] == (256 - 3) / 256
    assert st["border_lit"] == 2 / 64
    real = M.background_stats(train_split.x)
    assert 0.45 < real["zero_frac"] < 0.53 and 0.005 < real["border_lit"] < 0.03
    y = train_split.x.clone()
    zero_rows = (M.quantize_digits(y[:, 0, :, 0]) == 0)
    pick = zero_rows.float().argmax(1)           # the first unlit row of column 0, per image
    has = zero_rows.any(1)
    y[has.nonzero()[:, 0], 0, pick[has], 0] = 0.5
    moved = M.background_stats(y)["border_lit"] - real["border_lit"]
    assert abs(moved - float(has.float().mean()) / 16) < 1e-6
    with pytest.raises(ValueError, match="NaN"):
        M.background_stats(torch.full((4, 1, 8, 8), float("nan")))


# ---------------------------------------------------------------------------------------------
# bad inputs

@pytest.mark.parametrize("bad, match", [
    (torch.rand(10, 8, 8), r"\(N, 1, 8, 8\)"),
    (torch.rand(10, 3, 8, 8), r"\(N, 1, 8, 8\)"),
    (torch.rand(1, 1, 8, 8), "at least 2"),
    (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
    (torch.full((4, 1, 8, 8), float("inf")), "NaN/inf"),
    (torch.randint(0, 255, (4, 1, 8, 8)), "dtype"),
    (torch.rand(4, 1, 8, 8) * 255, "wrong scale"),
    (torch.rand(4, 1, 8, 8) * 2 - 1, "wrong scale"),
])
def test_bad_digits_inputs(bad, match):
    for fn in (M.frechet_distance, M.class_coverage, lambda s: M.evaluate(s, "digits"),
               M.digits_precision_recall, M.digits_c2st_strong):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_slight_overshoot_is_clamped(test_split):
    x = test_split.x[:50]
    loose = x * 1.2 - 0.1  # within DIGITS_RANGE_SLACK of [0,1]
    assert torch.equal(M.check_digits(loose), loose.clamp(0, 1))


def test_bad_metric_arguments(test_split):
    x, y = torch.randn(20, 2), torch.randn(20, 2)
    with pytest.raises(ValueError, match="ref"):
        M.frechet_distance(test_split.x, ref="val")
    with pytest.raises(ValueError, match="bandwidths"):
        M.mmd_rbf(x, y, bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match="bandwidths"):
        M.mmd_rbf(x, y, bandwidths="silverman")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        M.mmd_rbf(x, torch.randn(20, 3))
    with pytest.raises(ValueError, match="NaN"):
        M.sliced_wasserstein(x, torch.full((20, 2), float("nan")))
    with pytest.raises(ValueError, match="n_projections"):
        M.sliced_wasserstein(x, y, n_projections=0)
    with pytest.raises(ValueError, match="evaluate supports"):
        M.evaluate(test_split.x, "npz:/tmp/x.npz")
    with pytest.raises(ValueError, match="allowed forms"):
        M.evaluate(test_split.x, "cifar")
    with pytest.raises(ValueError, match="at least"):
        M.c2st(test_split.x[:6])


def test_cli_help(capsys):
    for argv in (["--help"], ["train-classifier", "--help"], ["calibrate", "--help"]):
        with pytest.raises(SystemExit) as e:
            M.main(argv)
        assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# ddgan_z_usage (a diagnostic of a DDGAN generator; moved here from fastsample.models.ddgan).

class _ZModel:
    """A stand-in DDGAN Model for ddgan_z_usage: G = scale * z broadcast over pixels (or 0)."""

    def __init__(self, scale: float, T: int = 4):
        from fastsample.models import ddgan
        self.T, self.z_dim = T, 3
        self.schedule = ddgan.schedule_of(ddgan.Config(T=T))
        self.scale = scale

    def denoise(self, x_i, z, i):
        return self.scale * z[:, :1, None, None].expand_as(x_i)


def test_ddgan_z_usage_matches_closed_forms():
    """Oracles: one reference point has posterior variance 0; two points a, b at the pure-noise
    step (alpha_bar ~ 4e-5) have weights ~1/2 each, so Var = ||a - b||^2 / 4; a G that ignores
    z has generator_var 0 and one that outputs s * z_1 on every pixel has 64 s^2."""
    a, b = -torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    x0 = a.expand(200, 1, 8, 8).clone()
    one = M.ddgan_z_usage(_ZModel(0.0), x0, a, draws=4)
    assert [r["i"] for r in one] == [1, 2, 3, 4]
    assert all(r["posterior_var"] < 1e-9 and r["generator_var"] == 0.0 for r in one)
    # G = 0 and E[x0|x_i] = a exactly: the mean error is ||a||^2 = 64.
    assert all(abs(r["mean_err"] - 64.0) < 1e-6 for r in one)
    two = M.ddgan_z_usage(_ZModel(0.5), x0, torch.cat([a, b]), draws=400)
    assert two[-1]["posterior_var"] == pytest.approx((b - a).pow(2).sum().item() / 4, rel=0.02)
    assert two[0]["posterior_var"] < 1e-3          # i = 1: the two points are told apart
    assert all(r["generator_var"] == pytest.approx(64 * 0.25, rel=0.15) for r in two)


def test_posterior_log_weights_are_bayes_rule():
    g = torch.Generator().manual_seed(0)
    centres, x_i = torch.randn(3, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    sqrt_ab = torch.tensor([0.99, 0.7, 0.3, 0.05])
    w = torch.softmax(M.posterior_log_weights(x_i, sqrt_ab, centres), dim=1)
    sab, c, x = sqrt_ab.double(), centres.flatten(1).double(), x_i.flatten(1).double()
    sd = (1 - sab ** 2).sqrt()
    ref = torch.stack([torch.distributions.Normal(sab[m] * c, sd[m]).log_prob(x[m]).sum(1)
                       for m in range(4)])
    torch.testing.assert_close(w, torch.softmax(ref, dim=1))
