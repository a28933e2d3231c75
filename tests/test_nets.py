"""Networks: shapes for every preset and role, conditioning really used, GroupNorm routed through
the dispatch op, no BatchNorm, export-traceable, VAE likelihood against independent formulas."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastsample.nets.layers as layers
from fastsample.nets import (UNET_PRESETS, VAE_PRESETS, Decoder, Discriminator, DiscriminatorConfig,
                             Encoder, MLPConfig, TimeMLP, UNet, UNetConfig, VAEConfig,
                             categorical_log_prob, categorical_mean, categorical_sample, param_count)
from fastsample.nets.layers import GaussianFourierFeatures, SinusoidalFeatures
from fastsample.nets.vae import to_levels

pytestmark = pytest.mark.usefixtures("one_thread")   # fixture in conftest.py


def perturb(net, seed=0, std=0.05):
    """Give every parameter a small random offset: zero-init layers would otherwise hide whether
    an input reaches the output at all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def _t(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


# ---- U-Net ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(UNET_PRESETS))
def test_unet_presets_shapes_finite_and_zero_at_init(name):
    cfg = UNetConfig.preset(name)
    net = UNet(cfg).eval()
    print(f"\nUNet preset {name}: {param_count(net):,} parameters")
    x = torch.randn(2, cfg.in_ch, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        y = net(x, _t(2))
    assert y.shape == (2, cfg.out_ch, cfg.resolution, cfg.resolution)
    assert torch.equal(y, torch.zeros_like(y))  # init_scale 0: output conv starts at exactly zero
    with torch.no_grad():
        y = perturb(net)(x, _t(2))
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_digits8_preset_is_small():
    # The brief asks for a CPU-trainable digits net of roughly 0.3-1 M parameters.
    assert 3e5 <= param_count(UNet(UNetConfig.preset("digits8"))) <= 1e6


@pytest.mark.parametrize("kind", ["cld", "ddgan", "ddpm_index"])
def test_unet_roles(kind):
    if kind == "cld":  # (x, v) stacked on channels -> the v-part of the score
        cfg, z = UNetConfig.preset("digits8", in_ch=2, out_ch=1), None
        t = _t(3)
    elif kind == "ddgan":  # generator with AdaGN on z, conditioned on the step index
        cfg = UNetConfig.preset("digits8", z_dim=16, time_embedding="sinusoidal", time_scale=1.0)
        z, t = torch.randn(3, 16), torch.tensor([1.0, 2.0, 4.0])
    else:
        cfg, z = UNetConfig.preset("digits8", time_embedding="sinusoidal", time_scale=1.0), None
        t = torch.tensor([0.0, 10.0, 999.0])
    net = perturb(UNet(cfg))
    with torch.no_grad():
        y = net(torch.randn(3, cfg.in_ch, 8, 8), t, z)
    assert y.shape == (3, cfg.out_ch, 8, 8) and torch.isfinite(y).all()


def test_time_embedding_distinguishes_t():
    cfg = UNetConfig.preset("digits8", base_ch=16, num_groups=4)
    net = perturb(UNet(cfg))
    x = torch.randn(1, 1, 8, 8).expand(4, 1, 8, 8)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0])
    with torch.no_grad():
        y = net(x, t)
    flat = y.flatten(1)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (flat[i] - flat[j]).abs().max() > 1e-4, (t[i], t[j])


def test_time_features_match_closed_forms():
    t = torch.tensor([1e-5, 0.01, 0.3, 1.0])
    ff = GaussianFourierFeatures(8, scale=16.0)
    arg = 2 * math.pi * torch.log(t)[:, None] * ff.W[None, :]
    torch.testing.assert_close(ff(t), torch.cat([torch.sin(arg), torch.cos(arg)], 1))
    # Frequencies ~ N(0, 16^2): with 2000 draws the sample std has sd 16/sqrt(2*2000) ~ 0.25.
    assert abs(float(GaussianFourierFeatures(4000, scale=16.0).W.std()) - 16.0) < 5 * 0.25
    sf = SinusoidalFeatures(6, time_scale=1000.0)
    freqs = torch.tensor([10000.0 ** (-k / 3) for k in range(3)])
    arg = 1000.0 * t[:, None] * freqs[None, :]
    torch.testing.assert_close(sf(t), torch.cat([torch.sin(arg), torch.cos(arg)], 1))


