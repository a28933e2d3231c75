"""Sample-quality metrics: digits (Frechet distance in a small classifier's features, class
coverage, improved precision / recall, classifier two-sample tests) and 2D point sets (MMD^2,
sliced Wasserstein).

The Frechet distance is computed by torchmetrics' FrechetInceptionDistance with our digits
classifier as its custom feature module, so "FD" here is FID's formula (the squared Frechet
distance between Gaussians fitted to the features) in a 64-dim feature space, not Inception's.
The classifier is trained by `python -m fastsample.metrics train-classifier` on the digits train
split only; its weights and card ship in fastsample/assets/. Two C2STs: the logistic one in
those features (kept for continuity; a collapsed DDGAN passes it) and boosted trees on raw
pixels and on the features, held out (`digits_c2st_strong`), which it does not. `python -m
fastsample.metrics calibrate` measures every digits metric on real test data, noisy real data
and weak reference models; bench/metrics_calibration.py adds the DDGAN rows
(docs/metrics_calibration.md holds the table). `ddgan_z_usage` is a diagnostic of a DDGAN
generator (its use of the latent z), not a sample-quality metric.

Input rules for digits samples: shape (N,1,8,8), finite. Values are clamped to [0,1], the data
range, as displaying the samples would; values further than DIGITS_RANGE_SLACK outside [0,1] are
rejected because they mean the wrong scale ([-1,1] or 0..255), not a slightly loose sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastsample.data.images import load_digits, quantize_digits

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_FILE = "digits_classifier.safetensors"
CARD_FILE = "digits_classifier.json"
NUM_CLASSES = 10
NUM_FEATURES = 64
DIGITS_SHAPE = (1, 8, 8)
DIGITS_RANGE_SLACK = 0.5
# A class is "hit" when at least this share of the samples is classified as it: one fifth of the
# uniform share 1/10. A mode-collapsed model still leaks ~1% of samples into other classes through
# classifier errors on odd samples (the classifier errs on ~2% of real test digits), so a lower
# threshold would count those leaks as coverage.
MIN_CLASS_SHARE = 0.02
MEDIAN_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
# Reference points for toy2d evaluation come from their own stream, separate from the training data.
TOY_EVAL_SEED = 2**31 - 1
MMD_MAX_POINTS = 4096
# k of the k-NN manifolds of improved precision / recall (the paper's default).
PR_K = 3
# Fewest rows per side c2st_heldout accepts, the logistic c2st's 2 x 5 folds, so evaluate() takes
# what it took before. Trees need 20 rows per leaf: below ~40 per side they cannot split and
# read chance whatever the samples; the calibration and the bench use 360-1437.
C2ST_MIN = 10


# ---------------------------------------------------------------------------------------------
# The digits classifier whose penultimate layer is the feature space of FD and C2ST.

class DigitsClassifier(nn.Module):
    """Small CNN for (N,1,8,8) digits in [0,1]; `features` is the 64-dim penultimate layer."""

    num_features = NUM_FEATURES  # read by torchmetrics so it need not run a dummy image

    def __init__(self, width: int = 32, num_features: int = NUM_FEATURES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)              # (N, w, 8, 8)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)      # (N, 2w, 8, 8) -> pool 4x4
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)  # (N, 2w, 4, 4)
        self.fc = nn.Linear(2 * width * 16, num_features)
        self.head = nn.Linear(num_features, NUM_CLASSES)
        # Dropout on the features, training only: 1437 images overfit without it. On a held-out
        # quarter of the train split (3 seeds): p=0 -> 97.1%, p=0.3 -> 98.2%, p=0.5 -> 98.7%,
        # and p=0.5 with 80 epochs -> 99.1%.
        self.dropout = nn.Dropout(0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are centred (x - 0.5) so zero padding looks like mid-grey, not like ink.
        h = F.silu(self.conv1(x - 0.5))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))  # (N, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # logits (N, 10)


class _FeatureModule(nn.Module):
    """torchmetrics' custom `feature` module: float images in, float64 penultimate features out."""

    num_features = NUM_FEATURES

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 features make torchmetrics return FD in float64 (it casts back to feature dtype).
        return self.classifier.features(x.float()).double()


