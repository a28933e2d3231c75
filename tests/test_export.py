"""`python -m fastsample.export`: every artifact is checked against an oracle outside the
exporter's own gate — ONNX Runtime / AOTInductor on fresh inputs vs the eager model, the DDGAN
whole-sampler graph vs `fastsample sample` fed the same noise, Triton configs parsed with
Triton's own schema, manifests against the files they describe — plus the bad-input errors.

Each artifact is exported once per session (module fixtures, batch range 1..8); the small
released grid25 MLPs stand in where the test is about the format rather than the U-Net.
"""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastsample.export import core
from fastsample.export.command import main
from fastsample.samplers.plan import Table, twin_noise
from fastsample.models import load_model

MAXB = 8
DIGITS, GRID = "checkpoints/digits", "checkpoints/grid25"
# (checkpoint, --what, extra args): one ONNX export per --what.
ONNX_CASES = {
    "ddgan-generator": (f"{DIGITS}/ddgan.safetensors", "generator", []),
    "ddgan-sampler": (f"{GRID}/ddgan.safetensors", "sampler", []),
    "cld-score": (f"{GRID}/cld.safetensors", "score", ["--sampler", "em", "--steps", "12"]),
    "lsgm-decoder": (f"{DIGITS}/lsgm.safetensors", "decoder", []),
    "lsgm-score": (f"{DIGITS}/lsgm.safetensors", "score", ["--steps", "20"]),
}


def _export(out, ckpt, what, fmt, *extra):
    rc = main([ckpt, "--format", fmt, "--what", what, "--out", str(out), "--max-batch",
               str(MAXB), *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, one_thread):
    """name -> artifact dir, exported lazily (each test pulls only what it needs)."""
    root, made = tmp_path_factory.mktemp("artifacts"), {}

    def get(name):
        if name not in made:
            if name == "aoti":
                made[name] = _export(root / name, f"{GRID}/ddgan.safetensors", "generator",
                                     "aoti")
            elif name == "triton":
                made[name] = _export(root / name, f"{DIGITS}/lsgm.safetensors", "decoder",
                                     "triton-repo")
            else:
                ckpt, what, extra = ONNX_CASES[name]
                made[name] = _export(root / name, ckpt, what, "onnx", *extra)
        return made[name]
    return get


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _fresh_inputs(man, spec, n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return spec.draw(n, g)


def _spec(man):
    model, card = load_model(man["checkpoint"]["path"])
    return core.build_spec(model, card, man["what"], man["sampler"], man["steps"])


#-----------------------------------------------------------------------------------------------
# ONNX + ONNX Runtime, one per --what.

# The grid25 DDGAN's MLPs take sin / cos of 2 pi x B (input Fourier features), arguments up to
# ~50 where a float32 ulp is 4e-6; ONNX Runtime's sin and torch's differ by an ulp or so there,
# and the sampler graph chains 4 generator calls (measured: 2.5e-5).
_ONNX_ATOL = {"ddgan-sampler": 5e-5}


@pytest.mark.parametrize("name", list(ONNX_CASES))
def test_onnx_runtime_matches_eager(artifacts, name):
    d = artifacts(name)
    man = _manifest(d)
    model = onnx.load(d / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert any(n.op_type == "GroupNormalization" for n in model.graph.node) == (
        name in ("ddgan-generator", "lsgm-decoder", "lsgm-score"))
    assert [i.name for i in model.graph.input] == [t["name"] for t in man["inputs"]]
    assert [o.name for o in model.graph.output] == [t["name"] for t in man["outputs"]]
    for gi, mi in zip(model.graph.input, man["inputs"]):
        dims = [d.dim_param or d.dim_value for d in gi.type.tensor_type.shape.dim]
        assert [("batch" if isinstance(x, str) else x) for x in dims] == mi["shape"]
    spec = _spec(man)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 7):    # batch sizes the exporter's own gate did not use
        args = _fresh_inputs(man, spec, n)
        got = sess.run(None, {t["name"]: a.numpy() for t, a in zip(man["inputs"], args)})
        with torch.no_grad():
            want = spec.module(*args)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), atol=_ONNX_ATOL.get(name, 2e-5), rtol=1e-4)
    assert man["parity"]["passed"] and man["parity"]["max_abs"] < 1e-4


