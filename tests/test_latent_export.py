"""The latent families' whole-sampler graphs (latent loop + decoder step: noise in, image out)
against the eager sampler fed the same noise, an ONNX export through its parity gate, and the
Engine (static buffers) against the plain sampling path. Tiny nets keep the traces cheap."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastsample.data import Dataset, load_dataset
from fastsample.export import core
from fastsample.models import latent_cld, latent_ddgan
from fastsample.runtime import Engine
from fastsample.samplers import ddgan as ddgan_s
from fastsample.samplers import latent_cld as lcld_s
from fastsample.samplers import latent_ddgan as lddgan_s
from fastsample.samplers.plan import twin_noise
from fastsample.train import TrainConfig, train
from fastsample.train.batches import batch_sampler

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


def _jitter(model: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _tiny(mod, **extra):
    cfg = mod.default_config(load_dataset("digits"))
    extra.update({"eval_nfe": 4} if mod is latent_cld else {"disc_base_ch": 8, "T": 2})
    return dataclasses.replace(cfg, vae_base_ch=8, base_ch=8, train_steps=4, vae_steps=2,
                               batch_size=8, eval_samples=8, **extra)


def _cld(latent_channels=()):
    return _jitter(latent_cld.Model(_tiny(latent_cld, latent_channels=latent_channels)))


def _ddgan(latent_channels=()):
    return _jitter(latent_ddgan.Model(_tiny(latent_ddgan, latent_channels=latent_channels)))


def _card(model):
    return SimpleNamespace(family=model.family)


@pytest.mark.parametrize("sampler,channels", [("sscs", ()), ("em", ()), ("sscs", (0,))])
def test_latent_cld_graph_with_decoder_matches_the_sampler(sampler, channels):
    """With latent_channels (0,) the phase-space loop runs on one channel of z and of v."""
    model, N, SEED = _cld(channels), 6, 2
    assert model.latent_shape == ((len(channels) or 4), 4, 4)
    spec = core.build_spec(model, _card(model), "sampler", sampler, 5)
    want, _ = lcld_s.sample(model, sampler, 5, N, SEED)
    z_T, v_T = lcld_s.prior(model, N, SEED, "cpu")
    rows = [r for r in twin_noise(spec.table, SEED, z_T) if r]
    noise = torch.stack([torch.stack(r) for r in rows]).permute(2, 0, 1, 3, 4, 5)
    with torch.no_grad():
        z0, samples = spec.module(z_T, v_T, noise)
        eager = model.to_data(model.decode(z0))
    assert torch.equal(samples, eager)                 # the decoder step in the graph
    assert (samples == want).float().mean() >= 0.999   # the whole loop vs the sampler
    assert spec.calls == 6 and spec.outputs[1].shape == ("batch", 1, 8, 8)


@pytest.mark.parametrize("channels", [(), (0, 2)])
def test_latent_ddgan_graph_with_decoder_matches_the_sampler(channels):
    """latent_channels (0, 2): the loop runs on 2 of the 4 channels and the graph's decoder step
    puts them in their places, channels 1 and 3 at 0."""
    model, N, SEED = _ddgan(channels), 6, 4
    assert model.latent_shape == ((len(channels) or 4), 4, 4)
    spec = core.build_spec(model, _card(model), "sampler")
    want, _ = lddgan_s.sample(model, "posterior", None, N, SEED)
    z_T, zs = ddgan_s.prior_of_shape(model, model.latent_shape, N, SEED, "cpu")
    noise = torch.stack([r[0] if r else torch.zeros_like(z_T)
                         for r in twin_noise(spec.table, SEED, z_T)], dim=1)
    with torch.no_grad():
        z0, samples = spec.module(z_T, zs, noise)
        eager = model.to_data(model.decode(z0))
    assert torch.equal(samples, eager)
    assert (samples == want).float().mean() >= 0.999


@pytest.mark.parametrize("make,sampler,steps", [(_cld, "sscs", 4), (_cld, "em", 4),
                                                (lambda: _cld((0,)), "sscs", 4),
                                                (_ddgan, "posterior", None),
                                                (lambda: _ddgan((0,)), "posterior", None)])
def test_engine_matches_the_plain_path(make, sampler, steps):
    from fastsample import samplers
    from fastsample.models import family_of
    model = make()
    eng = Engine(model, sampler, steps, batch=5, warmup=0)
    want, _ = samplers.sample(family_of(model).sampling, model, sampler, steps, 5, 11)
    assert torch.equal(eng.sample(11), want)


@pytest.mark.parametrize("channels", [(), (0,)])
def test_onnx_export_of_the_latent_ddgan_sampler_passes_its_gate(tmp_path, channels):
    """A tiny trained latent DDGAN checkpoint through `python -m fastsample.export --what
    sampler --format onnx`: the gate (ONNX Runtime vs eager) passes and the artifact's samples
    are the decoder's levels; with latent_channels (0,) the loop's state is one channel."""
    import onnxruntime as ort
    from fastsample.export.command import main
    d = load_dataset("digits")
    tiny = Dataset(name="digits", kind="image", x=d.x[:32], labels=d.labels[:32], split="train")
    cfg = _tiny(latent_ddgan, latent_channels=channels)
    C = len(channels) or 4
    tcfg = TrainConfig(steps=cfg.train_steps, batch_size=8, ema_decay=0.9, progress=False,
                       ckpt_every=100)
    train(latent_ddgan.Family(tiny, cfg), batch_sampler(tiny, dequantize=True), tcfg, tmp_path)
    out = tmp_path / "art"
    assert main([str(tmp_path / "latent-ddgan.safetensors"), "--format", "onnx", "--what",
                 "sampler", "--out", str(out), "--max-batch", "4"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["parity"]["passed"] and man["family"] == "latent-ddgan"
    assert man["schedule"]["header"]["latent_shape"] == [C, 4, 4]
    g = torch.Generator().manual_seed(1)
    feed = {"x_T": torch.randn(3, C, 4, 4, generator=g).numpy(),
            "z": torch.randn(3, 2, cfg.z_dim, generator=g).numpy(),
            "noise": torch.randn(3, 2, C, 4, 4, generator=g).numpy()}
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    _, samples = sess.run(None, feed)
    assert samples.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(samples * 16, np.round(samples * 16))