def train_classifier(seed: int = 0, epochs: int = 80, batch_size: int = 64, lr: float = 1e-3,
                     weight_decay: float = 0.05, log=print) -> tuple[DigitsClassifier, dict]:
    """AdamW, no augmentation, digits train split (split seed 0) only. Deterministic given seed.

    Hyperparameters were chosen on a held-out quarter of the train split, never on the test split.
    Runs on one CPU thread: the weights then do not depend on the machine's thread count (the
    order of float reductions does), and on a busy 2-core box it is ~10x faster than 2 threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(seed, epochs, batch_size, lr, weight_decay, log)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(seed, epochs, batch_size, lr, weight_decay, log):
    torch.manual_seed(seed)
    train = load_digits("train", seed=0)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(train.x[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == 0:
            log(f"epoch {epoch + 1:3d}/{epochs}  train loss {total / n:.4f}")
    model.eval()
    card = {
        "model": "DigitsClassifier", "num_features": NUM_FEATURES,
        "data": "digits", "split_seed": 0, "train_size": n,
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW",
        "weight_decay": weight_decay, "dropout": model.dropout.p, "augmentation": "none",
        "train_accuracy": classifier_accuracy(model, train.x, train.labels),
        "test_accuracy": classifier_accuracy(model, *_test_xy()),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__, "threads": 1,
        "command": f"python -m fastsample.metrics train-classifier --out fastsample/assets/ "
                   f"--seed {seed} --epochs {epochs}",
    }
    return model, card


def _test_xy() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_digits("test", seed=0)
    return test.x, test.labels


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == labels).float().mean())


def save_classifier(model: DigitsClassifier, card: dict, out_dir: str | Path) -> Path:
    """Write weights (card JSON in the safetensors metadata) and the card beside them, atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CLASSIFIER_FILE
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"card": json.dumps(card)})
    tmp.chmod(0o644)  # safetensors creates the file private; the asset is meant to be shipped
    tmp.replace(path)
    card_tmp = out_dir / (CARD_FILE + ".tmp")
    card_tmp.write_text(json.dumps(card, indent=2) + "\n")
    card_tmp.replace(out_dir / CARD_FILE)
    return path


_CLASSIFIERS: dict[str, DigitsClassifier] = {}


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (cached per path), in eval mode, on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSETS / CLASSIFIER_FILE
    key = str(path.resolve())
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights {str(path)!r} not found; recreate them "
                                f"with `python -m fastsample.metrics train-classifier --out "
                                f"{path.parent}`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"digits classifier file {str(path)!r} is corrupt ({e})") from e
    model = DigitsClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"digits classifier file {str(path)!r} does not hold DigitsClassifier "
                         f"weights ({str(e).splitlines()[0]})") from e
    model.eval().requires_grad_(False)
    _CLASSIFIERS[key] = model
    return model


# ---------------------------------------------------------------------------------------------
# Input checks.

def check_digits(samples, name: str = "samples") -> torch.Tensor:
    """Validate digits samples and return them float32 (N,1,8,8) clamped to [0,1] (module rules)."""
    x = torch.as_tensor(samples)
    if x.dim() != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
        raise ValueError(f"{name} must have shape (N, 1, 8, 8) for digits, got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 images, got {x.shape[0]}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0,1], got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} NaN/inf values; "
                         f"all values must be finite")
    lo, hi = float(x.min()), float(x.max())
    if lo < -DIGITS_RANGE_SLACK or hi > 1 + DIGITS_RANGE_SLACK:
        raise ValueError(f"{name} range [{lo:.4g}, {hi:.4g}] is not digits data in [0,1] (values "
                         f"within {DIGITS_RANGE_SLACK} outside it are clamped; wrong scale?)")
    return x.clamp(0.0, 1.0)


def check_points(x, name: str, dim: int | None = None) -> torch.Tensor:
    """Validate an (N,D) finite point set with N >= 2; returns float64 on CPU."""
    t = torch.as_tensor(x)
    if t.dim() != 2 or (dim is not None and t.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 points, got {t.shape[0]}")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN/inf values; "
                         f"all values must be finite")
    return t


# ---------------------------------------------------------------------------------------------
# Digits metrics.

def _reference_images(ref) -> torch.Tensor:
    if isinstance(ref, str):
        if ref not in ("train", "test", "all"):
            raise ValueError(f"ref must be 'train', 'test', 'all' or a (N,1,8,8) tensor, got {ref!r}")
        return load_digits(ref, seed=0).x
    return check_digits(ref, name="ref")


def _new_fid(classifier: DigitsClassifier):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # normalize=True: with a custom module torchmetrics passes float images through untouched.
    return FrechetInceptionDistance(feature=_FeatureModule(classifier), reset_real_features=False,
                                    normalize=True)


