"""CLD model: HSM loss against its closed form for Gaussian data, training smoke tests (digits-like
8x8 and a 2D toy), fp16/bf16 autocast, checkpoint round trip, config errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fastsample.data import Dataset, load_dataset
from fastsample.models import load_model, make_config
from fastsample.models import cld as M
from fastsample.samplers import cld as S
from fastsample.sde import CLD, CLDConfig
from fastsample.train import TrainConfig, train
from fastsample.train.batches import batch_sampler

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


#-----------------------------------------------------------------------------------------------
# HSM loss oracle: x0 ~ N(0, s2 I). With the exact score, r* = E[eps_v | u_t], so the per-sample
# loss has mean E[Var(eps_v | u_t)] = d (1 - L22^2 [Sigma_u^-1]_vv) = d (1 - L22^2 Sxx / det),
# Sigma_u = the kernel covariance with s_x = s2 (eps included, as in the perturbation).

class GaussianExactNet(torch.nn.Module):
    """alpha of the exact score of the perturbed N(0, s2) data (mixed score or not)."""

    def __init__(self, cld: CLD, s2: float, mixed_score: bool):
        super().__init__()
        self.cld, self.s2, self.mixed = cld, s2, mixed_score

    def forward(self, u, t):
        d = u.shape[1] // 2
        x, v = u[:, :d].double(), u[:, d:].double()
        t64 = t.double()
        Sxx, Sxv, Svv = self.cld.covariance(t64, self.s2)
        det = Sxx * Svv - Sxv ** 2
        s = ((Sxv[:, None] * x - Sxx[:, None] * v) / det[:, None])
        if self.mixed:
            s = s + v / self.cld.sigma_ref_vv(t64)[:, None]
        return (-s / self.cld.ell(t64)[:, None]).float()


@pytest.mark.parametrize("mixed_score", [True, False])
@pytest.mark.parametrize("t_val", [0.01, 0.2, 0.9])
def test_hsm_loss_of_exact_score_matches_closed_form(mixed_score, t_val):
    cld, s2, d, n = CLD(CLDConfig()), 0.3, 2, 40000
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, d, generator=g) * math.sqrt(s2)
    eps_x, eps_v = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    # t is exactly representable in fp32 so the net's (fp32) time matches the fp64 scalars.
    t = torch.full((n,), float(torch.tensor(t_val, dtype=torch.float32)), dtype=torch.float64)
    loss = M.hsm_loss(GaussianExactNet(cld, s2, mixed_score), cld, x0, t, eps_x, eps_v,
                      mixed_score)
    Sxx, Sxv, Svv = cld.covariance(t[:1], s2)
    L22 = 1 / cld.ell(t[:1])
    expect = float(d * (1 - L22 ** 2 * Sxx / (Sxx * Svv - Sxv ** 2)))
    se = float(loss.std()) / math.sqrt(n)
    assert abs(float(loss.mean()) - expect) < 4 * se + 1e-4, (float(loss.mean()), expect, se)


def test_exact_score_minimises_the_hsm_loss():
    # Common random numbers: scaling alpha away from the exact one must raise the loss.
    cld, s2, n = CLD(CLDConfig()), 0.3, 20000
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 2, generator=g) * math.sqrt(s2)
    eps_x, eps_v = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=g, dtype=torch.float64)
    exact = GaussianExactNet(cld, s2, True)
    base = float(M.hsm_loss(exact, cld, x0, t, eps_x, eps_v, True).mean())
    for c in (0.9, 1.1):
        scaled = lambda u, tt, c=c: c * exact(u, tt)  # noqa: E731
        assert float(M.hsm_loss(scaled, cld, x0, t, eps_x, eps_v, True).mean()) > base


def test_weightings_scale_the_eps_loss():
    cld, n = CLD(CLDConfig()), 64
    g = torch.Generator().manual_seed(3)
    x0, eps_x, eps_v = (torch.randn(n, 2, generator=g) for _ in range(3))
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    net = GaussianExactNet(cld, 1.0, False)
    v2 = M.hsm_loss(net, cld, x0, t, eps_x, eps_v, False, "reweightedv2")
    v1 = M.hsm_loss(net, cld, x0, t, eps_x, eps_v, False, "reweightedv1")
    lik = M.hsm_loss(net, cld, x0, t, eps_x, eps_v, False, "likelihood")
    gb = (cld.Gamma * cld.beta(t)).float()
    torch.testing.assert_close(v1, v2 * gb)
    torch.testing.assert_close(lik, v2 * gb * (cld.ell(t) ** 2).float())


#-----------------------------------------------------------------------------------------------
# Training smoke tests.

def _digits_like(n=64) -> Dataset:
    d = load_dataset("digits", split="train")
    return Dataset(name="digits", kind="image", x=d.x[:n], labels=d.labels[:n], split="train")


def _tiny(cfg: M.Config) -> M.Config:
    return M.Config(**{**cfg.to_dict(), "data_shape": cfg.data_shape, "base_ch": 16,
                       "mlp_hidden": 32, "mlp_layers": 2, "eval_samples": 16, "eval_nfe": 4})


def _train(data, cfg, tmp_path, steps, amp="none", batch=8, log_every=1):
    tcfg = TrainConfig(steps=steps, batch_size=batch, ema_decay=cfg.ema_decay, amp=amp,
                       log_every=log_every, ckpt_every=steps, progress=False)
    fam = M.Family(data, cfg)
    train(fam, batch_sampler(data, dequantize=data.kind == "image"), tcfg, tmp_path)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if "loss" in json.loads(ln)]


def test_train_digits_few_steps_and_load_checkpoint(tmp_path):
    data = _digits_like()
    cfg = _tiny(M.default_config(data))
    assert cfg.net == "unet" and cfg.mixed_score and cfg.data_shape == (1, 8, 8)
    losses = _train(data, cfg, tmp_path, steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    model, card = load_model(tmp_path / "cld.safetensors", expect_family="cld")
    assert card.dataset == "digits" and model.config == cfg
    x, nfe = S.sample(model, "sscs", 3, 5, seed=0, device="cpu")
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and nfe == 3
    levels = x * 16
    assert torch.equal(levels, levels.round()) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_train_toy_loss_decreases_and_checkpoint_loads(tmp_path):
    data = load_dataset("toy2d:diamond", split="train")
    cfg = M.default_config(data)
    assert cfg.net == "mlp" and not cfg.mixed_score and cfg.numerical_eps == 1e-6
    cfg = M.Config(**{**cfg.to_dict(), "data_shape": (2,), "mlp_hidden": 64, "mlp_layers": 3})
    losses = _train(data, cfg, tmp_path, steps=200, batch=128)
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.8 * first, (first, last)
    model, _ = load_model(tmp_path / "cld.safetensors")
    loose = {"ode": {"rtol": 1e-2, "atol": 1e-2}}
    for name in ("sscs", "em", "ode"):
        x, nfe = S.sample(model, name, 5, 7, seed=0, device="cpu", **loose.get(name, {}))
        assert x.shape == (7, 2) and bool(torch.isfinite(x).all()) and nfe >= 2


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_autocast_training_gives_finite_losses(tmp_path, amp):
    data = _digits_like()
    cfg = _tiny(M.default_config(data))
    losses = _train(data, cfg, tmp_path, steps=3, amp=amp)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses


def test_step_draws_t_in_float64_within_loss_range():
    seen = {}

    class Ctx:
        step = 1
        device = torch.device("cpu")

        def rand(self, *shape, dtype=torch.float32):
            seen["dtype"] = dtype
            return torch.tensor([0.0, 0.5, 1.0 - 1e-16], dtype=dtype)

        def randn(self, *shape):
            return torch.zeros(shape)

        def m(self, name):
            def net(u, t):
                seen["t"] = t
                return torch.zeros(u.shape[0], u.shape[1] // 2)
            return net

        def lr_scale(self, warmup, min_frac=1.0, offset=0):
            return 1.0

        def optimize(self, name, loss):
            seen["loss"] = loss

    data = load_dataset("toy2d:diamond", split="test")
    for power in (1.0, 3.0):
        cfg = dataclasses.replace(M.default_config(data), loss_t_power=power)
        fam = M.Family(data, cfg)
        fam.optimizers(fam.modules())
        fam.step(Ctx(), data.x[:3])
        assert seen["dtype"] == torch.float64
        assert float(seen["t"].min()) == pytest.approx(1e-5) and float(seen["t"].max()) <= 1.0
        # t = eps + (1 - eps) u^power: the median draw moves to small t.
        assert float(seen["t"][1]) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5 ** power, rel=1e-4)
        assert seen["loss"].dtype == torch.float32
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="loss_t_power"):
            dataclasses.replace(M.default_config(data), loss_t_power=bad)


#-----------------------------------------------------------------------------------------------
# Config, card and errors.

def test_make_config_set_overrides_and_validation():
    data = load_dataset("toy2d:diamond", split="test")
    cfg = make_config("cld", data, {"mixed_score": "true", "Minv": "16", "weighting": "likelihood"})
    assert cfg.mixed_score and cfg.Minv == 16.0 and cfg.cld_config().Gamma == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weighting = 'l2'"):
        make_config("cld", data, {"weighting": "l2"})
    with pytest.raises(ValueError, match="Minv"):
        make_config("cld", data, {"Minv": "-1"})
    with pytest.raises(ValueError, match="does not fit data_shape"):
        M.Config(data_shape=(2,), net="unet")
    with pytest.raises(ValueError, match="sample shape"):
        M.Family(data, M.Config())


def test_card_round_trip_and_mismatched_weights(tmp_path):
    data = load_dataset("toy2d:diamond", split="test")
    cfg = M.Config(**{**M.default_config(data).to_dict(), "data_shape": (2,), "mlp_hidden": 16})
    fam = M.Family(data, cfg)
    card = json.loads(json.dumps(fam.card()))
    net = fam.modules()["net"]
    model = M.Model.from_checkpoint(net.state_dict(), card)
    assert model.config == cfg
    u, t = torch.randn(3, 4), torch.full((3,), 0.3)
    torch.testing.assert_close(model.net(u, t), net(u, t))
    bad = {**card, "config": {**card["config"], "mlp_hidden": 8},
           "net_config": {"net": {**card["net_config"]["net"], "hidden": 8}}}
    with pytest.raises((ValueError, RuntimeError)):
        M.Model.from_checkpoint(net.state_dict(), bad)