def test_adagn_uses_z():
    cfg = UNetConfig.preset("digits8", base_ch=16, num_groups=4, z_dim=8)
    net = perturb(UNet(cfg))
    x, t = torch.randn(2, 1, 8, 8), _t(2)
    z1, z2 = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        a, a_again, b = net(x, t, z1), net(x, t, z1), net(x, t, z2)
    assert torch.equal(a, a_again)
    assert (a - b).abs().max() > 1e-4


def test_unet_rejects_bad_inputs():
    net = UNet(UNetConfig.preset("digits8", base_ch=16, num_groups=4))
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 8, 8\); expected \(2, 1, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), _t(2))
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        net(torch.randn(2, 1, 8, 8), _t(3))
    with pytest.raises(ValueError, match="z was given but UNetConfig.z_dim = 0"):
        net(torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 4))
    gen = UNet(UNetConfig.preset("digits8", base_ch=16, num_groups=4, z_dim=4))
    with pytest.raises(ValueError, match="z is None but UNetConfig.z_dim = 4"):
        gen(torch.randn(2, 1, 8, 8), _t(2))
    with pytest.raises(ValueError, match=r"z has shape \(2, 5\)"):
        gen(torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 5))


def test_unet_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="unknown UNet preset 'cifar'"):
        UNetConfig.preset("cifar")
    with pytest.raises(ValueError, match="time_embedding = 'rope'"):
        UNetConfig(time_embedding="rope")
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        UNetConfig(base_ch=30, num_groups=8)
    with pytest.raises(ValueError, match="resolution 4 not divisible by 2\\^3"):
        UNetConfig(resolution=4, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attn_resolutions has 3"):
        UNetConfig(attn_resolutions=(3,))
    for name in UNET_PRESETS:
        cfg = UNetConfig.preset(name, z_dim=3)
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        UNetConfig.from_dict({"in_ch": 1, "channels": 3})


def test_attention_placement():
    def n_attn(cfg):
        return sum(isinstance(m, layers.AttnBlock) for m in UNet(cfg).modules())
    small = dict(resolution=8, base_ch=16, num_groups=4, ch_mult=(1, 2), num_res_blocks=1)
    # Default: lowest level only (1 encoder + 2 decoder blocks) + the middle one.
    assert n_attn(UNetConfig(**small)) == 1 + 2 + 1
    assert n_attn(UNetConfig(**small, attn_resolutions=())) == 1
    assert n_attn(UNetConfig(**small, attn_resolutions=(8, 4))) == 2 * (1 + 2) + 1


def test_every_group_norm_goes_through_dispatch(monkeypatch):
    calls = []
    real = layers.group_norm_silu

    def spy(x, num_groups, weight, bias, scale=None, shift=None, eps=1e-5, silu=True):
        if scale is not None:
            assert scale.shape == shift.shape == x.shape[:2]
        calls.append(silu)
        return real(x, num_groups, weight, bias, scale, shift, eps, silu=silu)

    monkeypatch.setattr(layers, "group_norm_silu", spy)
    nets = [(UNet(UNetConfig.preset("digits8", z_dim=4)), lambda n: n(torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 4))),
            (Discriminator(DiscriminatorConfig()), lambda n: n(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), _t(2))),
            (Encoder(VAEConfig()), lambda n: n(torch.rand(2, 1, 8, 8))),
            (Decoder(VAEConfig()), lambda n: n(torch.randn(2, 4, 4, 4)))]
    for net, run in nets:
        calls.clear()
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
        n_norms = sum(isinstance(m, layers.AdaGroupNormSiLU) for m in net.modules())
        with torch.no_grad():
            run(net)
        assert len(calls) == n_norms > 0, type(net).__name__


def test_no_batchnorm_anywhere():
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm
    nets = [UNet(UNetConfig.preset(n)) for n in UNET_PRESETS]
    nets += [Discriminator(DiscriminatorConfig()), TimeMLP(MLPConfig(z_dim=2))]
    nets += [m(VAEConfig.preset(n)) for n in VAE_PRESETS for m in (Encoder, Decoder)]
    for net in nets:
        bad = [type(m).__name__ for m in net.modules() if isinstance(m, (_BatchNorm, _InstanceNorm))]
        assert not bad, (type(net).__name__, bad)


