"""The latent families (latent-cld, latent-ddgan): oracles and plumbing.

Oracles: with an identity "VAE" on 2D points, latent CLD reproduces plain CLD's samplers and
latent DDGAN plain DDGAN's bit for bit (same prior draws, same plan rows, same loop); the
latent CLD forward marginals and the SSCS sampler on the exact Normal-latent score against the
closed-form covariances of cld.md sec. 2.2. Plumbing: two-stage training, checkpoints, the
frozen-VAE route (vae_init), the plans' latent header.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fastsample.data import Dataset, load_dataset
from fastsample.models import cld, ddgan, latent, latent_cld, latent_ddgan, load_model
from fastsample.samplers import cld as cld_s
from fastsample.samplers import ddgan as ddgan_s
from fastsample.samplers import latent_cld as lcld_s
from fastsample.samplers import latent_ddgan as lddgan_s
from fastsample.samplers import plan as plans
from fastsample.train import TrainConfig, train
from fastsample.train.batches import batch_sampler

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py

TOY = "toy2d:grid25"


@pytest.fixture(scope="module")
def toy():
    return load_dataset(TOY)


@pytest.fixture(scope="module")
def tiny_digits():
    d = load_dataset("digits")
    return Dataset(name="digits", kind="image", x=d.x[:64], labels=d.labels[:64], split="train")


def _jitter(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (zero-initialised output layers would make the nets constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------------------------------------
# Identity VAE: the latent family is its pixel-space family.

def _cld_pair(toy):
    cfg = cld.default_config(toy)
    net = _jitter(cld.build_net(cfg.net, cfg.net_config()))
    plain = cld.Model(cfg, net=net).eval()
    lat = latent_cld.Model(latent_cld.Config(**cfg.to_dict()), TOY, net=net,
                           vae=latent.IdentityVAE(cfg.data_shape)).eval()
    return plain, lat


@pytest.mark.parametrize("sampler,steps,opts", [
    ("sscs", 8, {"schedule": "quadratic", "midpoint": False}),
    ("sscs", 8, {"schedule": "uniform", "midpoint": False}),
    ("sscs", 8, {"schedule": "quadratic", "midpoint": True}),
    ("em", 8, {"schedule": "quadratic"}), ("em", 8, {"schedule": "uniform"}),
    ("ode", None, {"rtol": 1e-2, "atol": 1e-2})])
def test_identity_latent_cld_reproduces_cld(toy, sampler, steps, opts):
    plain, lat = _cld_pair(toy)
    a, nfe_a = cld_s.sample(plain, sampler, steps, 40, seed=5, batch=16, **opts)
    b, nfe_b = lcld_s.sample(lat, sampler, steps, 40, seed=5, batch=16, **opts)
    assert nfe_a == nfe_b
    assert torch.equal(a, b)
    if steps is not None:
        ta, tb = cld_s.table(plain, sampler, steps, **opts), lcld_s.table(lat, sampler, steps, **opts)
        assert ta.rows == tb.rows and ta.columns == tb.columns
        assert tb.family == "latent-cld" and tb.header["latent_shape"] == (2,)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_identity_latent_ddgan_reproduces_ddgan(toy, T):
    cfg = dataclasses.replace(ddgan.default_config(toy), T=T)
    plain = ddgan.Model(cfg, TOY, "points", (2,)).eval()
    _jitter(plain.generator)
    lat = latent_ddgan.Model(latent_ddgan.Config(**dataclasses.asdict(cfg)), TOY, "points",
                             vae=latent.IdentityVAE((2,))).eval()
    lat.generator.load_state_dict(plain.generator.state_dict())
    a, nfe_a = ddgan_s.sample(plain, "posterior", None, 40, seed=7, batch=16)
    b, nfe_b = lddgan_s.sample(lat, "posterior", None, 40, seed=7, batch=16)
    assert nfe_a == nfe_b == T
    assert torch.equal(a, b)
    assert ddgan_s.table(plain).rows == lddgan_s.table(lat).rows


def test_latent_cld_sscs_defaults_to_the_midpoint_score_time(toy):
    """Latent CLD's SSCS evaluates the score at each step's midpoint unless told otherwise; EM
    has no such option and is unchanged."""
    plain, lat = _cld_pair(toy)
    mid = cld_s.table(plain, "sscs", 8, midpoint=True)
    assert lcld_s.table(lat, "sscs", 8).rows == mid.rows
    assert lcld_s.table(lat, "sscs", 8, midpoint=False).rows == cld_s.table(plain, "sscs", 8).rows
    assert mid.rows != cld_s.table(plain, "sscs", 8).rows
    assert lcld_s.table(lat, "em", 8).rows == cld_s.table(plain, "em", 8).rows


# ---------------------------------------------------------------------------------------------
# Latent CLD against closed forms (N(0, I) latents: the mixed score's reference kernel).

class ExactNormalLatentNet(nn.Module):
    """alpha such that the mixed score s = -v/SigmaRef_vv - ell alpha equals the exact v-score
    of N(0, I) latents, (Sigma_xv z - Sigma_xx v) / det Sigma (models/latent_cld.py)."""

    def __init__(self, sde, d: int):
        super().__init__()
        self.sde, self.d = sde, d

    def forward(self, zv, t):
        z, v = zv[:, :self.d].double(), zv[:, self.d:].double()
        t64 = t.double()[:1]
        Sxx, Sxv, Svv = self.sde.covariance(t64, 1.0, None, None)
        s = (Sxv * z - Sxx * v) / (Sxx * Svv - Sxv ** 2)
        alpha = -(s + v / self.sde.sigma_ref_vv(t64)) / self.sde.ell(t64)
        return alpha.to(zv.dtype)


@pytest.mark.parametrize("t", [0.05, 0.3, 1.0])
def test_latent_forward_marginals_match_the_reference_kernel(t):
    """z_0 ~ N(0, I) pushed through the HSM training kernel has (z_t, v_t) ~ N(0, Sigma(t)) with
    Sigma the reference kernel (s_x = 1, s_v = gamma M): the analytic part's premise."""
    cfg = latent_cld.default_config(load_dataset("digits"))
    sde = latent_cld.Model(cfg).cld
    g = torch.Generator().manual_seed(0)
    n = 200_000
    z0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    zt, vt = sde.perturb(z0, tt, torch.randn(n, 1, generator=g, dtype=torch.float64),
                         torch.randn(n, 1, generator=g, dtype=torch.float64))
    want = [float(c) for c in sde.covariance(torch.tensor([t], dtype=torch.float64), 1.0)]
    got = [float((zt * zt).mean()), float((zt * vt).mean()), float((vt * vt).mean())]
    for w, x in zip(want, got):
        assert abs(x - w) < 0.02 * max(abs(w), 0.1), (got, want)