_FID_CACHE: dict[tuple[str, str], object] = {}


@torch.no_grad()
def frechet_distance(samples, ref="train", classifier_path: str | Path | None = None) -> float:
    """Squared Frechet distance ||mu_s - mu_r||^2 + Tr(S_s + S_r - 2 (S_s S_r)^1/2) between
    Gaussians fitted to the classifier's 64-dim features of `samples` and of `ref`.

    samples: (N,1,8,8) digits in [0,1], N >= 2. ref: "train" | "test" | "all" (digits split seed
    0; statistics cached) or a (M,1,8,8) tensor (statistics computed each call).
    """
    x = check_digits(samples)
    classifier = load_classifier(classifier_path)
    if isinstance(ref, str):
        key = (ref, str(classifier_path))
        if key not in _FID_CACHE:
            ref_x = _reference_images(ref)
            fid = _new_fid(classifier)
            fid.update(ref_x, real=True)
            _FID_CACHE[key] = fid
        fid = _FID_CACHE[key]
        fid.reset()  # keeps the real statistics (reset_real_features=False)
    else:
        fid = _new_fid(classifier)
        fid.update(_reference_images(ref), real=True)
    fid.update(x, real=False)
    return float(fid.compute())


@torch.no_grad()
def predict_classes(samples, classifier_path: str | Path | None = None) -> torch.Tensor:
    x = check_digits(samples)
    return load_classifier(classifier_path)(x).argmax(1)


def _class_shares(pred: torch.Tensor) -> torch.Tensor:
    """Share of each of the NUM_CLASSES classes among predicted labels, float64."""
    return torch.bincount(pred, minlength=NUM_CLASSES).double() / len(pred)


def class_coverage(samples, min_share: float = MIN_CLASS_SHARE,
                   classifier_path: str | Path | None = None) -> dict:
    """Histogram of predicted classes: {"classes_hit": classes with share >= min_share (0..10),
    "kl_uniform": KL(p || uniform) = sum_c p_c log(10 p_c) in nats (0 = balanced, log 10 = one class)}."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
    p = _class_shares(predict_classes(samples, classifier_path))
    nz = p[p > 0]
    kl = float((nz * torch.log(nz * NUM_CLASSES)).sum())
    return {"classes_hit": int((p >= min_share).sum()), "kl_uniform": kl}


def class_mix_split(samples, ref="train", seed: int = 0,
                    classifier_path: str | Path | None = None) -> dict:
    """Splits FD into a class-mix part and a within-class part: the predicted class shares of
    `samples` and of `ref`, kl_ref = KL(p_samples || p_ref) in nats, and fd_balanced, the FD of
    the samples resampled (with replacement, seeded) to ref's class shares. fd - fd_balanced is
    what the class mix alone costs; a GAN that gets every digit right but the proportions wrong
    shows fd_balanced << fd. Resampling repeats samples, which adds a little FD of its own."""
    x = check_digits(samples)
    y = _reference_images(ref)
    pred = predict_classes(x, classifier_path)
    p = _class_shares(pred)
    q = _class_shares(predict_classes(y, classifier_path))
    if bool((p == 0).any()):
        missing = (p == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"class_mix_split: no sample is classified as {missing}; a balanced "
                         f"resample needs every class (see class_coverage)")
    g = torch.Generator().manual_seed(seed)
    counts = torch.round(q * len(x)).long()
    rows = [torch.nonzero(pred == c)[:, 0] for c in range(NUM_CLASSES)]
    idx = torch.cat([r[torch.randint(len(r), (int(k),), generator=g)] for r, k in zip(rows, counts)])
    kl = float((p * torch.log(p / q.clamp(min=1e-12))).sum())   # every p_c > 0 here
    return {"class_shares": p.tolist(), "ref_shares": q.tolist(), "kl_ref": kl,
            "fd": frechet_distance(x, ref, classifier_path),
            "fd_balanced": frechet_distance(x[idx], ref, classifier_path)}


@torch.no_grad()
def digits_features(samples, classifier_path: str | Path | None = None) -> np.ndarray:
    x = check_digits(samples)
    return load_classifier(classifier_path).features(x).double().numpy()


def c2st(samples, ref="train", seed: int = 0, folds: int = 5,
         classifier_path: str | Path | None = None) -> float:
    """Classifier two-sample test accuracy in the classifier's features (0.5 = indistinguishable).

    n = min(len(samples), len(ref)) images are drawn from each side (seeded), labelled real/sample,
    standardised, and scored by `folds`-fold stratified cross-validated logistic regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = check_digits(samples)
    r = _reference_images(ref)
    n = min(len(x), len(r))
    if n < 2 * folds:
        raise ValueError(f"c2st needs at least {2 * folds} images per side for {folds}-fold "
                         f"cross-validation, got {n}")
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:n]]
    r = r[torch.randperm(len(r), generator=g)[:n]]
    feats = np.concatenate([digits_features(r, classifier_path), digits_features(x, classifier_path)])
    y = np.concatenate([np.zeros(n), np.ones(n)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, feats, y, cv=cv, scoring="accuracy").mean())


