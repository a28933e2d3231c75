"""DDGAN family: config, data-space maps, training step on the shared loop (toy2d and 8x8
digits), checkpoint round trip, exact resume, the T-mismatch error and the grid25 mode count."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from fastsample.data import Dataset, dequantize_digits, load_dataset
from fastsample.data.toy2d import grid25
from fastsample.metrics import grid25_modes, sliced_wasserstein
from fastsample.models import ddgan, load_model, make_config
from fastsample.nets import MLPConfig
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
    with pytest.raises(ValueError, match=r"ddgan Config: DDGANSchedule.t_power"):
        ddgan.Config(t_power=0.0)
    with pytest.raises(ValueError, match="dequantize"):
        ddgan.Config(dequantize="no")
    assert make_config("ddgan", digits, {"dequantize": "false"}).dequantize is False
    warped = make_config("ddgan", toy, {"t_power": "2"})
    assert warped.t_power == 2.0 and ddgan.schedule_of(warped).t_power == 2.0


# The released presets, every field, so any drift shows (grid25's changed with its sharp-mode
# recipe, docs/grid25.md).
_DIGITS_PRESET = {
    "T": 4, "z_dim": 32, "arch": "unet", "base_ch": 32, "disc_base_ch": 32,
    "disc_ch_mult": (1, 2, 2), "disc_mbstd": 4, "cond_group": 0, "hidden": 128, "num_layers": 4,
    "lr_g": 0.00016, "lr_d": 0.000125, "beta1": 0.5, "beta2": 0.9, "lr_min_frac": 0.1,
    "r1_gamma": 0.02, "lazy_reg": 15, "eps": 0.001, "beta_min": 0.1, "beta_max": 20.0,
    "t_power": 1.0, "eval_samples": 1000, "train_steps": 8000, "batch_size": 64,
    "ema_decay": 0.999, "grad_clip": 0.0, "dequantize": True, "skip_sigma_data": 0.0,
    "div_weight": 0.0, "div_tau": 1.0, "es_weight": 5.0, "es_beta": 1.0, "tex_weight": 0.0, "tex_levels": 17, "tex_max_step": 1, "disc_input_max_step": 0, "disc_input_levels": 0,
    "input_features": 0, "input_scale": 1.0, "disc_input_features": 0, "disc_input_scale": 1.0}
_GRID25_PRESET = {
    "T": 4, "z_dim": 8, "arch": "mlp", "base_ch": 32, "disc_base_ch": 32,
    "disc_ch_mult": (1, 2, 2), "disc_mbstd": 0, "cond_group": 0, "hidden": 128, "num_layers": 4,
    "lr_g": 0.0005, "lr_d": 0.001, "beta1": 0.5, "beta2": 0.9, "lr_min_frac": 0.1,
    "r1_gamma": 0.005, "lazy_reg": 1, "eps": 0.001, "beta_min": 0.1, "beta_max": 20.0,
    "t_power": 3.0, "eval_samples": 1000, "train_steps": 12000, "batch_size": 256,
    "ema_decay": 0.995, "grad_clip": 1.0, "dequantize": True, "skip_sigma_data": 0.0,
    "div_weight": 0.0, "div_tau": 1.0, "es_weight": 0.0, "es_beta": 1.0, "tex_weight": 0.0, "tex_levels": 17, "tex_max_step": 1, "disc_input_max_step": 0, "disc_input_levels": 0,
    "input_features": 64, "input_scale": 2.0, "disc_input_features": 64, "disc_input_scale": 2.0}


def test_presets_are_unchanged_and_config_defaults_are_the_image_preset(toy, digits):
    assert dataclasses.asdict(ddgan.default_config(digits)) == _DIGITS_PRESET
    assert ddgan.default_config(digits) == ddgan.Config(**_DIGITS_PRESET)
    assert dataclasses.asdict(ddgan.default_config(toy)) == _GRID25_PRESET
    assert ddgan.default_config(toy) == ddgan.Config(**_GRID25_PRESET)
    # The dataclass defaults are the image preset but for D's minibatch-std feature (off unless
    # asked for: the 2D MLP critic has none) and G's energy-score term (off, so that the latent
    # DDGAN, whose Config inherits these defaults, keeps the recipe it was released with).
    assert ddgan.default_config(digits) == dataclasses.replace(ddgan.Config(), disc_mbstd=4,
                                                               es_weight=5.0)


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


def test_cli_trains_on_exact_grey_levels_when_the_config_says_so(capsys):
    from fastsample.cli import main

    def dequantized(*args):
        assert main(["train", "--model", "ddgan", "--out", "unused", "--dry-run", *args]) == 0
        return json.loads(capsys.readouterr().out)["dequantize"]

    assert dequantized("--data", "digits", "--set", "dequantize=true") is True
    assert dequantized("--data", "digits", "--set", "dequantize=false") is False
    assert dequantized("--data", "toy2d:grid25") is False          # points are never dequantised
    exact = batch_sampler(load_dataset("digits"), dequantize=False)(64, torch.Generator().manual_seed(0))
    assert torch.equal(exact * 16, torch.round(exact * 16))          # levels k/16, no noise


def test_digits_to_data_inverts_the_binning(digits):
    y = dequantize_digits(digits.x[:50], torch.Generator().manual_seed(0))
    x_model = ddgan.to_model(y, "image")
    assert float(x_model.min()) >= -1 and float(x_model.max()) < 1
    back = ddgan.to_data(x_model, "image", "digits")
    torch.testing.assert_close(back, digits.x[:50], rtol=0, atol=1e-6)


def test_grid25_modes_oracle():
    mix = grid25().mixture
    g = torch.Generator().manual_seed(0)
    out = grid25_modes(mix.sample(5000, g))
    assert out["modes_hit"] == 25
    # 2-D isotropic Gaussian: P(|n| < 3 std) = 1 - exp(-4.5).
    p = 1 - math.exp(-4.5)
    assert abs(out["within_3std"] - p) < 5 * math.sqrt(p * (1 - p) / 5000)
    keep = mix.means[:20].float()
    x = keep[torch.randint(20, (2000,), generator=g)]
    assert grid25_modes(x)["modes_hit"] == 20
    # Pearson's chi-square of 25 multinomial counts: mean 24 (df), std sqrt(48).
    chi = [grid25_modes(mix.sample(2000, torch.Generator().manual_seed(s)))["chi2"] for s in range(20)]
    assert abs(sum(chi) / 20 - 24) < 4 * math.sqrt(48 / 20)
    # All samples in one mode: counts (2000, 0, ...): chi2 = 24 * 2000.
    assert grid25_modes(mix.means[:1].float().repeat(2000, 1))["chi2"] == pytest.approx(24 * 2000)


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
    sampler noise streams; 500 clear it). This checks the step and the loop, so it trains the
    quick-moving pre-grid25-recipe settings: the released recipe (R1 0.005, t_power 3, input
    features) needs thousands of steps, and tests/test_release_quality.py checks its result."""
    cfg = dataclasses.replace(ddgan.default_config(toy), r1_gamma=0.05, t_power=1.0,
                              input_features=0, disc_input_features=0)
    truth = grid25().sample(1000, torch.Generator().manual_seed(9))
    untrained = ddgan.Model(cfg, "toy2d:grid25", "points", (2,))
    x0, _ = S.sample(untrained, "posterior", 4, 1000, seed=0)
    before = sliced_wasserstein(x0, truth)
    _train(toy, tmp_path, steps=500, cfg=cfg, batch=128, ema=0.9)
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