def test_lsgm_decoder_levels_are_exact(artifacts):
    """The decoder's argmax is compared as levels; in fp32 no level flipped on the gate's inputs."""
    man = _manifest(artifacts("lsgm-decoder"))
    out = man["parity"]["outputs"]["x"]
    assert out["level_flips"] == 0 and out["max_abs"] == 0.0
    assert man["decode"] == "mode"


#-----------------------------------------------------------------------------------------------
# The whole DDGAN sampler as one graph vs `fastsample sample`.

def test_ddgan_sampler_graph_reproduces_fastsample_sample(artifacts, tmp_path):
    from fastsample.cli import main as cli
    from fastsample.samplers.ddgan import draw_latents
    d = artifacts("ddgan-sampler")
    man = _manifest(d)
    tab = Table.read(d / "schedule.txt")
    N, SEED = 7, 3
    f = tmp_path / "s.npz"
    assert cli(["sample", man["checkpoint"]["path"], "--sampler", "posterior", "--num", str(N),
                "--seed", str(SEED), "--out", str(f)]) == 0
    want = np.load(f)["samples"]
    model, _ = load_model(man["checkpoint"]["path"])
    # The sampler's own noise: x_T and z from its generators, the posterior noise of step k from
    # the CPU twin at counter k * numel (one batch of N).
    x_T = torch.randn((N, *model.data_shape), generator=torch.Generator().manual_seed(SEED))
    z = draw_latents(model.T, N, model.z_dim, SEED, "cpu")
    noise = torch.stack([r[0] if r else torch.zeros_like(x_T)
                         for r in twin_noise(tab, SEED, x_T)], dim=1)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    x0, samples = sess.run(None, {"x_T": x_T.numpy(), "z": z.transpose(0, 1).numpy(),
                                  "noise": noise.numpy()})
    np.testing.assert_allclose(samples, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(x0, want, atol=1e-5, rtol=1e-5)   # 2D points: to_data = identity


def test_ddgan_sampler_digits_quantised_output():
    """The digits sampler graph's `samples` output is the 17-level to_data of its x0 (checked on
    the eager module that the exporter traces; its ONNX parity is measured in the manifest)."""
    model, card = load_model(f"{DIGITS}/ddgan.safetensors")
    spec = core.build_spec(model, card, "sampler")
    args = core.example_inputs(spec, 4)
    with torch.no_grad():
        x0, samples = spec.module(*args)
    assert torch.equal(samples, model.to_data(x0))
    assert spec.outputs[1].level == 1 / 16


#-----------------------------------------------------------------------------------------------
# AOTInductor.

def test_aoti_package_matches_eager(artifacts):
    d = artifacts("aoti")
    man = _manifest(d)
    assert man["format"] == "aoti" and man["files"]["model.pt2"] == hashlib.sha256(
        (d / "model.pt2").read_bytes()).hexdigest()
    spec = _spec(man)
    runner = torch._inductor.aoti_load_package(str(d / "model.pt2"))
    for n in (1, 6, MAXB):
        args = _fresh_inputs(man, spec, n)
        with torch.no_grad():
            got, want = runner(*args), spec.module(*args)     # positional, the manifest's order
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert man["parity"]["max_abs"] < 1e-4


#-----------------------------------------------------------------------------------------------
# Triton Inference Server repository.

def test_triton_repo_configs_parse(artifacts):
    from fastsample.export import triton_repo as tr
    d = artifacts("triton")
    man = _manifest(d)
    cfgs = sorted(d.glob("*/config.pbtxt"))
    assert [c.parent.name for c in cfgs] == man["triton"]["models"] == ["lsgm_decoder"]
    cfg = tr.parse_config(cfgs[0])
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == MAXB
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("z0", [4, 4, 4])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("x", [1, 8, 8])]
    assert cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 1
    assert (d / "lsgm_decoder" / "1" / "model.onnx").is_file()
    assert (d / "schedule.txt").is_file() and "lsgm_decoder/1/model.onnx" in man["files"]


@pytest.mark.parametrize("ckpt,what", [(f"{GRID}/ddgan.safetensors", "sampler"),
                                       (f"{GRID}/ddgan.safetensors", "generator"),
                                       (f"{GRID}/cld.safetensors", "score")])