# ---------------------------------------------------------------------------------------------
# Fidelity and diversity apart: improved precision and recall (Kynkaanniemi et al. 2019).
#
# A set of feature vectors Phi stands for a manifold: the union of the balls B(phi, NND_k(phi)),
# NND_k(phi) being the distance from phi to its k-th nearest neighbour in Phi (itself excluded).
# precision = share of generated phi_g inside manifold(Phi_real)   (are samples realistic?)
# recall    = share of real phi_r inside manifold(Phi_generated)   (is the data covered?)
# (paper eqs. 1-3). A point lies in its own ball (radius >= 0), so a set has precision and
# recall 1 against itself. Both depend on the set sizes, so digits sets are subsampled to
# equal size first, as the paper compares them.

def knn_radii(x: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """NND_k of every row of x (N, D) within x, itself excluded; float64 (N,)."""
    out = []
    for i in range(0, len(x), block):
        d = torch.cdist(x[i:i + block], x)                         # (B, N)
        # k + 1 smallest: the row's own distance 0 comes first; duplicates of a row also read 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def manifold_share(query: torch.Tensor, support: torch.Tensor, k: int,
                   block: int = 2048) -> float:
    """Share of the rows of query (M, D) inside the k-NN manifold of support (N, D)."""
    r = knn_radii(support, k, block)
    inside = [(torch.cdist(query[i:i + block], support) <= r[None]).any(1)
              for i in range(0, len(query), block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = PR_K) -> dict:
    """Improved precision and recall of `fake` (M, D) against `real` (N, D) in the space of the
    rows themselves (features, or raw pixels flattened): {"precision", "recall"} in [0, 1]."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    real = check_points(real, "real")
    fake = check_points(fake, "fake", dim=real.shape[1])
    for name, t in (("real", real), ("fake", fake)):
        if len(t) <= k:
            raise ValueError(f"precision_recall with k={k} needs more than {k} {name} points "
                             f"(a k-th neighbour besides the point itself), got {len(t)}")
    return {"precision": manifold_share(fake, real, k), "recall": manifold_share(real, fake, k)}


def digits_precision_recall(samples, ref="train", k: int = PR_K, seed: int = 0,
                            classifier_path: str | Path | None = None) -> dict:
    """precision_recall in the classifier's 64-dim features, n = min(len(samples), len(ref))
    images drawn (seeded) from each side."""
    x = check_digits(samples)
    r = _reference_images(ref)
    x, r = _equal_subsets(x, r, seed)
    return precision_recall(digits_features(r, classifier_path),
                            digits_features(x, classifier_path), k)


def _equal_subsets(x: torch.Tensor, r: torch.Tensor, seed: int):
    n = min(len(x), len(r))
    g = torch.Generator().manual_seed(seed)
    return (x[torch.randperm(len(x), generator=g)[:n]], r[torch.randperm(len(r), generator=g)[:n]])


# ---------------------------------------------------------------------------------------------
# A two-sample test a collapsed generator cannot pass: gradient-boosted trees, held out.
#
# The logistic C2ST above sees only what is linear in the classifier's features, and those
# features were trained to tell digits apart, not to notice speckled backgrounds or missing
# stroke variation: the released DDGAN reads ~0.50 there while boosted trees on raw pixels
# tell it from data ~97% of the time. Trees split on single pixels (border ink, exact zeros)
# and their interactions, and are cheap at this size (~1-3 s per space on one core).

def c2st_heldout(a, b, seed: int = 0) -> float:
    """Held-out accuracy of gradient-boosted trees telling the rows of a (N, D) from those of b.

    n = min(N, M) rows per side (seeded); the 2n rows are split in two stratified halves; a
    classifier trained on each half predicts the other, so every row is scored once by a model
    that never saw it. Under H0 (same distribution) the accuracy is ~ Binomial(2n, 1/2) / 2n:
    0.5 +- 1/(2 sqrt(2n)); 1 = perfectly separable."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    a = check_points(a, "a")
    b = check_points(b, "b", dim=a.shape[1])
    n = min(len(a), len(b))
    if n < C2ST_MIN:
        raise ValueError(f"c2st_heldout needs at least {C2ST_MIN} rows per side, got {n}")
    a, b = _equal_subsets(a, b, seed)
    X = torch.cat([a, b]).numpy()
    y = np.concatenate([np.zeros(n), np.ones(n)])
    correct = 0
    # One OpenMP thread: on a shared CPU the trees' spinning worker threads ran ~50x slower
    # than one thread (87 s vs 1.5 s for 2 x 500 rows on 2 busy cores); this size needs no more.
    with threadpool_limits(limits=1):
        for fit, held in StratifiedKFold(2, shuffle=True, random_state=seed).split(X, y):
            clf = HistGradientBoostingClassifier(max_iter=200, random_state=seed)
            correct += int((clf.fit(X[fit], y[fit]).predict(X[held]) == y[held]).sum())
    return correct / (2 * n)


BORDER_COLUMNS = (0, 7)


def background_stats(samples) -> dict:
    """{"zero_frac", "border_lit"}: the share of pixels at level 0, and of lit (level > 0)
    pixels in the two border columns, after mapping the samples to the 17 digits levels
    (`quantize_digits`, which leaves samples already on the levels unchanged). Issue #20's
    speckle check: the train split reads ~0.49 / ~0.014; a generator that imitates the
    dequantisation noise too coarsely lights the border and empties the zeros."""
    k = quantize_digits(check_digits(samples))
    return {"zero_frac": float((k == 0).float().mean()),
            "border_lit": float((k[..., list(BORDER_COLUMNS)] > 0).float().mean())}


def digits_c2st_strong(samples, ref="train", seed: int = 0,
                       classifier_path: str | Path | None = None) -> dict:
    """c2st_heldout on raw pixels (64 values) and on the classifier's 64 features:
    {"c2st_pixels", "c2st_features"}."""
    x = check_digits(samples)
    r = _reference_images(ref)
    return {"c2st_pixels": c2st_heldout(r.flatten(1), x.flatten(1), seed),
            "c2st_features": c2st_heldout(digits_features(r, classifier_path),
                                          digits_features(x, classifier_path), seed)}


# ---------------------------------------------------------------------------------------------
# 2D point-set metrics.

def median_bandwidth(y: torch.Tensor, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance within (the first max_points of) y."""
    y = y[:max_points]
    d = torch.cdist(y, y)
    iu = torch.triu_indices(len(y), len(y), offset=1)
    return float(d[iu[0], iu[1]].median())


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, sigmas: torch.Tensor, block: int = 2048) -> float:
    """sum_{i,j} sum_s exp(-|a_i - b_j|^2 / (2 sigma_s^2)), in row blocks to bound memory."""
    total = 0.0
    for i in range(0, len(a), block):
        d2 = torch.cdist(a[i:i + block], b).square()  # (B, M)
        total += float(torch.exp(-d2[..., None] / (2 * sigmas.square())).sum())
    return total


def mmd_rbf(x, y, bandwidths: str | Sequence[float] = "median") -> float:
    """Unbiased MMD^2 between point sets x (m,D) and y (n,D) with the kernel
    k(a,b) = sum_s exp(-|a-b|^2 / (2 sigma_s^2)) (a sum of Gaussians over bandwidths sigma_s).

    bandwidths: positive floats, or "median": sigma_med * (1/4, 1/2, 1, 2, 4) where sigma_med is
    the median pairwise distance within y, so with y the reference the kernel does not depend on
    the model being scored. The unbiased estimate drops i == j terms and can be slightly negative.
    """
    x = check_points(x, "x")
    y = check_points(y, "y", dim=x.shape[1])
    if isinstance(bandwidths, str):
        if bandwidths != "median":
            raise ValueError(f"bandwidths must be 'median' or a sequence of positive floats, "
                             f"got {bandwidths!r}")
        sigma_med = median_bandwidth(y)
        if sigma_med <= 0:
            raise ValueError("y has median pairwise distance 0; pass explicit bandwidths")
        sigmas = torch.tensor([m * sigma_med for m in MEDIAN_MULTIPLIERS], dtype=torch.float64)
    else:
        sigmas = torch.as_tensor(list(bandwidths), dtype=torch.float64)
        if sigmas.numel() == 0 or not torch.isfinite(sigmas).all() or (sigmas <= 0).any():
            raise ValueError(f"bandwidths must be a non-empty sequence of positive finite floats, "
                             f"got {list(bandwidths)!r}")
    m, n, S = len(x), len(y), len(sigmas)
    # k(a,a) = 1 per bandwidth, so the i == j terms of a same-set sum add exactly len * S.
    k_xx = (_kernel_sum(x, x, sigmas) - m * S) / (m * (m - 1))
    k_yy = (_kernel_sum(y, y, sigmas) - n * S) / (n * (n - 1))
    k_xy = _kernel_sum(x, y, sigmas) / (m * n)
    return k_xx + k_yy - 2 * k_xy


def sliced_wasserstein(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (POT: sqrt of the mean over random directions of W_2^2)."""
    import ot

    x = check_points(x, "x")
    y = check_points(y, "y", dim=x.shape[1])
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    return float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=n_projections,
                                                p=2, seed=seed))


