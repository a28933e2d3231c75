"""DDGAN family: config, data-space maps, training step on the shared loop (toy2d and 8x8
digits), checkpoint round trip, exact resume, the T-mismatch error and the grid25 mode count."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from fastsample.data import Dataset, dequantize_digits, load_dataset
from fastsample.data.toy2d import grid25
from fastsample.metrics import sliced_wasserstein
from fastsample.models import ddgan, load_model, make_config
from fastsample.samplers import ddgan as S
from fastsample.sde import ddgan_schedule
from fastsample.train import TrainConfig, train
from fastsample.train.batches import batch_sampler


pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


@pytest.fixture(scope="module")
def toy():
    x = grid25().sample(4096, torch.Generator().manual_seed(0))
    return Dataset(name="toy2d:grid25", kind="points", x=x, labels=None, split="train")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small_digits(digits):
    """64 digits: enough for a few training steps."""
    return Dataset(name="digits", kind="image", x=digits.x[:64], labels=digits.labels[:64],
                   split="train")


def _train(data, out, steps, cfg=None, resume=False, ckpt_every=500, batch=32, ema=0.9,
           family=ddgan.Family, batches=None):
    """`batches` wraps the data's batch source (e.g. to interrupt the run)."""
    cfg = cfg or ddgan.default_config(data)
    fam = family(data, cfg)
    tcfg = TrainConfig(steps=steps, batch_size=batch, ema_decay=ema, progress=False, log_every=1,
                       ckpt_every=ckpt_every)
    draw = batch_sampler(data, dequantize=data.kind == "image")
    train(fam, batches(draw) if batches else draw, tcfg, out, resume=resume)
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Config and spaces.

def test_config_defaults_and_validation(toy, digits):
    assert ddgan.default_config(digits).arch == "unet"
    assert ddgan.default_config(toy).arch == "mlp"
    assert ddgan.default_config(toy).T == 4
    assert make_config("ddgan", toy, {"T": "2"}).T == 2
    with pytest.raises(ValueError, match=r"Config.T = 0; must be an int >= 1"):
        ddgan.Config(T=0)
    with pytest.raises(ValueError, match=r"Config.arch = 'cnn'; choose one of unet\|mlp"):
        ddgan.Config(arch="cnn")
    with pytest.raises(ValueError, match="beta1"):
        ddgan.Config(beta1=1.0)
    with pytest.raises(ValueError, match="does not fit points data; use 'mlp'"):
        ddgan.Family(toy, ddgan.Config(arch="unet"))
    with pytest.raises(ValueError, match=r"Config.grad_clip = -1.0; must be >= 0"):
        ddgan.Config(grad_clip=-1.0)
    with pytest.raises(ValueError, match=r"Config.ds_weight = -1.0; must be >= 0"):
        ddgan.Config(ds_weight=-1.0)
    with pytest.raises(ValueError, match=r"Config.ds_cap = 0.0; must be > 0"):
        ddgan.Config(ds_cap=0.0)
    with pytest.raises(ValueError, match=r"ddgan Config: DDGANSchedule.t_power"):
        ddgan.Config(t_power=0.0)
    warped = make_config("ddgan", toy, {"t_power": "2"})
    assert warped.t_power == 2.0 and ddgan.schedule_of(warped).t_power == 2.0


def test_cli_takes_grad_clip_from_the_family_config(capsys):
    """The digits GAN trains unclipped (the loop's clip at 1 held D back); --set overrides it and
    the 2D toy keeps the loop's clip."""
    from fastsample.cli import main

    def train_cfg(*args):
        assert main(["train", "--model", "ddgan", "--out", "unused", "--dry-run", *args]) == 0
        return json.loads(capsys.readouterr().out)["train"]

    assert train_cfg("--data", "digits")["grad_clip"] == 0.0
    assert train_cfg("--data", "digits", "--set", "grad_clip=0.5")["grad_clip"] == 0.5
    assert train_cfg("--data", "toy2d:grid25")["grad_clip"] == 1.0


def test_digits_to_data_inverts_the_binning(digits):
    y = dequantize_digits(digits.x[:50], torch.Generator().manual_seed(0))
    x_model = ddgan.to_model(y, "image")
    assert float(x_model.min()) >= -1 and float(x_model.max()) < 1
    back = ddgan.to_data(x_model, "image", "digits")
    torch.testing.assert_close(back, digits.x[:50], rtol=0, atol=1e-6)