def test_unet_traces_with_torch_export():
    # Dynamic batch: export/ and runtime/ serve several batch sizes from one artifact.
    cfg = UNetConfig(resolution=8, base_ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, z_dim=4)
    net = perturb(UNet(cfg))
    N = torch.export.Dim("N", min=1, max=64)
    ep = torch.export.export(net, (torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 4)),
                             dynamic_shapes=({0: N}, {0: N}, {0: N}))
    args = (torch.randn(5, 1, 8, 8), _t(5), torch.randn(5, 4))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), net(*args))


def test_unet_gradients_reach_every_parameter():
    cfg = UNetConfig.preset("digits8", base_ch=16, num_groups=4, z_dim=4)
    net = UNet(cfg)
    net(torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 4)).square().sum().backward()
    # At zero init only the output conv gets a gradient; one perturbation later, all must.
    perturb(net).train()
    net.zero_grad()
    net(torch.randn(2, 1, 8, 8), _t(2), torch.randn(2, 4)).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ---- Discriminator ----------------------------------------------------------------------------

@pytest.mark.parametrize("res,in_ch,ch_mult", [(8, 1, (1, 2, 2)), (32, 3, (1, 2, 2, 2))])
def test_discriminator_shapes_and_uses_both_inputs_and_t(res, in_ch, ch_mult):
    cfg = DiscriminatorConfig(in_ch=in_ch, resolution=res, base_ch=16, ch_mult=ch_mult, num_groups=4)
    net = perturb(Discriminator(cfg))
    print(f"\nDiscriminator {res}x{res}: {param_count(net):,} parameters")
    a, b = torch.randn(2, in_ch, res, res), torch.randn(2, in_ch, res, res)
    t = torch.tensor([1.0, 3.0])
    with torch.no_grad():
        base = net(a, b, t)
        assert base.shape == (2,) and torch.isfinite(base).all()
        assert (net(torch.randn_like(a), b, t) - base).abs().max() > 1e-5
        assert (net(a, torch.randn_like(b), t) - base).abs().max() > 1e-5
        assert (net(a, b, t + 1) - base).abs().max() > 1e-5
    with pytest.raises(ValueError, match="x_prev has shape"):
        net(torch.randn(2, in_ch + 1, res, res), b, t)