# ---------------------------------------------------------------------------------------------
# Diagnostics (not sample-quality metrics).

@torch.no_grad()
def ddgan_z_usage(model, x0: torch.Tensor, ref: torch.Tensor, draws: int = 16,
                  seed: int = 0) -> list[dict]:
    """Diagnostic for a DDGAN generator: how much of the denoising distribution's spread G
    produces from its latent z, per step i (a DDGAN Model, or anything with its T, z_dim,
    schedule and denoise(x_i, z, i)).

    For each i: x_i ~ q(x_i | x_0) from the rows of `x0` (model space), then
    - posterior_var: E ||x_0 - E[x_0 | x_i]||^2 under the empirical distribution of `ref`
      (model space), by Bayes' rule over its rows: the spread a perfect p(x_0 | x_i) has;
    - generator_var: E sum_pixels Var_z G(x_i, z, i), over `draws` latents per x_i;
    - mean_err: E ||E_z G(x_i, z, i) - E[x_0 | x_i]||^2.
    generator_var << posterior_var means G ignores z: the multimodal p(x_{i-1} | x_i) the
    paper's argument rests on is then a point mass plus the posterior noise.
    """
    g = torch.Generator().manual_seed(seed)
    R = ref.flatten(1).double()
    rows = []
    for i in range(1, model.T + 1):
        ab = float(model.schedule.alpha_bar[i])
        x_i = model.schedule.q_sample(x0, i, torch.randn(x0.shape, generator=g))
        w = torch.softmax(posterior_log_weights(x_i, torch.full((len(x0),), ab ** 0.5), R),
                          dim=1)
        mean = w @ R
        pvar = (w * R.pow(2).sum(1)[None]).sum(1) - mean.pow(2).sum(1)
        t = torch.full((len(x0),), float(i))
        outs = torch.stack([model.denoise(x_i, torch.randn(len(x0), model.z_dim, generator=g), t)
                            for _ in range(draws)]).flatten(2).double()
        rows.append({"i": i, "alpha_bar": ab, "posterior_var": float(pvar.clamp(min=0).mean()),
                     "generator_var": float(outs.var(0).sum(1).mean()),
                     "mean_err": float((outs.mean(0) - mean).pow(2).sum(1).mean())})
    return rows