def test_grid25_modes_oracle():
    mix = grid25().mixture
    g = torch.Generator().manual_seed(0)
    out = ddgan.grid25_modes(mix.sample(5000, g))
    assert out["modes_hit"] == 25
    # 2-D isotropic Gaussian: P(|n| < 3 std) = 1 - exp(-4.5).
    p = 1 - math.exp(-4.5)
    assert abs(out["within_3std"] - p) < 5 * math.sqrt(p * (1 - p) / 5000)
    keep = mix.means[:20].float()
    x = keep[torch.randint(20, (2000,), generator=g)]
    assert ddgan.grid25_modes(x)["modes_hit"] == 20


# ---------------------------------------------------------------------------------------------
# Training on the shared loop.

def test_train_toy2d_smoke_checkpoint_and_sampling(toy, tmp_path):
    log = _train(toy, tmp_path, steps=6)
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:
        for k in ("loss_d", "loss_d_real", "loss_d_fake", "loss_g", "r1"):
            assert math.isfinite(r[k]), (k, r)
    ckpt = tmp_path / "ddgan.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        keys = list(f.keys())
    # Only the generator is released, without a prefix; D stays in the training state.
    gen = ddgan.build_generator(ddgan.generator_config(ddgan.default_config(toy), (2,)))
    assert sorted(keys) == sorted(gen.state_dict())
    model, card = load_model(ckpt)
    assert card.family == "ddgan" and card.dataset == "toy2d:grid25"
    assert card.sde_config["T"] == 4
    x, nfe = S.sample(model, "posterior", 4, 33, seed=0, batch=10)
    assert x.shape == (33, 2) and x.dtype == torch.float32 and nfe == 4
    assert bool(torch.isfinite(x).all())
    y, _ = S.sample(model, "posterior", 4, 33, seed=0, batch=10)
    assert torch.equal(x, y)


def test_train_digits_smoke(small_digits, tmp_path):
    small = small_digits
    cfg = make_config("ddgan", small, {"lazy_reg": "2", "base_ch": "16", "disc_base_ch": "16",
                                       "t_power": "1.5"})
    log = _train(small, tmp_path, steps=2, cfg=cfg, batch=8)
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in log)
    assert "r1" in log[1] and "r1" not in log[0]   # lazy R1 on every 2nd step
    model, card = load_model(tmp_path / "ddgan.safetensors")
    # The warped grid travels in the card: the loaded sampler uses the tables it was trained on.
    assert card.sde_config["t_power"] == 1.5
    assert torch.equal(model.schedule.alpha_bar, ddgan_schedule(4, t_power=1.5).alpha_bar)
    x, nfe = S.sample(model, "posterior", 4, 5, seed=1)
    assert x.shape == (5, 1, 8, 8) and nfe == 4
    levels = x * 16
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_exact_resume(toy, tmp_path):
    """A 6-step run interrupted after its step-3 checkpoint and resumed with the same settings
    (so the same lr schedule) ends where an uninterrupted run ends."""
    a, b = tmp_path / "a", tmp_path / "b"
    _train(toy, a, steps=6)

    def interrupted(draw):
        calls = []

        def batch(n, g):
            calls.append(n)
            if len(calls) == 4:
                raise KeyboardInterrupt  # the kill, after step 3's checkpoint
            return draw(n, g)
        return batch

    with pytest.raises(KeyboardInterrupt):
        _train(toy, b, steps=6, ckpt_every=3, batches=interrupted)
    _train(toy, b, steps=6, ckpt_every=3, resume=True)
    sa, sb = (torch.load(p / "ddgan.state.pt", weights_only=False)["modules"] for p in (a, b))
    for name in ("generator", "discriminator"):
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), (name, k)


def test_short_training_moves_samples_toward_data(toy, tmp_path):
    """Untrained G outputs 0, so every sample sits at the origin; a few hundred steps must cut
    the sliced Wasserstein distance to the data (300 steps sat right at the 0.6 bar for some
    sampler noise streams; 500 clear it)."""
    cfg = ddgan.default_config(toy)
    truth = grid25().sample(1000, torch.Generator().manual_seed(9))
    untrained = ddgan.Model(cfg, "toy2d:grid25", "points", (2,))
    x0, _ = S.sample(untrained, "posterior", 4, 1000, seed=0)
    before = sliced_wasserstein(x0, truth)
    _train(toy, tmp_path, steps=500, batch=128, ema=0.9)
    model, _ = load_model(tmp_path / "ddgan.safetensors")
    x1, _ = S.sample(model, "posterior", 4, 1000, seed=0)
    after = sliced_wasserstein(x1, truth)
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# Errors.