@pytest.mark.parametrize("sampler", ["sscs", "em"])
def test_latent_sampler_on_exact_normal_score_returns_normal_latents(sampler):
    """With the exact N(0, I)-latent score, SSCS (and EM) at 100 NFE from the prior return
    latents with mean 0 and the closed-form variance 1 (+ the sampler's error, 2.5%)."""
    base = cld.Config(data_shape=(2,), net="mlp", mixed_score=True, train_steps=4000)
    cfg = latent_cld.Config(**base.to_dict())
    model = latent_cld.Model(cfg, TOY, net=None, vae=latent.IdentityVAE((2,)))
    model.net = ExactNormalLatentNet(model.cld, 2)
    z, nfe = lcld_s.sample(model, sampler, 100, 20_000, seed=1, schedule="uniform")
    assert nfe == 100
    assert float(z.mean(0).abs().max()) < 0.03
    assert torch.allclose(z.var(0), torch.ones(2), atol=0.05), z.var(0)


# ---------------------------------------------------------------------------------------------
# Plumbing: configs, training, checkpoints.

def test_toys_and_bad_configs_are_refused(toy):
    for mod in (latent_cld, latent_ddgan):
        with pytest.raises(ValueError, match="image data only"):
            mod.default_config(toy)
    with pytest.raises(ValueError, match="vae_steps"):
        dataclasses.replace(latent_cld.default_config(load_dataset("digits")), vae_steps=8000)
    with pytest.raises(ValueError, match="decode"):
        dataclasses.replace(latent_ddgan.default_config(load_dataset("digits")), decode="x")


def _tiny(mod, **kw):
    cfg = mod.default_config(load_dataset("digits"))
    base = dict(vae_base_ch=8, train_steps=6, vae_steps=3, batch_size=8, eval_samples=16)
    base.update({"base_ch": 8} if mod is latent_cld else {"base_ch": 8, "disc_base_ch": 8})
    if mod is latent_cld:
        base["eval_nfe"] = 4
    base.update(kw)
    return dataclasses.replace(cfg, **base)