def posterior_log_weights(x_i: torch.Tensor, sqrt_ab: torch.Tensor,
                           centres: torch.Tensor) -> torch.Tensor:
    """log p(row j | x_i) up to a per-row constant, for data = the rows `centres` (R, ...):
    x_i = sqrt_ab c_j + noise of variance 1 - ab (Bayes' rule, exact).
    x_i (M, ...), sqrt_ab (M,) -> (M, R) float64."""
    s = sqrt_ab.double()
    var = 1.0 - s ** 2
    # ||x - s c|| = s ||x / s - c||: one (M, R) cdist, no (M, R, D) stack of scaled centres.
    d = torch.cdist(x_i.flatten(1).double() / s[:, None], centres.flatten(1).double()) * s[:, None]
    return -d.pow(2) / (2.0 * var[:, None])


# ---------------------------------------------------------------------------------------------
# grid25: are the 25 sharp modes there, each with its share?

def grid25_modes(x, min_share: float = 0.2) -> dict:
    """grid25 mode statistics of samples x (n, 2), each sample assigned to its nearest mean:
    modes_hit, the modes holding at least min_share of the uniform share n/25; within_3std, the
    share of samples within 3 component stds of their mean (sharpness: 98.9% for exact samples);
    chi2, Pearson's chi-square of the 25 counts against n/25 (~24 +- 7 for exact samples);
    min_mode_share, the smallest count over n/25."""
    from fastsample.data.toy2d import grid25  # lazy: data sits beside metrics in layer 1

    x = check_points(x, "samples", dim=2)
    mix = grid25().mixture
    means, std = mix.means.float(), float(mix.stds[0])
    dist, k = torch.cdist(x.float(), means).min(dim=1)
    counts = torch.bincount(k, minlength=len(means)).double()
    expected = len(x) / len(means)
    return {"modes_hit": int((counts >= min_share * expected).sum()),
            "within_3std": float((dist < 3 * std).float().mean()),
            "chi2": float(((counts - expected) ** 2 / expected).sum()),
            "min_mode_share": float(counts.min() / expected)}