def _card_with(**extra) -> tuple[dict, dict]:
    """A tiny points model's state dict and a card whose config carries `extra` keys."""
    cfg = ddgan.Config(arch="mlp", z_dim=4, hidden=16, num_layers=2)
    model = ddgan.Model(cfg, "toy2d:grid25", "points", (2,))
    conf = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    card = {"dataset": "toy2d:grid25",
            "net_config": {"config": {**conf, **extra}, "kind": "points", "data_shape": [2]}}
    return model.generator.state_dict(), card


def test_from_checkpoint_drops_removed_fields_at_their_off_values():
    """Cards written while Config had ds_weight / ds_cap (training-only, removed) still load
    when those hold the off value (ds_cap is inert then, whatever its value); cond_group 0, from
    the same cards, is today's off value again."""
    sd, plain = _card_with()
    ref = ddgan.Model.from_checkpoint(sd, plain)
    for extra in ({"cond_group": 0, "ds_weight": 0.0, "ds_cap": 0.5},
                  {"cond_group": 0, "ds_weight": 0, "ds_cap": 0.25}, {"ds_cap": 3.0}):
        _, card = _card_with(**extra)
        model = ddgan.Model.from_checkpoint(sd, card)
        assert model.cfg == ref.cfg
        for k, v in model.generator.state_dict().items():
            assert torch.equal(v, sd[k])