@pytest.mark.parametrize("mod,prior", [(latent_cld, "net"), (latent_ddgan, "generator")])
def test_two_stage_training_and_checkpoint(tmp_path, tiny_digits, mod, prior):
    cfg = _tiny(mod)
    fam = mod.Family(tiny_digits, cfg)
    tcfg = TrainConfig(steps=cfg.train_steps, batch_size=cfg.batch_size, ema_decay=0.9,
                       progress=False, log_every=1, ckpt_every=100)
    train(fam, batch_sampler(tiny_digits, dequantize=True), tcfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert all("loss_vae" in r for r in steps if r["step"] <= cfg.vae_steps)
    assert not any("loss_vae" in r for r in steps if r["step"] > cfg.vae_steps)
    name = mod.FAMILY
    model, card = load_model(tmp_path / f"{name}.safetensors")
    assert isinstance(model, mod.Model) and card.family == name
    assert card.data_shape == [1, 8, 8]
    x, nfe = mod.SAMPLERS and (lcld_s if mod is latent_cld else lddgan_s).sample(
        model, "sscs" if mod is latent_cld else "posterior", 4 if mod is latent_cld else None,
        6, seed=0)
    assert x.shape == (6, 1, 8, 8) and bool(((x * 16) == (x * 16).round()).all())
    # The released encoder is the EMA one; the prior's weights come back exactly.
    from fastsample import checkpoint as ck
    sd, _ = ck.load_checkpoint(tmp_path / f"{name}.safetensors")
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", prior}


def test_vae_init_loads_and_freezes_the_vae(tmp_path, tiny_digits):
    """vae_init + vae_steps = 0: the VAE starts from the checkpoint and no step moves it."""
    cfg = _tiny(latent_cld, train_steps=3, vae_steps=1)
    first = tmp_path / "a"
    tcfg = TrainConfig(steps=3, batch_size=8, ema_decay=0.9, progress=False, ckpt_every=100)
    train(latent_cld.Family(tiny_digits, cfg), batch_sampler(tiny_digits, dequantize=True),
          tcfg, first)
    src = first / "latent-cld.safetensors"
    cfg2 = dataclasses.replace(cfg, vae_init=str(src), vae_steps=0)
    fam = latent_cld.Family(tiny_digits, cfg2)
    mods = fam.modules()
    from fastsample import checkpoint as ck
    sd, _ = ck.load_checkpoint(src)
    for k, v in mods["encoder"].state_dict().items():
        torch.testing.assert_close(v, sd["encoder." + k].float())
    train(fam, batch_sampler(tiny_digits, dequantize=True), tcfg, tmp_path / "b")
    sd2, _ = ck.load_checkpoint(tmp_path / "b" / "latent-cld.safetensors")
    for k in sd:
        if k.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(sd2[k], sd[k])


def test_latent_plans_carry_the_decoder_step():
    cfg = latent_cld.default_config(load_dataset("digits"))
    m = latent_cld.Model(cfg)
    tab = lcld_s.table(m, "sscs", 10)
    assert tab.header["latent_shape"] == (4, 4, 4) and tab.header["decode"] == ("mode",)
    assert tab.header["data_shape"] == (1, 8, 8) and tab.header["postprocess"] == ("quantize17",)
    again = plans.Table.parse(tab.to_text())
    assert {k: v for k, v in again.header.items() if k != "fastsample-schedule"} == tab.header
    assert again.rows == tab.rows
    g = latent_ddgan.Model(latent_ddgan.default_config(load_dataset("digits")))
    t2 = lddgan_s.table(g)
    assert t2.family == "latent-ddgan" and plans.net_calls(t2) == 4
    assert t2.header["latent_shape"] == (4, 4, 4)


# ---------------------------------------------------------------------------------------------
# latent_channels: a latent prior models only the VAE's active channels.

@pytest.mark.parametrize("mod", [latent_ddgan, latent_cld])
def test_latent_channels_config_and_decoder_step(mod):
    base = _tiny(mod)
    for bad in ((4,), (1, 0), (0, 0), (-1,), (True,), ("a",)):
        with pytest.raises(ValueError, match="latent_channels"):
            dataclasses.replace(base, latent_channels=bad)
    torch.manual_seed(0)
    cfg = dataclasses.replace(base, latent_channels=(1, 3))
    if mod is latent_cld:      # the CLD's shape follows the channels, its net is built for it
        assert cfg.data_shape == (2, 4, 4) and cfg.net_config().in_ch == 4
        assert mod.Config.from_dict(cfg.to_dict()) == cfg
    model = mod.Model(cfg).eval()
    assert model.latent_shape == (2, 4, 4) and model.data_shape == (1, 8, 8)
    z = torch.randn(5, 2, 4, 4)
    full = torch.zeros(5, 4, 4, 4)
    full[:, 1], full[:, 3] = z[:, 0], z[:, 1]
    with torch.no_grad():
        assert torch.equal(model.decode(z, "mean"), model.vae.decode(full, "mean"))
    with pytest.raises(ValueError):
        model.decode(torch.randn(5, 4, 4, 4))             # the full latent is not the state


def test_released_vae_has_one_active_channel_that_the_decoder_reads():
    """The released LSGM VAE's encoder uses channel 0 only: channels 1-3 have a posterior mean
    that does not vary with x (Var 0.03^2 against channel 0's 1.3^2), so q(z | x) there is the
    prior for every x. The decoder agrees: redrawing channels 1-3 leaves its output nearly
    unchanged, redrawing channel 0 changes it completely."""
    from fastsample.models import lsgm as L
    model, _ = load_model(Path(__file__).resolve().parents[1] / "checkpoints" / "digits"
                          / "lsgm.safetensors")
    x01 = L.to_levels01(load_dataset("digits").x[:400])
    assert latent.active_channels(model.encoder, x01) == (0,)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mu, log_s = model.encoder(x01)
        z = mu + log_s.exp() * torch.randn(mu.shape, generator=g)
        ref = L.decode_levels(model.decoder, z, "mean")
        other, zero = z.clone(), z.clone()
        other[:, 1:] = torch.randn(other[:, 1:].shape, generator=g)
        zero[:, 0] = torch.randn(zero[:, 0].shape, generator=g)
        moved_inactive = (L.decode_levels(model.decoder, other, "mean") - ref).abs().mean()
        moved_active = (L.decode_levels(model.decoder, zero, "mean") - ref).abs().mean()
    assert moved_inactive < 0.05 * moved_active, (moved_inactive, moved_active)
