"""Issue 18, export side: only a provable fastsample artifact is ever replaced, `--out` that is
the working directory (or a parent) and non-positive / absurd numbers are refused before any
work, every Python loader of an artifact verifies the sha256s in its manifest.json first, and
sizes read from manifests and .npy headers are bounded. Plus the umask-derived file modes."""

import hashlib
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastsample.export import core
from fastsample.export.command import main
from fastsample.export.core import ArtifactDir, ExportError
from fastsample.export.verify import parse_manifest, read_manifest, verify_artifact

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "checkpoints" / "grid25"
DIGITS = ROOT / "checkpoints" / "digits"


class _WorkStarted(BaseException):
    """Raised by a stubbed load_model: the command got past its up-front checks."""


@pytest.fixture
def no_work(monkeypatch):
    """Any export that gets as far as loading the model fails the test loudly."""
    import fastsample.models

    def stub(*a, **k):
        raise _WorkStarted("the export started working")
    monkeypatch.setattr(fastsample.models, "load_model", stub)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fake_artifact(d: Path, files=None, fmt="onnx", family="ddgan", what="generator",
                  **extra) -> dict:
    """A directory laid out as the exporter writes one: files + a manifest listing them."""
    files = files or {"model.onnx": b"not really onnx", "schedule.txt": b"fastsample-schedule 1\n"}
    d.mkdir(parents=True, exist_ok=True)
    for rel, blob in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(blob)
    man = {"manifest_version": 1, "family": family, "what": what, "format": fmt,
           "dtype": "fp32", "inputs": [{"name": "x_t", "shape": ["batch", 2]}],
           "outputs": [{"name": "x0", "shape": ["batch", 2]}],
           "batch": {"min": 1, "max": 8, "dynamic": True}, "steps": 4,
           "files": {rel: _sha(blob) for rel, blob in files.items()}, **extra}
    (d / "manifest.json").write_text(json.dumps(man))
    return man


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _export_argv(out, *extra):
    return [str(GRID / "ddgan.safetensors"), "--format", "onnx", "--out", str(out), *extra]


#-----------------------------------------------------------------------------------------------
# 1. Which directories an export may replace.