@pytest.mark.parametrize("key,value", [("ds_weight", 0.1)])
def test_from_checkpoint_refuses_removed_features_that_were_on(key, value):
    sd, card = _card_with(**{key: value, "ds_cap": 0.25})
    with pytest.raises(ValueError, match=rf"config\.{key} = {value}: this checkpoint was "
                                         rf"trained with {key}, a feature removed"):
        ddgan.Model.from_checkpoint(sd, card)


def test_released_cards_load():
    """The released ddgan cards (checkpoints/*/ddgan.json) load with this Config."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    paths = sorted(root.glob("*/ddgan.safetensors"))
    assert paths
    for p in paths:
        model, card = load_model(p)
        assert model.cfg.T == card.sde_config["T"]


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


# ---------------------------------------------------------------------------------------------
# Conditional groups (cond_group): D's minibatch std sees the spread of p(x_{i-1} | x_i).

class _Ctx:
    """The few StepContext draws `_grouped_real` uses, from one seeded generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(shape, generator=self.g)

    def rand(self, *shape, dtype=torch.float32):
        return torch.rand(shape, generator=self.g, dtype=dtype)

    def randint(self, high, *shape):
        return torch.randint(high, shape, generator=self.g)


def test_grouped_reals_are_draws_of_the_exact_denoising_posterior(toy):
    """Each group shares x_i and i; its extra rows are draws from p(x_{i-1} | x_i) of the
    training set, which for grid25 data is (up to the 4096-row sample) the mixture's exact
    posterior: 255 draws per group have its mean within the sampling error, and where its
    components are apart (i <= 2) the draws' mode shares match its weights and their spread
    around each mode its component std."""
    K, M = 256, 16
    cfg = dataclasses.replace(ddgan.default_config(toy), disc_mbstd=K, cond_group=K,
                              batch_size=K * M)
    fam = ddgan.Family(toy, cfg)
    x_prev, x_i, i, _ = fam._grouped_real(_Ctx(0), toy.x[:K * M])
    assert x_prev.shape == x_i.shape == (K * M, 2) and i.shape == (K * M,)
    mix = grid25().mixture
    tvs, ratios, z_means = [], [], []
    for m in range(M):
        rows = slice(m * K, (m + 1) * K)
        assert torch.equal(x_i[rows], x_i[m * K].expand(K, 2))
        assert torch.equal(i[rows], i[m * K].expand(K))
        post = mix.ddgan_denoising_posterior(x_i[m * K].double(), int(i[m * K]), fam.schedule)
        draws = x_prev[m * K + 1:(m + 1) * K].double()
        w = post.weights[:, None]
        mean = (w * post.means).sum(0)
        var = (w * (post.means.pow(2) + post.stds[:, None] ** 2)).sum(0) - mean.pow(2)
        z_means.append(((draws.mean(0) - mean) / (var / len(draws)).sqrt()).abs().max())
        if post.stds[0] < 0.1:                       # i <= 2: modes 0.7 apart, stds <= 0.07
            near = torch.cdist(draws, post.means).argmin(1)
            share = torch.bincount(near, minlength=25).double() / len(draws)
            tvs.append(0.5 * float((share - post.weights).abs().sum()))
            resid = draws - post.means[near]
            ratios.append(float(resid.pow(2).mean().sqrt() / post.stds[0]))
    assert len(tvs) >= 3 and len(tvs) < M                     # both kinds of step were drawn
    assert max(z_means) < 4.5, z_means
    # 255 draws over a handful of live modes: sampling alone moves the TV by ~0.05.
    assert max(tvs) < 0.15, tvs
    assert all(0.8 < r < 1.25 for r in ratios), ratios