# ---------------------------------------------------------------------------------------------
# One call per data set.

def evaluate(samples, data_spec: str, seed: int = 0) -> dict:
    """Metrics suited to the data: digits -> n, fd, classes_hit, kl_uniform, c2st (logistic, in
    features), precision, recall (k = PR_K, in features), c2st_pixels, c2st_features (boosted
    trees, held out), all vs the train split, and zero_frac, border_lit (`background_stats`);
    toy2d:NAME -> n, mmd (on at most MMD_MAX_POINTS of each side), swd, against as many fresh exact
    samples of the toy as there are samples; grid25 adds grid25_modes."""
    from fastsample.data import parse_spec

    source, arg = parse_spec(data_spec)
    if source == "digits":
        x = check_digits(samples)
        return {"n": len(x), "fd": frechet_distance(x, "train"), **class_coverage(x),
                "c2st": c2st(x, "train", seed=seed),
                **digits_precision_recall(x, "train", seed=seed),
                **digits_c2st_strong(x, "train", seed=seed), **background_stats(x)}
    if source == "toy2d":
        from fastsample.data import toy2d  # lazy: written in parallel, may be absent

        x = check_points(samples, "samples", dim=2)
        y = toy2d.get_toy(arg).sample(len(x), torch.Generator().manual_seed(TOY_EVAL_SEED))
        y = check_points(y, f"toy2d:{arg} reference", dim=2)
        k = MMD_MAX_POINTS
        out = {"n": len(x), "mmd": mmd_rbf(x[:k], y[:k]), "swd": sliced_wasserstein(x, y, seed=seed)}
        return {**out, **grid25_modes(x)} if arg == "grid25" else out
    raise ValueError(f"evaluate supports 'digits' and 'toy2d:NAME', got {data_spec!r} "
                     f"(there is no feature network for {source!r} data)")


# ---------------------------------------------------------------------------------------------
# Calibration: what the digits metrics read for real data and for two weak reference models.

def fit_class_gaussian(x: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-3):
    """Per class c: mean mu_c, full covariance Sigma_c + ridge I, class prior pi_c (frequencies)."""
    flat = x.flatten(1).double()  # (N, 64)
    classes = torch.unique(labels)
    mu = torch.stack([flat[labels == c].mean(0) for c in classes])
    L = torch.stack([torch.linalg.cholesky(torch.cov(flat[labels == c].T)
                                           + ridge * torch.eye(flat.shape[1], dtype=torch.float64))
                     for c in classes])
    pi = torch.stack([(labels == c).double().mean() for c in classes])
    return mu, L, pi


def sample_class_gaussian(n: int, fit, generator: torch.Generator) -> torch.Tensor:
    """The "mediocre model": class c ~ pi, x = mu_c + L_c z, clipped to [0,1]; (n,1,8,8) float32."""
    mu, L, pi = fit
    c = torch.multinomial(pi, n, replacement=True, generator=generator)
    z = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64)
    flat = mu[c] + (L[c] @ z[..., None])[..., 0]
    return flat.clamp(0, 1).float().reshape(n, *DIGITS_SHAPE)