def test_discriminator_minibatch_std_groups_consecutive_samples():
    """mbstd_group=4: a sample's logit depends on the 3 others of its consecutive group of 4 and
    on no one else, so the [real; fake] batch of the DDGAN step never mixes its two halves; a
    batch not divisible by the group falls back to groups of 1 (per-sample logits)."""
    net = perturb(Discriminator(DiscriminatorConfig(base_ch=16, num_groups=4, mbstd_group=4)))
    a, b, t = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8), torch.full((8,), 2.0)
    with torch.no_grad():
        base = net(a, b, t)
        a2 = a.clone()
        a2[5] += 1.0
        changed = (net(a2, b, t) - base).abs() > 1e-6
        assert changed.tolist() == [False] * 4 + [True] * 4
        odd = net(a[:6], b[:6], t[:6])
        assert odd.shape == (6,)
        assert torch.allclose(odd[:1], net(a[:1], b[:1], t[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="mbstd_group"):
        DiscriminatorConfig(mbstd_group=-1)


# ---- MLP --------------------------------------------------------------------------------------

ROLES = {  # one config per use of TimeMLP in the families
    "ddgan_generator": MLPConfig(in_dim=2, out_dim=2, z_dim=8, time_embedding="sinusoidal", time_scale=1.0),
    "ddgan_discriminator": MLPConfig(in_dim=4, out_dim=1, time_embedding="sinusoidal", time_scale=1.0),
    "cld_score": MLPConfig(in_dim=4, out_dim=2, time_embedding="fourier_log"),
    "ddpm_eps": MLPConfig(in_dim=2, out_dim=2, time_mode="add"),
    "ddgan_generator_add": MLPConfig(in_dim=2, out_dim=2, z_dim=8, time_mode="add", hidden=64, num_layers=3),
    "ddpm_eps_fourier": MLPConfig(in_dim=2, out_dim=2, input_features=16, input_scale=3.0),
    "ddgan_discriminator_fourier": MLPConfig(in_dim=4, out_dim=1, time_embedding="sinusoidal",
                                             time_scale=1.0, input_features=8, time_mode="add"),
}


@pytest.mark.parametrize("role", list(ROLES))
def test_mlp_roles(role):
    cfg = ROLES[role]
    net = TimeMLP(cfg)
    print(f"\nTimeMLP {role}: {param_count(net):,} parameters")
    x, t = torch.randn(5, cfg.in_dim), _t(5)
    z = torch.randn(5, cfg.z_dim) if cfg.z_dim else None
    with torch.no_grad():
        assert torch.equal(net(x, t, z), torch.zeros(5, cfg.out_dim))  # zero-init output layer
        net = perturb(net)
        y = net(x, t, z)
        assert y.shape == (5, cfg.out_dim) and torch.isfinite(y).all()
        assert (net(x, _t(5, seed=1), z) - y).abs().max() > 1e-5
        if z is not None:
            assert (net(x, t, torch.randn_like(z)) - y).abs().max() > 1e-5
    assert sum(isinstance(m, torch.nn.Linear) for m in net.hidden) == cfg.num_layers


def test_mlp_bad_inputs():
    net = TimeMLP(MLPConfig(in_dim=2, out_dim=2, z_dim=3))
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\); expected \(4, 2\)"):
        net(torch.randn(4, 3), _t(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="z is None"):
        net(torch.randn(4, 2), _t(4))
    with pytest.raises(ValueError, match="time_mode = 'film'"):
        MLPConfig(time_mode="film")
    cfg = ROLES["cld_score"]
    assert MLPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_input_fourier_features_match_closed_form_and_are_not_saved():
    cfg = MLPConfig(in_dim=2, out_dim=2, input_features=5, input_scale=3.0)
    net, twin = TimeMLP(cfg), TimeMLP(cfg)
    B = net.inputs.B
    assert B.shape == (2, 5) and torch.equal(B, twin.inputs.B)     # seeded: same net, same B
    assert 2.0 < float(B.std()) < 4.5                                # N(0, 3^2) draws
    x = torch.randn(7, 2, dtype=torch.float64)
    want = torch.cat([x, torch.sin(2 * math.pi * x @ B.double()),
                      torch.cos(2 * math.pi * x @ B.double())], dim=1)
    got = net.inputs(x.float())
    assert got.shape == (7, 12)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    # B is rebuilt from its seed, never stored: an fp16 release would round it.
    assert not any(k.startswith("inputs") for k in net.state_dict())
    plain = TimeMLP(MLPConfig(in_dim=2, out_dim=2))
    assert plain.inputs is None and "hidden.0.weight" in plain.state_dict()
    assert plain.hidden[0].in_features == 2 + 32 and net.hidden[0].in_features == 12 + 32
    # A card written before the field existed rebuilds the plain net.
    old = {k: v for k, v in plain.cfg.to_dict().items() if not k.startswith("input_")}
    assert MLPConfig.from_dict(old) == plain.cfg


def test_input_fourier_features_resolve_what_raw_coordinates_cannot():
    """Spectral bias, measured: fit the grid25 mode-offset map x -> x - nearest grid point (a
    sawtooth of period 0.707, the shape of an eps-net at small noise) for the same few hundred
    steps; the net with Fourier features of x gets several times closer."""
    g = torch.Generator().manual_seed(0)
    spacing = 2 / math.sqrt(2) / 2
    x = (torch.rand(4096, 2, generator=g) - 0.5) * 3.0
    y = x - torch.round(x / spacing) * spacing
    errs = {}
    for m in (0, 32):
        torch.manual_seed(0)
        net = TimeMLP(MLPConfig(in_dim=2, out_dim=2, hidden=64, num_layers=3, input_features=m,
                                input_scale=2.0, zero_init_out=False))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        t = torch.full((256,), 0.5)
        for i in range(300):
            idx = torch.randint(0, 4096, (256,), generator=g)
            loss = (net(x[idx], t) - y[idx]).square().mean()
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            errs[m] = float((net(x, torch.full((4096,), 0.5)) - y).square().mean())
    assert errs[32] < errs[0] / 3, errs


def test_input_fourier_config_validation():
    for bad in ({"input_features": -1}, {"input_features": True}, {"input_features": 2.0}):
        with pytest.raises(ValueError, match="input_features"):
            MLPConfig(**bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="input_scale"):
            MLPConfig(input_features=4, input_scale=bad)


# ---- VAE --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VAE_PRESETS))
def test_vae_presets_shapes(name):
    cfg = VAEConfig.preset(name)
    enc, dec = Encoder(cfg), Decoder(cfg)
    print(f"\nVAE preset {name}: encoder {param_count(enc):,}, decoder {param_count(dec):,} parameters")
    x = torch.rand(2, cfg.in_ch, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        mu, log_sigma = enc(x)
        assert mu.shape == log_sigma.shape == (2,) + cfg.latent_shape
        # Zero-init head: q(z|x) starts as the N(0, I) prior.
        assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(log_sigma, torch.zeros_like(mu))
        logits = perturb(dec)(mu + torch.randn_like(mu))
    assert logits.shape == (2, cfg.in_ch * cfg.num_levels, cfg.resolution, cfg.resolution)
    assert torch.isfinite(logits).all()


def test_digits_decoder_output_is_17_levels_and_fresh_likelihood_is_uniform():
    dec = Decoder(VAEConfig.preset("digits8"))
    x = torch.randint(0, 17, (3, 1, 8, 8)).float() / 16
    with torch.no_grad():
        logits = dec(torch.randn(3, 4, 4, 4))
    assert logits.shape == (3, 17, 8, 8)
    # Zero-init head -> uniform categorical: log p(x|z) = -64 log 17 for every image.
    torch.testing.assert_close(dec.log_prob(logits, x), torch.full((3,), -64 * math.log(17)))


def test_categorical_log_prob_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    C, K = 2, 5
    logits = torch.randn(3, C * K, 4, 4, generator=g)
    x = torch.randint(0, K, (3, C, 4, 4), generator=g).float() / (K - 1)
    ours = categorical_log_prob(logits, x, K)
    ref = 0
    for c in range(C):  # channel c's levels sit at channels c*K .. c*K+K-1
        target = torch.round(x[:, c] * (K - 1)).long()
        ref = ref - F.cross_entropy(logits[:, c * K:(c + 1) * K], target, reduction="none").sum(dim=(1, 2))
    torch.testing.assert_close(ours, ref)


def test_categorical_mean_and_sample_monte_carlo():
    K = 17
    p = torch.softmax(torch.randn(K, generator=torch.Generator().manual_seed(1)), 0)
    logits = torch.log(p)[None, :, None, None].expand(1, K, 60, 60).contiguous()  # 3600 iid pixels
    torch.testing.assert_close(categorical_mean(logits, K), torch.full((1, 1, 60, 60), float(p @ torch.linspace(0, 1, K))))
    s = categorical_sample(logits, K, torch.Generator().manual_seed(2))
    assert s.shape == (1, 1, 60, 60)
    freq = torch.bincount(to_levels(s, K).flatten(), minlength=K).float() / s.numel()
    # Each level count is Binomial(3600, p_k): allow 5 standard deviations.
    sd = torch.sqrt(p * (1 - p) / s.numel())
    assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq, p)


def test_vae_bad_inputs():
    with pytest.raises(ValueError, match="resolution 8 / latent_res 2"):
        VAEConfig(latent_res=2)
    with pytest.raises(ValueError, match="NaN"):
        to_levels(torch.tensor([0.5, float("nan")]), 17)
    with pytest.raises(ValueError, match=r"values in \[-0.1, 1\]"):
        to_levels(torch.tensor([-0.1, 1.0]), 17)
    with pytest.raises(ValueError, match=r"z has shape \(2, 8, 4, 4\)"):
        Decoder(VAEConfig())(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.preset("celeba")


# ---- GPU (run where CUDA exists; skipped elsewhere by tests/conftest.py) ----------------------

@pytest.mark.gpu
def test_unet_cuda_matches_cpu_and_runs_under_bf16_autocast():
    cfg = UNetConfig.preset("digits8", in_ch=2, z_dim=8)
    net = perturb(UNet(cfg))
    args = (torch.randn(16, 2, 8, 8), _t(16), torch.randn(16, 8))
    with torch.no_grad():
        ref = net(*args)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out = net.cuda()(*(a.cuda() for a in args))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net(*(a.cuda() for a in args))
    # bf16 keeps 8 significant bits; the time features stay fp32 (log t of small t needs it).
    assert torch.isfinite(low).all()
    rel = (low.float().cpu() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)