def test_cond_group_config_needs_the_mlp_mbstd_d(toy):
    base = ddgan.default_config(toy)
    with pytest.raises(ValueError, match=r"cond_group = 1; must be 0 \(off\) or an int >= 2"):
        dataclasses.replace(base, cond_group=1)
    with pytest.raises(ValueError, match="needs the MLP D"):
        dataclasses.replace(base, cond_group=4)                  # disc_mbstd 0
    with pytest.raises(ValueError, match="needs the MLP D"):
        ddgan.Config(arch="unet", disc_mbstd=4, cond_group=4)
    with pytest.raises(ValueError, match="not a multiple of cond_group = 3"):
        dataclasses.replace(base, disc_mbstd=3, cond_group=3)   # batch 256


def test_mlp_discriminator_mbstd_sees_its_group_only():
    cfg = MLPConfig(in_dim=4, out_dim=1, hidden=16, num_layers=2, time_embedding="sinusoidal",
                    time_scale=1.0, zero_init_out=False)
    torch.manual_seed(0)
    D = ddgan.MLPDiscriminator(cfg, mbstd_group=4)
    with torch.no_grad():      # the std input (~0.02 at init) weighted enough to read
        D.head[1].weight[:, -1] = torch.linspace(-100.0, 100.0, cfg.hidden)
    g = torch.Generator().manual_seed(1)
    x_prev, x_t = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = torch.ones(8)
    with torch.no_grad():
        y = D(x_prev, x_t, t)
        # Reordering rows inside a group only reorders its logits.
        p = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7])
        torch.testing.assert_close(D(x_prev[p], x_t[p], t[p]), y[p])
        # Row 4 itself unchanged, its group made identical copies of it: only the group's std
        # moved, and row 4's logit with it; group 0 is untouched.
        same = x_prev.clone(); same[5:8] = x_prev[4]
        tsame = x_t.clone(); tsame[5:8] = x_t[4]
        y2 = D(same, tsame, t)
        assert abs(float(y2[4] - y[4])) > 1e-3
        torch.testing.assert_close(y2[:4], y[:4])
        # A batch that is not a multiple of the group: groups of 1 (std feature 0), no error.
        assert D(x_prev[:6], x_t[:6], t[:6]).shape == (6,)
    plain = ddgan.MLPDiscriminator(cfg)
    assert plain.head is None and plain(x_prev, x_t, t).shape == (8,)


# ---------------------------------------------------------------------------------------------
# SkipGenerator and the image D's pixel features (issue #20 experiments).

def test_skip_generator_with_a_zero_net_is_the_gaussian_posterior_mean():
    """With F = 0, c_skip(i) x_i / sqrt(alpha_bar_i) is E[x_0 | x_i] for x_0 ~ N(0, sigma_d^2 I):
    sqrt(ab) sigma_d^2 / (ab sigma_d^2 + 1 - ab) x_i, the closed form, at every step."""
    sd = 0.7
    cfg = dataclasses.replace(ddgan.Config(arch="mlp", t_power=3.0), skip_sigma_data=sd)
    G = ddgan.make_generator(cfg, (2,))
    assert isinstance(G, ddgan.SkipGenerator)
    ab = ddgan.schedule_of(cfg).alpha_bar.double()
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in G.net.parameters():
            p.zero_()
        for i in range(1, cfg.T + 1):
            got = G(x, torch.full((7,), float(i)), torch.randn(7, cfg.z_dim)).double()
            want = ab[i].sqrt() * sd ** 2 / (ab[i] * sd ** 2 + 1 - ab[i]) * x.double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # c_out ~ sigma_i at the clean steps: F's error reaches x_0' scaled down there
    assert float(G.c_out[1]) < 0.1 * float(G.c_out[cfg.T])