def test_triton_config_text_for_each_layout(tmp_path, ckpt, what):
    """Every export is batch-first and batches dynamically (a (N,) input becomes dims [1] +
    reshape []); the sampler's z and noise carry the steps after the batch."""
    from fastsample.export import triton_repo as tr
    model, card = load_model(ckpt)
    spec = core.build_spec(model, card, what)
    for backend in ("onnxruntime", "tensorrt_plan"):
        p = tmp_path / f"{what}-{backend}.pbtxt"
        p.write_text(tr.config_text(spec, backend=backend, dtype="fp16", lo=1, hi=64,
                                    device="cuda"))
        cfg = tr.parse_config(p)
        assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
        assert all(t.data_type == 10 for t in list(cfg.input) + list(cfg.output))   # TYPE_FP16
        assert cfg.max_batch_size == 64 and list(cfg.dynamic_batching.preferred_batch_size)
        if what == "sampler":
            assert list(cfg.input[1].dims) == [model.T, model.z_dim]
            assert list(cfg.input[2].dims) == [model.T, *model.data_shape]
        else:
            t_in = cfg.input[-1]
            assert t_in.name == "t" and list(t_in.dims) == [1] and t_in.HasField("reshape")


def test_bad_triton_config_is_a_clear_error(tmp_path):
    from fastsample.export import triton_repo as tr
    p = tmp_path / "config.pbtxt"
    p.write_text('name: "m"\nmax_batch_size: "eight"\n')
    with pytest.raises(core.ExportError, match="not a valid Triton model config"):
        tr.parse_config(p)


#-----------------------------------------------------------------------------------------------
# Manifest.

REQUIRED = ("family", "what", "format", "dtype", "device", "inputs", "outputs", "batch",
            "sampler", "steps", "schedule", "torch_version", "files", "parity", "checkpoint",
            "created", "fastsample_version")


@pytest.mark.parametrize("name", ["ddgan-generator", "cld-score", "aoti", "triton"])
def test_manifest_is_complete_and_true(artifacts, name):
    d = artifacts(name)
    man = _manifest(d)
    assert all(k in man for k in REQUIRED)
    if man["format"] != "aoti":
        assert man["opset"] == 21 and "onnxruntime_version" in man
    for f, digest in man["files"].items():
        assert hashlib.sha256((d / f).read_bytes()).hexdigest() == digest
    tab = Table.read(d / "schedule.txt")
    assert [list(r) for r in tab.rows] == man["schedule"]["rows"]
    assert list(tab.columns) == man["schedule"]["columns"]
    ck = man["checkpoint"]
    assert ck["sha256"] == hashlib.sha256(open(ck["path"], "rb").read()).hexdigest()
    assert len(ck["card_commit"]) >= 7
    assert man["batch"] == {"min": 1, "max": MAXB, "dynamic": True}
    for t in man["inputs"] + man["outputs"]:
        assert t["dtype"] == "float32" and "batch" in t["shape"]
    p = man["parity"]
    assert p["passed"] and p["batches"] == [1, 5, MAXB] and p["tolerance"]["atol"] == 1e-4
    assert p["tolerance"]["network_calls"] == 1
    assert set(p["outputs"]) == {t["name"] for t in man["outputs"]}
    if name == "cld-score":
        assert man["sampler"] == "em" and man["steps"] == 12 and tab.header["nfe"] == (12,)


def test_reexport_replaces_an_earlier_artifact(artifacts, tmp_path):
    """Exporting onto an earlier export replaces it whole (temp dir + rename). The earlier
    export is a copy of the module's lsgm-decoder artifact (one export fewer)."""
    import shutil
    out = tmp_path / "a"
    shutil.copytree(artifacts("lsgm-decoder"), out)
    first = _manifest(out)["created"]
    # (A file the user added would make the directory no longer provably an artifact: that
    # refusal is tested in test_reliability_export.py.)
    _export(out, f"{DIGITS}/lsgm.safetensors", "decoder", "onnx", "--batch", "4")
    man = _manifest(out)
    assert man["batch"] == {"min": 4, "max": 4, "dynamic": False}
    assert man["created"] >= first
    assert [p.name for p in tmp_path.iterdir()] == ["a"]       # no temp dirs left behind