def test_sampler_errors():
    model = ddgan.Model(ddgan.Config(arch="mlp", z_dim=4), "toy2d:grid25", "points", (2,))
    with pytest.raises(ValueError, match="trained with T=4; --steps must be 4, got 2"):
        S.sample(model, "posterior", 2, 8, seed=0)
    with pytest.raises(ValueError, match="unknown sampler 'ode' for family ddgan; choose posterior"):
        S.sample(model, "ode", 4, 8, seed=0)
    with pytest.raises(ValueError, match="steps must be an int"):
        S.sample(model, "posterior", 0, 8, seed=0)
    with pytest.raises(ValueError, match="num must be an int"):
        S.sample(model, "posterior", 4, 0, seed=0)
    with pytest.raises(ValueError, match="takes no options"):
        S.sample(model, "posterior", 4, 8, seed=0, schedule="quadratic")


def test_from_checkpoint_bad_card():
    with pytest.raises(ValueError, match="format 1.*lacks"):
        ddgan.Model.from_checkpoint({}, {"net_config": {"kind": "points"}, "dataset": "toy2d:grid25"})


def _d_steps_seen(small, tmp_path, mbstd: int) -> list[torch.Tensor]:
    """The step index t of every D call over 3 training steps (a recording wrapper around D)."""
    cfg = make_config("ddgan", small, {"base_ch": "16", "disc_base_ch": "16",
                                       "disc_mbstd": str(mbstd)})
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, x_prev, x_t, t):
            seen.append(t.detach().clone())
            return self.d(x_prev, x_t, t)

    class Fam(ddgan.Family):
        def modules(self):
            mods = super().modules()
            mods["discriminator"] = Recording(mods["discriminator"])
            return mods

    _train(small, tmp_path, steps=3, cfg=cfg, family=Fam)
    return seen


def test_mbstd_groups_see_one_step_index(small_digits, tmp_path):
    """With a minibatch-std D the batch is ordered by i, so a consecutive group of 4 holds (at
    most a boundary aside) one noise level, and real and fake halves are ordered alike."""
    seen = _d_steps_seen(small_digits, tmp_path / "mbstd", mbstd=4)
    assert len(seen) == 6                           # per step: D on [real; fake], then D on fake
    for t in seen:
        halves = t.view(-1, 32) if len(t) == 64 else t.view(1, -1)
        for h in halves:
            assert torch.equal(h, h.sort().values)
        assert torch.equal(halves[0], halves[-1])
    # Control: without mbstd the draw order is kept (so the check above can fail).
    plain = _d_steps_seen(small_digits, tmp_path / "plain", mbstd=0)
    assert any(not torch.equal(t, t.sort().values) for t in plain)


def test_cosine_lr_spans_the_runs_steps(small_digits, tmp_path):
    """The lr decay follows the run's --steps, not the config's default train_steps (8000 for
    digits): after 3 of 3 steps the lr is the cosine value at (3 - 1) / 3."""
    from fastsample import checkpoint as ck
    small = small_digits
    cfg = make_config("ddgan", small, {"base_ch": "16", "disc_base_ch": "16"})
    assert cfg.train_steps == 8000
    _train(small, tmp_path, steps=3, cfg=cfg, batch=8)
    state = ck.load_training_state(ck.training_state_path(tmp_path / "ddgan.safetensors"))
    scale = cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    for name, lr in (("gen", cfg.lr_g), ("disc", cfg.lr_d)):
        got = state["optimizers"][name]["param_groups"][0]["lr"]
        assert got == pytest.approx(lr * scale, rel=1e-9)


def _z_spread(G, x_i: torch.Tensor, i: int, z_dim: int) -> float:
    """Mean |x_0'(z1) - x_0'(z2)| per pixel over a batch of fixed x_i."""
    g = torch.Generator().manual_seed(7)
    t = torch.full((len(x_i),), float(i))
    with torch.no_grad():
        a = G(x_i, t, torch.randn(len(x_i), z_dim, generator=g))
        b = G(x_i, t, torch.randn(len(x_i), z_dim, generator=g))
    return float((a - b).abs().mean())