def test_skip_generator_trains_saves_and_loads(toy, tmp_path):
    cfg = dataclasses.replace(ddgan.default_config(toy), skip_sigma_data=1.0)
    _train(toy, tmp_path, steps=3, cfg=cfg)
    with safe_open(str(tmp_path / "ddgan.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys and all(k.startswith("net.") for k in keys)   # the tables are not stored
    model, card = load_model(tmp_path / "ddgan.safetensors")
    assert isinstance(model.generator, ddgan.SkipGenerator) and card.config["skip_sigma_data"] == 1
    x, _ = S.sample(model, "posterior", 4, 9, seed=0)
    assert x.shape == (9, 2) and bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match="skip_sigma_data"):
        dataclasses.replace(ddgan.default_config(toy), skip_sigma_data=-1.0)
    # The step-indexed tables trace into the whole-sampler graph: export's own parity gate
    # (ONNX Runtime against eager) passes.
    pytest.importorskip("onnxruntime")
    from fastsample.export.command import main as export_main
    out = tmp_path / "onnx"
    assert export_main([str(tmp_path / "ddgan.safetensors"), "--format", "onnx", "--what",
                        "sampler", "--out", str(out), "--max-batch", "8"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["parity"]["max_abs"] < 1e-5, man["parity"]


def test_image_d_pixel_features_follow_each_value_and_validate(small_digits, tmp_path):
    from fastsample.nets.layers import PixelFourierFeatures
    f = PixelFourierFeatures(3, 2.0)
    x = torch.rand(2, 1, 8, 8)
    out = f(x)
    assert out.shape == (2, 6, 8, 8)
    torch.testing.assert_close(out[:, 0], torch.sin(2 * math.pi * x[:, 0] * f.b[0]))
    torch.testing.assert_close(out[:, 3], torch.cos(2 * math.pi * x[:, 0] * f.b[0]))
    cfg = make_config("ddgan", small_digits, {"disc_input_features": "4", "disc_input_scale": "3",
                                              "base_ch": "16", "disc_base_ch": "16"})
    D = ddgan.build_discriminator(cfg, (1, 8, 8))
    assert D.conv_in.in_channels == 2 + 8
    log = _train(small_digits, tmp_path, steps=2, cfg=cfg, batch=8)
    assert all(math.isfinite(r["loss_d"]) for r in log)
    from fastsample.nets.unet import DiscriminatorConfig
    with pytest.raises(ValueError, match="pixel_scale"):
        DiscriminatorConfig(pixel_features=2, pixel_scale=0.0)
    with pytest.raises(ValueError, match="pixel_features"):
        DiscriminatorConfig(pixel_features=-1)


def test_pixel_features_gated_by_step_reach_only_those_steps(small_digits):
    """disc_input_max_step = 1: a pair at step 2 gets the same logit as from the same D with the
    feature channels' input weights zeroed (the features then cannot matter); a pair at step 1
    does not."""
    cfg = make_config("ddgan", small_digits, {"disc_input_features": "4", "disc_input_scale": "3",
                                              "disc_input_max_step": "1", "base_ch": "16",
                                              "disc_base_ch": "16", "disc_mbstd": "0"})
    # (no minibatch std: it would mix the rows of the two steps)
    D = ddgan.build_discriminator(cfg, (1, 8, 8)).eval()
    blind = copy.deepcopy(D)
    with torch.no_grad():
        blind.conv_in.weight[:, 2:] = 0
    g = torch.Generator().manual_seed(0)
    x_prev, x_t = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([2.0, 2.0, 1.0, 1.0])
    with torch.no_grad():
        got, want = D(x_prev, x_t, t), blind(x_prev, x_t, t)
    torch.testing.assert_close(got[:2], want[:2])
    assert (got[2:] - want[2:]).abs().min() > 1e-4
    for bad, match in (({"disc_input_max_step": "5"}, "disc_input_max_step"),
                       ({"disc_input_max_step": "-1"}, "disc_input_max_step")):
        with pytest.raises(ValueError, match=match):
            make_config("ddgan", small_digits, {"disc_input_features": "4", **bad})
    with pytest.raises(ValueError, match="disc_input_features > 0"):
        make_config("ddgan", small_digits, {"disc_input_max_step": "1"})
    from fastsample.nets.unet import DiscriminatorConfig
    with pytest.raises(ValueError, match="pixel_max_t"):
        DiscriminatorConfig(pixel_features=2, pixel_max_t=-1.0)


def test_diversity_ratio_closed_forms_and_the_training_term(toy, tmp_path):
    """G = a z (z as wide as the data): the ratio is |a| on every row; a G that ignores z: 0.
    With div_weight > 0 the step logs the clipped mean, which never exceeds div_tau."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    torch.testing.assert_close(ddgan.diversity_ratio(-1.7 * z1, -1.7 * z2, z1, z2),
                               torch.full((16,), 1.7))
    c = torch.randn(16, 2, generator=g)
    assert float(ddgan.diversity_ratio(c, c, z1, z2).abs().max()) == 0.0
    cfg = dataclasses.replace(ddgan.default_config(toy), div_weight=1.0, div_tau=0.05)
    log = _train(toy, tmp_path, steps=3, cfg=cfg)
    assert all(0 <= r["div"] <= 0.05 + 1e-7 for r in log), log
    for bad in ({"div_weight": -1.0}, {"div_tau": float("nan")},
                {"div_weight": 1.0, "div_tau": 0.0}):
        with pytest.raises(ValueError, match="div_"):
            dataclasses.replace(ddgan.default_config(toy), **bad)


def test_energy_score_is_the_crps_in_one_dimension_and_proper(toy, tmp_path):
    """1-D: the two-draw energy score (beta 1) is an unbiased estimate of the CRPS, whose closed form for
    a Gaussian N(mu, s^2) at y is s (w (2 Phi(w) - 1) + 2 phi(w) - 1 / sqrt(pi)), w = (y - mu) / s.
    In 4-D its mean over y ~ N(0, I) is lowest for draws of N(0, I) itself: a collapsed G (the
    posterior mean) and an over-spread one both score worse. In training the step logs the
    mean, which the triangle inequality keeps >= 0."""
    g = torch.Generator().manual_seed(0)
    n, mu, s, y = 400_000, 0.3, 0.7, -0.4
    a = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    b = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    es = ddgan.energy_score(a, b, torch.full((n, 1), y, dtype=torch.float64))
    w = (y - mu) / s
    nd = torch.distributions.Normal(0.0, 1.0)
    crps = s * (w * (2 * float(nd.cdf(torch.tensor(w))) - 1)
                + 2 * math.exp(-w * w / 2) / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi))
    assert abs(float(es.mean()) - crps) < 4 * float(es.std()) / math.sqrt(n), (float(es.mean()), crps)

    n = 50_000
    y = torch.randn(n, 4, generator=g)
    draw = lambda scale: scale * torch.randn(n, 4, generator=g)
    score = {k: float(ddgan.energy_score(draw(k), draw(k), y).mean()) for k in (0.0, 1.0, 2.0)}
    assert score[1.0] < score[0.0] - 0.05 and score[1.0] < score[2.0] - 0.05, score
    x = torch.randn(3, 1, 2, 2, generator=g)
    assert float(ddgan.energy_score(x, x, x).abs().max()) < 1e-5

    # Any beta, 1-D, X ~ N(0, s^2), y ~ N(0, 1): E|X - y|^b - E|X - X'|^b / 2 = c ((s^2 + 1)^(b/2)
    # - (2 s^2)^(b/2) / 2), c = 2^(b/2) Gamma((b + 1) / 2) / sqrt(pi), least at s = 1.
    n, beta = 400_000, 1.8
    c = 2 ** (beta / 2) * math.gamma((beta + 1) / 2) / math.sqrt(math.pi)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for sd in (0.5, 1.0):
        a, b = (sd * torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(2))
        es = ddgan.energy_score(a, b, y, beta)
        exact = c * ((sd * sd + 1) ** (beta / 2) - 0.5 * (2 * sd * sd) ** (beta / 2))
        assert abs(float(es.mean()) - exact) < 4 * float(es.std()) / math.sqrt(n), (sd, float(es.mean()), exact)

    cfg = dataclasses.replace(ddgan.default_config(toy), es_weight=0.5, es_beta=1.5)
    log = _train(toy, tmp_path, steps=3, cfg=cfg)
    assert all(math.isfinite(r["es"]) and r["es"] >= -1e-5 for r in log), log
    with pytest.raises(ValueError, match="es_weight"):
        dataclasses.replace(ddgan.default_config(toy), es_weight=-0.1)
    for bad in (0.0, 2.0, float("nan"), True):
        with pytest.raises(ValueError, match="es_beta"):
            dataclasses.replace(ddgan.default_config(toy), es_beta=bad)


def test_texture_critic_is_local_and_trains_beside_d(small_digits, tmp_path):
    """The critic's logit at a pixel depends only on the 5 x 5 patch around it (two 3 x 3 convs);
    a run with tex_weight > 0 trains it (its own optimiser, logged losses), saves it in the
    resumable state and resumes exactly; bad settings are refused at config time."""
    torch.manual_seed(0)
    critic = ddgan.TextureCritic(1, 17)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    y = x.clone()
    y[:, :, 1, 6] = -y[:, :, 1, 6]
    changed = (critic(x) - critic(y)).abs().amax(0) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed[1, 6] and int(rows.min()) >= 0 and int(rows.max()) <= 3
    assert int(cols.min()) >= 4 and int(cols.max()) <= 7
    with pytest.raises(ValueError, match="TextureCritic"):
        critic(torch.zeros(8, 8))

    cfg = dataclasses.replace(ddgan.default_config(small_digits), base_ch=16, disc_base_ch=16,
                              div_weight=0.0, tex_weight=0.5, tex_max_step=2)
    log = _train(small_digits, tmp_path / "a", steps=4, cfg=cfg, ckpt_every=2)
    assert all(math.isfinite(r["loss_tex"]) and r["loss_tex"] > 0 and math.isfinite(r["loss_g_tex"])
               for r in log), log
    state = torch.load(tmp_path / "a" / "ddgan.state.pt", weights_only=False)
    assert "texture" in state["modules"] and "tex" in state["optimizers"]
    # Killed after step 2's checkpoint and resumed with the same settings: the same weights,
    # the critic's included, as the straight run.
    def interrupted(draw):
        calls = []

        def batch(n, g):
            calls.append(n)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return draw(n, g)
        return batch

    with pytest.raises(KeyboardInterrupt):
        _train(small_digits, tmp_path / "b", steps=4, cfg=cfg, ckpt_every=2, batches=interrupted)
    _train(small_digits, tmp_path / "b", steps=4, cfg=cfg, ckpt_every=2, resume=True)
    sb = torch.load(tmp_path / "b" / "ddgan.state.pt", weights_only=False)["modules"]
    for name in ("generator", "texture"):
        for k in state["modules"][name]:
            assert torch.equal(state["modules"][name][k], sb[name][k]), (name, k)

    for bad, match in (({"tex_weight": -1.0}, "tex_weight"), ({"tex_max_step": 0}, "tex_max_step"),
                       ({"tex_max_step": 5}, "tex_max_step"), ({"tex_levels": 1}, "tex_levels")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(ddgan.default_config(small_digits), **bad)
    with pytest.raises(ValueError, match="tex_weight"):
        ddgan.Config(arch="mlp", tex_weight=0.1)


def test_pixel_level_features_count_the_evaluators_grey_level(small_digits):
    """The number of positive ramps at a value is its grey level under the evaluator's binning
    (data.images.quantize_digits), at every value not on a boundary; the ramps are monotone,
    so no two levels look alike (the Fourier lift's aliasing)."""
    from fastsample.data.images import quantize_digits
    from fastsample.nets.layers import PixelLevelFeatures
    f = PixelLevelFeatures(17, 0.5)
    y = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))   # data space [0, 1)
    out = f(2 * y - 1)
    assert out.shape == (3, 16, 8, 8)
    level = (out > 0).sum(1, keepdim=True).float()
    torch.testing.assert_close(level / 16, quantize_digits(y))
    assert bool((out.diff(dim=1) <= 0).all())   # boundaries ascend: each ramp below the last
    cfg = make_config("ddgan", small_digits, {"disc_input_levels": "17", "disc_input_max_step": "1",
                                              "base_ch": "16", "disc_base_ch": "16"})
    assert ddgan.build_discriminator(cfg, (1, 8, 8)).conv_in.in_channels == 2 + 16
    from fastsample.nets.unet import DiscriminatorConfig
    for bad, match in (({"pixel_levels": 1}, "pixel_levels"), ({"pixel_levels": -2}, "pixel_levels"),
                       ({"pixel_levels": 17, "pixel_level_width": 0.0}, "pixel_level_width"),
                       ({"pixel_levels": 17, "pixel_features": 4}, "set one of them")):
        with pytest.raises(ValueError, match=match):
            DiscriminatorConfig(**bad)
    with pytest.raises(ValueError, match="image D"):
        dataclasses.replace(ddgan.Config(arch="mlp"), disc_input_levels=17)