def test_foreign_manifest_with_other_files_survives(tmp_path, capsys, no_work):
    """Before: any dir holding a file named manifest.json was deleted whole (exit 0)."""
    out = tmp_path / "app"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my-web-app", "version": 3}))
    (out / "index.html").write_text("<h1>mine</h1>")
    (out / "assets").mkdir()
    (out / "assets" / "logo.svg").write_text("<svg/>")
    before = _tree(out)
    assert main(_export_argv(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to overwrite" in err[0] and "manifest" in err[0]
    assert _tree(out) == before


def test_reexport_over_an_artifact_with_a_user_file_refuses(tmp_path, capsys, no_work):
    out = tmp_path / "art"
    fake_artifact(out)
    (out / "notes.txt").write_text("my measurements")
    before = _tree(out)
    assert main(_export_argv(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt" in err and "refusing to overwrite" in err and "\n" not in err
    assert _tree(out) == before


@pytest.mark.parametrize("change", ["extra_dir", "missing_file", "symlink", "bad_manifest"])
def test_artifact_that_differs_from_its_manifest_is_not_replaced(tmp_path, change):
    out = tmp_path / "art"
    fake_artifact(out)
    if change == "extra_dir":
        (out / "results").mkdir()
    elif change == "missing_file":
        (out / "schedule.txt").unlink()
    elif change == "symlink":
        (out / "link").symlink_to(tmp_path)
    else:
        (out / "manifest.json").write_text(json.dumps({"manifest_version": 1, "files": []}))
    with pytest.raises(ExportError, match="refusing to overwrite"):
        ArtifactDir(out).check()
    assert (out / "manifest.json").exists()


def test_exact_earlier_artifact_is_replaced(tmp_path):
    out = tmp_path / "art"
    fake_artifact(out)
    with ArtifactDir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_triton_layout_artifact_is_replaceable(tmp_path):
    out = tmp_path / "repo"
    fake_artifact(out, {"lsgm_decoder/config.pbtxt": b"name: x", "lsgm_decoder/1/model.onnx":
                        b"o", "schedule.txt": b"s"}, fmt="triton-repo", family="lsgm",
                  what="decoder")
    ArtifactDir(out).check()


def test_symlinked_out_leaves_no_old_link_behind(tmp_path):
    """Before: `--out LINK` (LINK -> an earlier artifact) left `.LINK.old-PID` behind."""
    real = tmp_path / "v1"
    fake_artifact(real)
    link = tmp_path / "latest"
    link.symlink_to(real)
    with ArtifactDir(link) as tmp:
        (tmp / "model.onnx").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1"]
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (link / "model.onnx").read_text() == "v2"


def test_failed_export_through_a_symlink_keeps_the_target(tmp_path):
    real = tmp_path / "v1"
    fake_artifact(real)
    before = _tree(real)
    link = tmp_path / "latest"
    link.symlink_to(real)
    with pytest.raises(RuntimeError):
        with ArtifactDir(link) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert _tree(real) == before and sorted(p.name for p in tmp_path.iterdir()) == ["latest",
                                                                                    "v1"]


@pytest.mark.parametrize("where", ["cwd", "parent", "artifact-cwd"])
def test_out_is_the_working_directory_is_refused_up_front(tmp_path, monkeypatch, capsys,
                                                          no_work, where):
    """Before: `export --out .` ran the whole export (then EBUSY / a renamed cwd)."""
    work = tmp_path / "work"
    if where == "artifact-cwd":
        fake_artifact(work)
    else:
        work.mkdir()
    monkeypatch.chdir(work)
    out = "." if where != "parent" else ".."
    assert main(_export_argv(out)) == 2
    err = capsys.readouterr().err
    assert "current directory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value,msg", [
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--steps", "-5", "--steps must be >= 1, got -5"),
    ("--batch", "0", "--batch must be >= 1, got 0"),
    ("--batch", "-1", "--batch must be >= 1"),
    ("--max-batch", "-3", "--max-batch must be >= 1"),
    ("--max-batch", str(10**9), "above the limit 4096"),
    ("--batch", str(2**40), "above the limit 4096"),
    ("--steps", str(10**8), "above the limit 10000"),
])
def test_non_positive_and_absurd_numbers_are_refused_before_work(tmp_path, capsys, no_work,
                                                                 flag, value, msg):
    """Before: `--steps 0` became the default step count (exit 0); absurd sizes ran out of
    memory in the parity gate."""
    ckpt = GRID / "cld.safetensors"
    out = tmp_path / "out"
    assert main([str(ckpt), "--format", "onnx", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


#-----------------------------------------------------------------------------------------------
# 4. sha256 verification on load, bounded manifests.

@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("verify") / "gen"
    assert main([str(GRID / "ddgan.safetensors"), "--format", "onnx", "--what", "generator",
                 "--out", str(d), "--max-batch", "4"]) == 0
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_intact_artifact_verifies_and_loads(onnx_artifact):
    from fastsample.export.onnx import ort_session
    man = verify_artifact(onnx_artifact)
    assert set(man["files"]) == {"model.onnx", "schedule.txt"}
    sess = ort_session(onnx_artifact)
    assert [i.name for i in sess.get_inputs()] == ["x_t", "z", "t"]


def test_flipped_byte_in_the_model_is_refused_before_loading(onnx_artifact, tmp_path,
                                                            monkeypatch):
    """Before: a tampered model.onnx in an artifact was loaded and run."""
    import onnxruntime

    from fastsample.export.onnx import ort_session
    d = _copy(onnx_artifact, tmp_path / "a")
    blob = bytearray((d / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (d / "model.onnx").write_bytes(bytes(blob))

    def never(*a, **k):
        raise AssertionError("ONNX Runtime was handed a tampered model")
    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(ExportError) as e:
        ort_session(d)
    msg = str(e.value)
    assert "model.onnx does not match its sha256" in msg and "\n" not in msg


def test_missing_listed_file_is_refused(onnx_artifact, tmp_path):
    d = _copy(onnx_artifact, tmp_path / "a")
    (d / "schedule.txt").unlink()
    with pytest.raises(ExportError, match="schedule.txt is listed in manifest.json but missing"):
        verify_artifact(d)


def test_aoti_loader_verifies_before_loading(tmp_path, monkeypatch):
    import torch._inductor

    from fastsample.export.aoti import load_aoti
    d = tmp_path / "aoti"
    fake_artifact(d, {"model.pt2": b"PK original", "schedule.txt": b"s"}, fmt="aoti")
    (d / "model.pt2").write_bytes(b"PK swapped!")

    def never(*a, **k):
        raise AssertionError("AOTInductor was handed a tampered package")
    monkeypatch.setattr(torch._inductor, "aoti_load_package", never)
    with pytest.raises(ExportError, match="model.pt2 does not match its sha256"):
        load_aoti(d)


def test_triton_repo_loader_verifies(tmp_path):
    from fastsample.export.triton_repo import load_repo
    d = tmp_path / "repo"
    fake_artifact(d, {"lsgm_decoder/config.pbtxt": b'name: "lsgm_decoder"\n',
                      "lsgm_decoder/1/model.onnx": b"o", "schedule.txt": b"s"},
                  fmt="triton-repo", family="lsgm", what="decoder")
    assert set(load_repo(d)) == {"lsgm_decoder"}
    (d / "lsgm_decoder" / "config.pbtxt").write_text('name: "evil"\n')
    with pytest.raises(ExportError, match="config.pbtxt does not match its sha256"):
        load_repo(d)


def test_demo_latency_refuses_a_tampered_cached_artifact(tmp_path, monkeypatch):
    """`fastsample demo` reuses OUT/ddgan-sampler-onnx while the checkpoint is unchanged; a
    modified model.onnx there must be refused, not run."""
    import argparse

    import onnxruntime

    from fastsample import cli
    from fastsample.models.registry import released_checkpoint
    ckpt = released_checkpoint("ddgan")
    if not ckpt.exists():
        pytest.skip("no released ddgan checkpoint")
    art = tmp_path / "ddgan-sampler-onnx"
    fake_artifact(art, {"model.onnx": b"original", "schedule.txt": b"s"}, what="sampler",
                  checkpoint={"sha256": core.sha256(ckpt)})
    (art / "model.onnx").write_bytes(b"swapped")

    def never(*a, **k):
        raise AssertionError("the demo ran a tampered model")
    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    ns = argparse.Namespace(device="cpu", seed=0)
    with pytest.raises(ExportError, match="model.onnx does not match its sha256"):
        cli._demo_latency(ns, tmp_path)


def _good_manifest(**over):
    man = {"manifest_version": 1, "family": "cld", "what": "score", "format": "onnx",
           "inputs": [{"name": "x", "shape": ["batch", 2]}],
           "outputs": [{"name": "a", "shape": ["batch", 2]}],
           "batch": {"min": 1, "max": 8}, "steps": 10, "files": {"model.onnx": "0" * 64}}
    man.update(over)
    return json.dumps(man)


@pytest.mark.parametrize("over,msg", [
    ({"files": {"../../etc/passwd": "0" * 64}}, "not a plain relative path"),
    ({"files": {"/etc/passwd": "0" * 64}}, "not a plain relative path"),
    ({"files": {"model.onnx": "xyz"}}, "not 64 lowercase hex"),
    ({"files": {f"f{i}": "0" * 64 for i in range(1001)}}, "more than the limit 1000"),
    ({"batch": {"min": 1, "max": 10**12}}, "max <= 1048576"),
    ({"batch": {"min": 0, "max": 4}}, "1 <= min"),
    ({"steps": 10**9}, "steps 1000000000 is not an int in 1..100000"),
    ({"steps": -5}, "steps -5"),
    ({"inputs": [{"name": "x", "shape": ["batch", 10**7]}]}, "dimension 10000000"),
    ({"inputs": [{"name": "x", "shape": ["batch", 65536, 65536]}]}, "elements per sample"),
    ({"manifest_version": 2}, "newer fastsample"),
    ({"format": "exe"}, "format 'exe'"),
])
def test_absurd_manifest_fields_are_refused(over, msg):
    with pytest.raises(ExportError, match=msg.replace("(", r"\(")):
        parse_manifest(_good_manifest(**over))


@pytest.mark.parametrize("text,msg", [
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ('{"manifest_version": NaN}', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    ("[]", "not a fastsample manifest"),
])
def test_malformed_manifest_text(text, msg):
    with pytest.raises(ExportError, match=msg):
        parse_manifest(text)


def test_oversized_manifest_file_is_not_read(tmp_path, monkeypatch):
    from fastsample.export import verify
    monkeypatch.setattr(verify, "MAX_MANIFEST_BYTES", 100)
    d = tmp_path / "a"
    fake_artifact(d)
    with pytest.raises(ExportError, match="more than the 100 a manifest may have"):
        read_manifest(d)


def test_listed_file_symlinked_out_of_the_artifact_is_refused(tmp_path):
    d = tmp_path / "a"
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside")
    fake_artifact(d, {"model.onnx": b"outside", "schedule.txt": b"s"})
    (d / "model.onnx").unlink()
    (d / "model.onnx").symlink_to(secret)
    with pytest.raises(ExportError, match="not a regular file inside the artifact"):
        verify_artifact(d)


#-----------------------------------------------------------------------------------------------
# Sizes in .npy headers (samples files read by `fastsample eval`).

def _npz_with_header(path, shape, payload=b"\0" * 64):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    buf.write(payload)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("samples.npy", buf.getvalue())


@pytest.mark.parametrize("shape", [(10**6, 10**6), (2**40,), (60000, 60000), (100, 2)])
def test_npy_header_sizes_are_bounded(tmp_path, shape):
    """Before: numpy allocated what the header claimed (MemoryError traceback, or 13 GiB)."""
    from fastsample.io import load_samples_npz
    p = tmp_path / "s.npz"
    _npz_with_header(p, shape)
    with pytest.raises(ValueError) as e:
        load_samples_npz(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


#-----------------------------------------------------------------------------------------------
# 5. File modes follow the umask.

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_mode(tmp_path, umask):
    """Before: atomic writes (mkstemp) left every output 0600 whatever the umask."""
    import torch

    from fastsample import checkpoint as ck
    from fastsample.io import atomic_save_npz
    old = os.umask(umask)
    try:
        atomic_save_npz(tmp_path / "s.npz", samples=np.zeros((2, 2), np.float32))
        ck.save_training_state(tmp_path / "x.state.pt", {"step": 1})
        card = ck.CheckpointCard(family="ddpm", dataset="toy2d:gauss", net_config={},
                                 sde_config={}, train_steps=1, seed=0, wall_time_s=0.0,
                                 config={}, data_shape=[2])
        ck.save_checkpoint(tmp_path / "x.safetensors", {"w": torch.zeros(2)}, card)
    finally:
        os.umask(old)
    for name in ("s.npz", "x.state.pt", "x.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