def test_diversity_term_makes_the_generator_use_z(small_digits, tmp_path):
    """ds_weight > 0 lifts x_0''s dependence on z (the failure it exists for: a conditional G
    that ignores its latent); the same run without it stays near z-blind. The logged ratio is
    the term's own measure."""
    from fastsample import checkpoint as ck
    spreads = {}
    for w in (0.0, 5.0):
        # A high G lr so that 15 steps show the effect (z enters through a 3-layer mapping).
        cfg = dataclasses.replace(ddgan.default_config(small_digits), ds_weight=w, lr_g=2e-3)
        out = tmp_path / f"w{w}"
        log = _train(small_digits, out, 15, cfg=cfg, ema=0.0)
        assert ("ds_ratio" in log[-1]) == (w > 0)
        if w > 0:   # 0 at step 1 exactly: the U-Net's output conv starts at zero
            ratios = [r["ds_ratio"] for r in log if "ds_ratio" in r]
            assert all(math.isfinite(r) and r >= 0 for r in ratios) and ratios[-1] > 0
        state = ck.load_training_state(ck.training_state_path(out / "ddgan.safetensors"))
        G = ddgan.build_generator(ddgan.generator_config(cfg, (1, 8, 8)))
        G.load_state_dict(state["modules"]["generator"])
        x_i = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        spreads[w] = _z_spread(G, x_i, 1, cfg.z_dim)
    assert spreads[5.0] > 3 * spreads[0.0], spreads


class _ZModel:
    """A stand-in Model for z_usage: G = scale * z broadcast over pixels (or 0)."""

    def __init__(self, scale: float, T: int = 4):
        self.T, self.z_dim = T, 3
        self.schedule = ddgan.schedule_of(ddgan.Config(T=T))
        self.scale = scale

    def denoise(self, x_i, z, i):
        return self.scale * z[:, :1, None, None].expand_as(x_i)


def test_z_usage_matches_closed_forms():
    """Oracles: one reference point has posterior variance 0; two points a, b at the pure-noise
    step (alpha_bar ~ 4e-5) have weights ~1/2 each, so Var = ||a - b||^2 / 4; a G that ignores
    z has generator_var 0 and one that outputs s * z_1 on every pixel has 64 s^2."""
    a, b = -torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    x0 = a.expand(200, 1, 8, 8).clone()
    one = ddgan.z_usage(_ZModel(0.0), x0, a, draws=4)
    assert [r["i"] for r in one] == [1, 2, 3, 4]
    assert all(r["posterior_var"] < 1e-9 and r["generator_var"] == 0.0 for r in one)
    # G = 0 and E[x0|x_i] = a exactly: the mean error is ||a||^2 = 64.
    assert all(abs(r["mean_err"] - 64.0) < 1e-6 for r in one)
    two = ddgan.z_usage(_ZModel(0.5), x0, torch.cat([a, b]), draws=400)
    assert two[-1]["posterior_var"] == pytest.approx((b - a).pow(2).sum().item() / 4, rel=0.02)
    assert two[0]["posterior_var"] < 1e-3          # i = 1: the two points are told apart
    assert all(r["generator_var"] == pytest.approx(64 * 0.25, rel=0.15) for r in two)


# ---------------------------------------------------------------------------------------------
# Conditional groups (cond_group): reals from the training set's exact p(x_{i-1} | x_i).