#-----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written.

@pytest.mark.parametrize("argv,msg", [
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--what", "generator"],
     "--what generator does not fit a cld checkpoint; a cld checkpoint exports score"),
    ([f"{DIGITS}/lsgm.safetensors", "--format", "onnx", "--what", "sampler"],
     "a lsgm checkpoint exports decoder|score"),
    ([f"{DIGITS}/ddpm.safetensors", "--format", "onnx"], "ddpm checkpoints have nothing"),
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--opset", "18"],
     "--opset 18 is not supported: choose 21.."),
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--opset", "99"],
     "--opset 99 is not supported"),
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--dtype", "bf16"],
     "bf16 ONNX cannot be run by ONNX Runtime's CPU provider"),
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--sampler", "ode"],
     "no fixed schedule table"),
    ([f"{DIGITS}/ddgan.safetensors", "--format", "onnx", "--steps", "9"], "--steps must be 4"),
    ([f"{DIGITS}/cld.safetensors", "--format", "aoti", "--device", "tpu"], "choose cpu | cuda"),
    ([f"{DIGITS}/cld.safetensors", "--format", "onnx", "--max-batch", "0"], "--max-batch"),
    (["/no/such.safetensors", "--format", "onnx"], "such.safetensors"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastsample export: error:") and msg in err[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensorrt_missing_names_the_extra(tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    assert main([f"{DIGITS}/ddgan.safetensors", "--format", "tensorrt", "--out",
                 str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastsample[tensorrt]'" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([f"{DIGITS}/lsgm.safetensors", "--format", "onnx", "--out",
                 str(blocker / "sub" / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os
    if os.access(locked, os.W_OK):          # root ignores permission bits
        pytest.skip("running as root: a read-only directory is still writable")
    assert main([f"{DIGITS}/lsgm.safetensors", "--format", "onnx", "--out",
                 str(locked / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_existing_foreign_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([f"{DIGITS}/lsgm.safetensors", "--format", "onnx", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_parity_gate_leaves_nothing(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setitem(core.TOLERANCE, "fp32", {"atol": -1.0, "rtol": 0.0})
    out = tmp_path / "out"
    assert main([f"{GRID}/cld.safetensors", "--format", "onnx", "--out", str(out),
                 "--max-batch", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "parity gate failed for cld score in fp32" in err and "alpha:" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_shares_the_parser(capsys):
    from fastsample.cli import main as cli
    with pytest.raises(SystemExit) as e:
        cli(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--format", "--what", "--dtype", "--opset", "--max-batch", "--device"):
        assert flag in out


def test_cpp_runtime_runs_the_exported_package(artifacts, tmp_path):
    """The C++ runtime (kernels/, `make ctest` builds it) loads the exported model.pt2 +
    schedule.txt and, fed the sampler's own draws, reproduces `fastsample sample`. Skipped
    until the binary is built (FASTSAMPLE_RUN=PATH, or build/cmake/kernels/fastsample-run)."""
    import os
    import subprocess
    from pathlib import Path

    from fastsample.samplers import ddgan as sd
    exe = Path(os.environ.get("FASTSAMPLE_RUN", "build/cmake/kernels/fastsample-run"))
    if not exe.is_file():
        pytest.skip(f"the C++ runtime is not built ({exe})")
    d = artifacts("aoti")
    model, _ = load_model(f"{GRID}/ddgan.safetensors")
    tab = Table.read(d / "schedule.txt")
    N, SEED = 6, 2
    x_T = torch.randn((N, *model.data_shape), generator=torch.Generator().manual_seed(SEED))
    z = sd.draw_latents(model.T, N, model.z_dim, SEED, "cpu")
    noise = torch.stack([r[0] for r in twin_noise(tab, SEED, x_T) if r])
    nd = tmp_path / "noise"
    nd.mkdir()
    for name, t in (("x_T", x_T), ("z", z), ("noise", noise)):
        np.save(nd / f"{name}.npy", np.ascontiguousarray(t.numpy(), dtype="<f4"))
    r = subprocess.run([str(exe), str(d), "--num", str(N), "--noise", str(nd), "--out",
                        str(tmp_path / "s.npy"), "--threads", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    want, _ = sd.sample(model, "posterior", model.T, N, SEED)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), want.numpy(), atol=1e-5, rtol=1e-5)


def test_ddgan_sampler_triton_repo_batches(tmp_path):
    """The DDGAN whole-sampler model of a written Triton repository batches under Triton's
    dynamic batcher: batch-first I/O, max_batch_size = --max-batch and dynamic_batching set,
    as parsed with Triton's ModelConfig schema; and two requests concatenated on axis 0 give
    each request's own samples, which is what the batcher does."""
    from fastsample.export import triton_repo as tr
    d = _export(tmp_path / "repo", f"{GRID}/ddgan.safetensors", "sampler", "triton-repo")
    cfgs = tr.load_repo(d)                       # sha256s verified, every config parsed
    cfg = cfgs["ddgan_sampler"]
    model, card = load_model(f"{GRID}/ddgan.safetensors")
    assert cfg.max_batch_size == MAXB and cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [
        ("x_T", [2]), ("z", [model.T, model.z_dim]), ("noise", [model.T, 2])]
    spec = core.build_spec(model, card, "sampler")
    sess = ort.InferenceSession(str(d / "ddgan_sampler" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    a, b = spec.feed(1, 2), spec.feed(2, 3)
    names = [t.name for t in spec.inputs]
    one = lambda f: sess.run(["samples"], dict(zip(names, (t.numpy() for t in f))))[0]  # noqa
    both = one([torch.cat([x, y]) for x, y in zip(a, b)])
    np.testing.assert_allclose(both, np.concatenate([one(a), one(b)]), atol=1e-6, rtol=1e-6)
    _check_front_model(d, sess, model)


def _check_front_model(repo, sess, model):
    """The repo's front model (seed/num in, samples out; Triton's Python backend) run with a
    stand-in for triton_python_backend_utils whose BLS call runs the repo's ONNX graph: it
    answers `fastsample sample`'s samples, and a bad seed is that request's error only. (Triton
    itself is not run here.)"""
    import importlib.util
    import sys
    import types

    class T:
        def __init__(self, name, arr):
            self.name, self.arr = name, np.asarray(arr)

        def as_numpy(self):
            return self.arr

    class Req:
        def __init__(self, model_name="", inputs=(), requested_output_names=()):
            self.inputs = {t.name: t for t in inputs}
            self.model_name = model_name

        def exec(self):
            out = sess.run(["samples"], {k: t.arr for k, t in self.inputs.items()})[0]
            return types.SimpleNamespace(has_error=lambda: False, outputs={"samples": T(
                "samples", out)})

    class Resp:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name: t for t in output_tensors}
            self.error = error
    pb = types.SimpleNamespace(
        Tensor=T, InferenceRequest=Req, InferenceResponse=Resp, TritonError=str,
        get_input_tensor_by_name=lambda r, n: r.inputs.get(n),
        get_output_tensor_by_name=lambda r, n: r.outputs[n])
    sys.modules["triton_python_backend_utils"] = pb
    try:
        front = repo / "grid25-ddgan"
        spec = importlib.util.spec_from_file_location("front_model", front / "1" / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        m = mod.TritonPythonModel()
        from google.protobuf import json_format

        from fastsample.export import triton_repo as tr
        cfg = json_format.MessageToDict(tr.parse_config(front / "config.pbtxt"),
                                        preserving_proto_field_name=True)
        m.initialize({"model_config": json.dumps(cfg), "model_repository": str(front),
                      "model_version": "1"})
        good = Req(inputs=[T("seed", [7]), T("num", [3])])
        bad = Req(inputs=[T("seed", [-1])])
        r_good, r_bad = m.execute([good, bad])
    finally:
        del sys.modules["triton_python_backend_utils"]
    from fastsample.samplers.ddgan import sample
    want, _ = sample(model, "posterior", model.T, 3, 7)
    # ONNX Runtime against eager torch: ulp-level sin / cos differences (see _ONNX_ATOL).
    np.testing.assert_allclose(r_good.outputs["samples"].arr, want.numpy(),
                               atol=_ONNX_ATOL["ddgan-sampler"], rtol=1e-5)
    assert r_good.error is None and "seed must be one integer" in r_bad.error
