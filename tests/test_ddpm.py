"""DDPM family: config, the training objective against its closed-form minimum, training smoke
tests (toy2d and digits) through the shared loop, checkpoint round trip, data mapping."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import integrate

from fastsample import models
from fastsample.data import Dataset, load_dataset, quantize_digits
from fastsample.models import ddpm as D
from fastsample.samplers import ddpm as S
from fastsample.train import TrainConfig, train
from fastsample.train.batches import batch_sampler


# Small per-step tensors: threads only add contention on the shared CPU (conftest's fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def _points(x):
    return Dataset(name="toy2d:gauss", kind="points", x=x, labels=None, split="train")


#-----------------------------------------------------------------------------------------------
# Config.

def test_default_configs_and_overrides():
    toy = _points(torch.zeros(4, 2))
    assert D.default_config(toy).arch == "mlp"
    digits = load_dataset("digits")
    cfg = models.make_config("ddpm", digits, {"lr": "5e-4", "ch_mult": "1,2"})
    assert cfg.arch == "unet" and cfg.lr == 5e-4 and cfg.ch_mult == (1, 2)
    assert cfg.t_eps == 1e-3 and (cfg.beta_min, cfg.beta_max) == (0.1, 20.0)
    with pytest.raises(ValueError, match="unknown ddpm config field"):
        models.make_config("ddpm", digits, {"nope": "1"})
    with pytest.raises(ValueError, match="arch = 'cnn'; choose unet|mlp"):
        D.Config(arch="cnn")
    with pytest.raises(ValueError, match="t_eps = 0.0; must lie in"):
        D.Config(t_eps=0.0)
    with pytest.raises(ValueError, match="eval_sampler = 'x'"):
        D.Config(eval_sampler="x")
    with pytest.raises(ValueError, match="arch 'mlp' needs points"):
        D.net_config(D.Config(arch="mlp"), (1, 8, 8))


#-----------------------------------------------------------------------------------------------
# The objective: for Gaussian data x0 ~ N(mu, s^2 I) the optimal eps-predictor is
# E[eps | x_t] = sigma_t (x_t - m_t mu) / v_t, v_t = m_t^2 s^2 + sigma_t^2, whose per-element loss
# is 1 - sigma_t^2 / v_t; averaged over t ~ U[t_eps, 1] it is the minimum of the family's loss.

class _FakeCtx:
    """Just enough StepContext for Family.step: seeded draws, a module, a recorded loss."""

    def __init__(self, net, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.net, self.step, self.device = net, 1, torch.device("cpu")
        self.losses = []

    def rand(self, *shape):
        return torch.rand(shape, generator=self.g)

    def randn(self, *shape):
        return torch.randn(shape, generator=self.g)

    def m(self, name):
        return self.net

    def lr_scale(self, warmup, min_frac=1.0, offset=0):
        return 1.0

    def optimize(self, name, loss):
        self.losses.append(float(loss))


def test_loss_of_exact_predictor_matches_closed_form():
    mu, s = 0.3, 0.5
    cfg = D.Config(arch="mlp")
    sde = cfg.sde

    def optimal_eps(x_t, t):
        m, sigma = sde.marginal(t.double())
        m, sigma = m[:, None], sigma[:, None]
        return (sigma * (x_t.double() - m * mu) / (m * m * s * s + sigma * sigma)).float()

    fam = D.Family(_points(torch.zeros(1, 2)), cfg)
    fam.optimizers(fam.modules())
    ctx = _FakeCtx(optimal_eps)
    n = 200_000
    x0 = mu + s * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    fam.step(ctx, x0)

    def per_t(t):
        m2 = math.exp(-float(sde.int_beta(t)))
        return 1 - (1 - m2) / (m2 * s * s + 1 - m2)
    want = integrate.quad(per_t, cfg.t_eps, 1.0)[0] / (1 - cfg.t_eps)
    # Monte Carlo: per-element losses have std < 1.5, so 4 standard errors are < 0.01.
    assert ctx.losses[0] == pytest.approx(want, abs=4 * 1.5 / math.sqrt(2 * n))
    # ... and a predictor that ignores x_t is worse by E[1 - 2 ...]: the loss is 1 exactly.
    ctx0 = _FakeCtx(lambda x, t: torch.zeros_like(x))
    fam.step(ctx0, x0)
    assert ctx0.losses[0] == pytest.approx(1.0, abs=0.01) and want < 0.9


def test_images_are_trained_in_minus_one_one():
    seen = {}

    def spy(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    data = load_dataset("digits")
    fam = D.Family(data, D.Config(base_ch=16))
    fam.optimizers(fam.modules())
    ctx = _FakeCtx(spy)
    # t_eps is tiny, so at small t x_t ~ x0 = 2 y - 1: y = 0 maps to -1, y ~ 1 to ~1.
    ctx.rand = lambda *shape: torch.zeros(shape)
    fam.step(ctx, torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 16 / 17)]))
    assert (seen["t"] == 1e-3).all()
    torch.testing.assert_close(seen["x_t"][0], torch.full((1, 8, 8), -1.0), atol=0.15, rtol=0)
    torch.testing.assert_close(seen["x_t"][1], torch.full((1, 8, 8), 15 / 17), atol=0.15, rtol=0)


def test_to_data():
    cfg = D.Config()
    k = torch.arange(64) % 17                                  # every level, 64 pixels
    y = (k.float() + 0.5) / 17                                 # centre of each level's bin
    model = D.Model(D.build_net(D.net_config(cfg, (1, 8, 8))), cfg, "digits", (1, 8, 8))
    out = model.to_data((2 * y - 1).reshape(1, 1, 8, 8))
    assert out.shape == (1, 1, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out.flatten(), k.float() / 16)          # the exact inverse of the binning
    pts = D.Model(D.build_net(D.net_config(D.Config(arch="mlp"), (2,))), D.Config(arch="mlp"),
                  "toy2d:grid25", (2,))
    z = torch.randn(5, 2)
    assert torch.equal(pts.to_data(z), z)


#-----------------------------------------------------------------------------------------------
# Training through the shared loop, checkpoint round trip.

def _train(data, cfg, out, steps, batch):
    tcfg = TrainConfig(steps=steps, batch_size=batch, ema_decay=0.9, log_every=1,
                       ckpt_every=steps, progress=False)
    return train(D.Family(data, cfg), batch_sampler(data, dequantize=data.kind == "image"),
                 tcfg, out)


def _log(out):
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_toy_loss_decreases_and_checkpoint_loads(tmp_path):
    data = load_dataset("toy2d:grid25")
    cfg = D.default_config(data)
    _train(data, cfg, tmp_path, steps=200, batch=256)
    losses = [r["loss"] for r in _log(tmp_path) if "loss" in r]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)
    model, card = models.load_model(tmp_path / "ddpm.safetensors")
    assert isinstance(model, D.Model) and card.family == "ddpm" and model.shape == (2,)
    x, nfe = S.sample(model, "ddim", 10, 16, seed=0)
    assert x.shape == (16, 2) and nfe == 10 and torch.isfinite(x).all()


def test_train_digits_smoke_and_checkpoint_loads(tmp_path):
    data = load_dataset("digits")
    cfg = D.Config(base_ch=16, warmup=2)
    _train(data, cfg, tmp_path, steps=3, batch=8)
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path) if "loss" in r)
    model, card = models.load_model(tmp_path / "ddpm.safetensors")
    assert card.net_config["net"]["kind"] == "unet" and model.cfg == cfg
    x, nfe = S.sample(model, "em", 3, 4, seed=0)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    assert set((x * 16).round().unique().tolist()) <= set(range(17))


def test_from_checkpoint_rejects_foreign_card():
    class Card:
        dataset = "digits"
        net_config = {"arch": "unet"}
        sde_config = {}
    with pytest.raises(ValueError, match="not a ddpm card"):
        D.Model.from_checkpoint({}, Card())