class _Ctx:
    """The draws a Family step takes from the loop's StepContext, from one generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(shape, generator=self.g)

    def rand(self, *shape):
        return torch.rand(shape, generator=self.g)

    def randint(self, high, *shape):
        return torch.randint(high, shape, generator=self.g)


def test_posterior_log_weights_are_bayes_rule():
    g = torch.Generator().manual_seed(0)
    centres, x_i = torch.randn(3, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    sqrt_ab = torch.tensor([0.99, 0.7, 0.3, 0.05])
    for var_u in (0.0, 0.02):
        w = torch.softmax(ddgan.posterior_log_weights(x_i, sqrt_ab, centres, var_u), dim=1)
        sab, c, x = sqrt_ab.double(), centres.flatten(1).double(), x_i.flatten(1).double()
        var = 1 - sab ** 2 + sab ** 2 * var_u
        ref = torch.stack([torch.distributions.Normal(sab[m] * c, var[m].sqrt()).log_prob(x[m])
                           .sum(1) for m in range(4)])
        torch.testing.assert_close(w, torch.softmax(ref, dim=1))


def test_sample_rows_follows_the_weights():
    p = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]])
    logw = p.log()
    # Inverse CDF at chosen points (the bin edges of row 0 are 0.2 and 0.7).
    u = torch.tensor([[0.0, 0.19, 0.21, 0.71], [0.0, 0.3, 0.6, 0.999999]])
    assert ddgan.sample_rows(logw, u).tolist() == [[0, 0, 1, 2], [1, 1, 1, 1]]
    idx = ddgan.sample_rows(logw, torch.rand(2, 40000, generator=torch.Generator().manual_seed(1)))
    freq = torch.stack([torch.bincount(r, minlength=3) for r in idx]).double() / 40000
    torch.testing.assert_close(freq, p.double(), atol=0.01, rtol=0)


def test_grouped_real_rows_are_draws_of_the_real_pair():
    """Every row of a group is a draw of the usual real pair: the extra rows' x_{i-1} has the
    anchors' distribution at each step, a group shares x_i and i, and at i = 1 (no posterior
    noise) every extra x_0 is a dequantised training row. Two training images (all 0 and all
    8/16) make p(x_0 | x_i) a point mass at i = 1 and a real mixture at i = 2, 3."""
    two = Dataset(name="digits", kind="image",
                  x=torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5)]),
                  labels=torch.tensor([0, 1]), split="train")
    cfg = dataclasses.replace(ddgan.default_config(two), cond_group=4)
    fam, ctx = ddgan.Family(two, cfg), _Ctx(0)
    N = 4 * 4000
    x0 = ddgan.to_model(dequantize_digits(two.x[torch.randint(2, (N,), generator=ctx.g)],
                                          ctx.g), "image")
    x_prev, x_i, i = fam._grouped_real(ctx, x0)
    assert x_prev.shape == x_i.shape == (N, 1, 8, 8) and i.shape == (N,)
    assert torch.equal(i, i.sort().values)
    assert torch.equal(x_i.view(-1, 4, 64), x_i.view(-1, 4, 64)[:, :1].expand(-1, 4, -1))
    assert torch.equal(i.view(-1, 4), i.view(-1, 4)[:, :1].expand(-1, 4))
    s = x_prev.flatten(1).mean(1).view(-1, 4)       # per-row mean pixel, (groups, K)
    ig = i.view(-1, 4)[:, 0]
    for step in range(1, 5):
        a, e = s[ig == step, 0], s[ig == step, 1:].flatten()
        se = (a.var() / len(a) + e.var() / len(e)).sqrt()
        assert abs(float(a.mean() - e.mean())) < 5 * float(se), step
        assert float(e.var() / a.var()) == pytest.approx(1.0, abs=0.12), step
    ones = x_prev.view(-1, 4, 64)[ig == 1, 1:]      # model space: -1 + 2 y, y in one bin
    y = (ones + 1) / 2
    level = torch.floor(y * 17)
    assert torch.all((level == 0) | (level == 8))
    assert torch.all(level == level[..., :1])       # one training row per sample
    # Control: at i = 3 the posterior is a mixture, so a group holds both images' draws.
    mix = s[ig == 3, 1:]
    assert float(mix.std(1).mean()) > 0.05


def test_cond_group_config_and_training_smoke(small_digits, tmp_path):
    with pytest.raises(ValueError, match=r"cond_group = 1; must be 0 \(off\) or an int >= 2"):
        ddgan.Config(cond_group=1)
    with pytest.raises(ValueError, match="disc_mbstd = 4"):
        ddgan.Config(cond_group=4, disc_mbstd=0)
    with pytest.raises(ValueError, match="not a multiple of cond_group"):
        ddgan.Config(cond_group=4, disc_mbstd=4, batch_size=62)
    with pytest.raises(ValueError, match="arch 'unet'"):
        ddgan.Config(cond_group=2, disc_mbstd=2, arch="mlp")
    cfg = make_config("ddgan", small_digits, {"cond_group": "4", "base_ch": "16",
                                              "disc_base_ch": "16"})
    log = _train(small_digits, tmp_path / "ok", steps=2, cfg=cfg, batch=8)
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in log)
    _, card = load_model(tmp_path / "ok" / "ddgan.safetensors")
    assert card.net_config["config"]["cond_group"] == 4
    with pytest.raises(ValueError, match=r"batch on this process \(6\) is not a multiple"):
        _train(small_digits, tmp_path / "bad", steps=1, cfg=cfg, batch=6)