def sample_pixel_gaussian(n: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The "bad model": every pixel independent N(mean, var) of the train pixels, clipped to [0,1]."""
    flat = x.flatten(1).double()
    mu, sd = flat.mean(0), flat.std(0)
    z = torch.randn(n, flat.shape[1], generator=generator, dtype=torch.float64)
    return (mu + sd * z).clamp(0, 1).float().reshape(n, *DIGITS_SHAPE)


def sample_noisy_real(x: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Real images plus N(0, noise^2) per pixel, re-quantised to the digits levels as every
    model's output is (a continuous image would be told from data by its grey levels alone)."""
    y = x + noise * torch.randn(x.shape, generator=generator)
    return quantize_digits(y.clamp(0.0, 1.0))


# Reference sets, weakest last: (name, n or None for a fixed real set, sampler(n, seed)).
NOISE_LEVELS = (0.03, 0.1)
CALIBRATION_KEYS = ("fd", "c2st", "precision", "recall", "c2st_pixels", "c2st_features",
                    "classes_hit", "kl_uniform")


def reference_sets(seed: int, sizes: Sequence[int] = (360, 2000)) -> list[tuple[str, torch.Tensor]]:
    """The calibration's data-only reference sets at `seed`: the test split (floor), the test
    split with pixel noise (NOISE_LEVELS, in [0,1] units), the class-conditional Gaussian raw
    and quantised like a model's output, and the per-pixel Gaussian."""
    train = load_digits("train", seed=0)
    test = load_digits("test", seed=0)
    fit = fit_class_gaussian(train.x, train.labels)
    sets = [("a: test split (floor)", test.x)]
    for noise in NOISE_LEVELS:
        g = torch.Generator().manual_seed(seed)
        sets.append((f"a{noise:g}: test split + noise {noise:g}",
                     sample_noisy_real(test.x, noise, g)))
    for n in sizes:
        g = torch.Generator().manual_seed(seed)
        xb = sample_class_gaussian(n, fit, g)
        sets.append(("b: class Gaussian (mediocre)", xb))
        sets.append(("bq: class Gaussian, quantised", quantize_digits(xb)))
        g = torch.Generator().manual_seed(seed)
        sets.append(("c: pixel Gaussian (bad)", sample_pixel_gaussian(n, train.x, g)))
    return sets


def calibrate(seeds: Sequence[int] = (0, 1, 2), sizes: Sequence[int] = (360, 2000), log=print,
              extra=None) -> list[dict]:
    """Rows {model, n, seed, <evaluate's digits metrics>} for reference_sets(seed) and, when
    given, extra(seed) -> [(name, samples)] (models, which this layer cannot import); all
    against the train split."""
    rows = []
    for seed in seeds:
        sets = reference_sets(seed, sizes) + (list(extra(seed)) if extra else [])
        for model, x in sets:
            t0 = time.perf_counter()
            row = {"model": model, "n": len(x), "seed": seed, **evaluate(x, "digits", seed=seed),
                   "seconds": round(time.perf_counter() - t0, 1)}
            log(json.dumps(row))
            rows.append(row)
    return rows


def calibration_table(rows: list[dict], keys: Sequence[str] = CALIBRATION_KEYS) -> str:
    """Markdown table of mean ± std over seeds per (model, n), in the rows' order."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["n"]), []).append(r)
    lines = ["| model | n | seeds | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for (model, n), rs in groups.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rs], dtype=np.float64)
            cells.append(f"{v.mean():.4g} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2g}")
        lines.append(f"| {model} | {n} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI: python -m fastsample.metrics train-classifier | calibrate

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsample.metrics",
                                description="Train the digits feature classifier, or calibrate the "
                                            "digits metrics on real data and reference models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="train the digits classifier on the train split")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for weights + card")
    t.add_argument("--seed", type=int, default=0, help="init and shuffling seed (default 0)")
    t.add_argument("--epochs", type=int, default=80, help="passes over the train split (default 80)")
    c = sub.add_parser("calibrate", help="metrics of the test split (clean and noisy) / class "
                                         "Gaussian / pixel Gaussian")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    c.add_argument("--sizes", type=int, nargs="+", default=[360, 2000],
                   help="sample counts for the Gaussian models (default: 360 2000)")
    c.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    ns = p.parse_args(argv)
    if ns.command == "train-classifier":
        if ns.epochs < 1:
            p.error(f"--epochs must be >= 1, got {ns.epochs}")
        model, card = train_classifier(seed=ns.seed, epochs=ns.epochs)
        path = save_classifier(model, card, ns.out)
        print(f"wrote {path}: test accuracy {card['test_accuracy']:.4f} "
              f"(train {card['train_accuracy']:.4f}, {card['wall_seconds']} s)")
        return 0
    rows = calibrate(seeds=ns.seeds, sizes=ns.sizes, log=lambda s: print(s, file=sys.stderr))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(calibration_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
