"""Issue 18, training: one run per directory (flock on DIR/.lock), SIGINT/SIGTERM write a
checkpoint and exit 130/143 with one line, non-positive numbers are refused (never replaced by
defaults), divergence stops the run keeping the last good checkpoint, --resume refuses a state
that is not this run's, and temp files of a killed run are cleaned at the next start."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsample import checkpoint as ck
from fastsample.cli import main as cli
from fastsample.train import TrainConfig, TrainingError, train
from fastsample.train import loop as train_loop

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests" / "train_fixture.py")
sys.path.insert(0, str(ROOT / "tests"))
from train_fixture import TinyFamily, sample_batch  # noqa: E402
from train_fixture import subprocess_env as _env  # noqa: E402


def _wait_for(cond, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _cfg(**kw):
    base = dict(steps=6, batch_size=16, ckpt_every=2, log_every=1, ema_decay=0.9,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _cld_toy(out, *extra, steps=2):
    return ["train", "--model", "cld", "--data", "toy2d:grid25", "--out", str(out), "--steps",
            str(steps), "--batch-size", "32", "--no-eval", "--no-progress", "--log-every", "1",
            *map(str, extra)]


def _err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert err, "nothing on stderr"
    assert not any(ln.startswith("Traceback") for ln in err), err
    return err[-1]


#-----------------------------------------------------------------------------------------------
# The run-directory lock.

@pytest.fixture
def running(tmp_path):
    """A slow fixture run holding tmp_path/'busy'; yields (dir, its Popen)."""
    d = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, FIXTURE, "--out", str(d), "--steps", "100000",
                             "--sleep", "0.05", "--ckpt-every", "2"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (d / "ddpm.state.pt").exists(), what="the first run's checkpoint")
        yield d, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_run_on_a_busy_dir_is_refused_naming_the_holder(running):
    """Before: both runs wrote the same checkpoint and interleaved the log."""
    d, proc = running
    log_before = (d / "train_log.jsonl").read_text()
    with pytest.raises(TrainingError, match=f"PID {proc.pid}"):
        train(TinyFamily(), sample_batch, _cfg(), d)
    assert proc.poll() is None
    # the refused run wrote nothing into the log
    assert (d / "train_log.jsonl").read_text().startswith(log_before)


def test_resume_while_a_run_holds_the_dir_exits_2(running, capsys):
    d, proc = running
    rc = cli(["train", "--model", "ddpm", "--data", "toy2d:grid25", "--out", str(d),
              "--steps", "3", "--resume", "--no-eval", "--no-progress"])
    assert rc == 2
    line = _err_line(capsys)
    assert f"PID {proc.pid}" in line and "in use by another training run" in line


def test_lock_is_released_after_a_run_and_after_a_failure(tmp_path):
    d = tmp_path / "run"
    train(TinyFamily(), sample_batch, _cfg(steps=2), d)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(TinyFamily(nan_at=1), sample_batch, _cfg(steps=2), tmp_path / "other")
    train(TinyFamily(), sample_batch, _cfg(steps=2), tmp_path / "other")   # lock was freed
    train(TinyFamily(), sample_batch, _cfg(steps=4), d, resume=True)


#-----------------------------------------------------------------------------------------------
# SIGINT / SIGTERM.

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_exits_with_one_line(tmp_path, sig, code):
    """Before: SIGINT gave a 33-line KeyboardInterrupt traceback and no checkpoint."""
    d = tmp_path / "run"
    argv = _cld_toy(d, "--ckpt-every", "100000", steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "fastsample", *argv], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = d / "train_log.jsonl"
    try:
        _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3,
                  what="three logged steps")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"interrupted by {sig.name} at step" in lines[0] and "--resume" in lines[0]
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    assert step >= 3
    _, card = ck.load_checkpoint(d / "cld.safetensors")
    assert card.train_steps == step and card.extra["stopped_by_signal"] == sig.name
    assert ck.load_training_state(d / "cld.state.pt")["step"] == step
    assert not (d / "train_log.jsonl").read_text().count('"eval"')


#-----------------------------------------------------------------------------------------------
# Numbers.

class _WorkStarted(BaseException):
    pass


@pytest.fixture
def no_train(monkeypatch):
    import fastsample.train

    def stub(*a, **k):
        raise _WorkStarted("training started")
    monkeypatch.setattr(fastsample.train, "train", stub)


@pytest.mark.parametrize("flag,value,msg", [
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--steps", "-3", "--steps must be >= 1"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--batch-size", "-8", "--batch-size must be >= 1"),
    ("--max-minutes", "-1", "--max-minutes must be a finite number >= 0"),
    ("--max-minutes", "nan", "--max-minutes must be a finite number"),
    ("--max-minutes", "inf", "--max-minutes must be a finite number"),
    ("--ckpt-every", "0", "--ckpt-every must be >= 1"),
    ("--log-every", "-1", "--log-every must be >= 1"),
    ("--eval-every", "-1", "--eval-every must be >= 0"),
    ("--ema", "1.5", "--ema must be in [0, 1)"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--seed", str(2 ** 63), "above the limit"),
    ("--batch-size", str(10 ** 9), "above the limit 65536"),
    ("--steps", str(10 ** 12), "above the limit 100000000"),
])
def test_non_positive_and_absurd_numbers_are_refused(tmp_path, capsys, no_train, flag, value,
                                                     msg):
    """Before: --steps 0 / --batch-size 0 became the family defaults, --max-minutes -1 stopped
    after one step with exit 0."""
    out = tmp_path / "run"
    assert cli(["train", "--model", "cld", "--data", "toy2d:grid25", "--out", str(out), flag,
                value]) == 2
    assert msg in _err_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("kw", [dict(max_minutes=-1.0), dict(steps=0), dict(batch_size=0),
                                dict(max_minutes=float("nan")), dict(eval_every=-1),
                                dict(ema_decay=1.0), dict(seed=-1)])
def test_train_config_refuses_bad_values(kw):
    with pytest.raises(ValueError):
        _cfg(**kw)


#-----------------------------------------------------------------------------------------------
# Divergence.

def test_cld_with_a_huge_learning_rate_stops_as_diverged(tmp_path, capsys):
    """Before: loss 8e22, weights 7.8e8, saved and reported as a success (exit 0)."""
    d = tmp_path / "run"
    assert cli(_cld_toy(d, "--set", "lr=1e10", "--ckpt-every", "1", steps=20)) == 2
    line = _err_line(capsys)
    assert "training diverged" in line and "at step 1" in line
    ckpt = d / "cld.safetensors"
    if ckpt.exists():                               # nothing diverged may be on disk
        sd, _ = ck.load_checkpoint(ckpt)
        assert max(float(t.abs().max()) for t in sd.values()) < 1e6


class _Exploding(TinyFamily):
    """Trains normally, then from step `at` on scales its loss (and so its gradients) up."""

    def __init__(self, at, scale=1e8, **kw):
        super().__init__(**kw)
        self.at, self.scale = at, scale

    def step(self, ctx, x0):
        if ctx.step >= self.at:
            n = x0.shape[0]
            pred = ctx.m("net")(torch.cat([x0, ctx.rand(n, 1)], 1))
            loss = (pred ** 2).mean() * self.scale + self.scale
            ctx.optimize("net", loss)
            return {"loss": loss.detach()}
        return super().step(ctx, x0)


def test_loss_beyond_the_bound_keeps_the_last_good_checkpoint(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"training diverged: loss .* at step 5 .*"
                                            r"Last good checkpoint: .*ddpm.safetensors"):
        train(_Exploding(at=5), sample_batch, _cfg(steps=10), d)
    sd, card = ck.load_checkpoint(d / "ddpm.safetensors")
    assert card.train_steps == 4
    assert ck.load_training_state(d / "ddpm.state.pt")["step"] == 4


class _WeightBlowUp(TinyFamily):
    def step(self, ctx, x0):
        out = super().step(ctx, x0)
        if ctx.step >= 3:
            with torch.no_grad():
                ctx.raw("net")[0].weight.mul_(1e7)
        return out


def test_weights_beyond_the_bound_stop_the_run(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"parameter net\.0\.weight reached max \|w\|"):
        train(_WeightBlowUp(dropout=0), sample_batch, _cfg(steps=10), d)
    sd, card = ck.load_checkpoint(d / "ddpm.safetensors")
    assert card.train_steps == 2 and max(float(t.abs().max()) for t in sd.values()) < 1e6


#-----------------------------------------------------------------------------------------------
# --resume against the command.

@pytest.fixture
def cld_run(tmp_path, capsys):
    d = tmp_path / "cld"
    assert cli(_cld_toy(d, steps=2)) == 0
    capsys.readouterr()
    return d


def test_resume_refuses_another_data_set(cld_run, capsys):
    """Before: resumed, and the card then named the new data set for the old weights."""
    rc = cli(["train", "--model", "cld", "--data", "toy2d:diamond", "--out", str(cld_run),
              "--steps", "3", "--resume", "--no-eval", "--no-progress"])
    assert rc == 2
    line = _err_line(capsys)
    assert "trained on 'toy2d:grid25'" in line and "toy2d:diamond" in line


def test_resume_refuses_another_config(cld_run, capsys):
    assert cli(_cld_toy(cld_run, "--resume", "--set", "lr=5e-3", steps=3)) == 2
    line = _err_line(capsys)
    assert "config differs" in line and "lr" in line


@pytest.mark.parametrize("step", [10 ** 9, -5, 2.5, True])
def test_resume_refuses_an_absurd_step(cld_run, capsys, step):
    """Before: a state at step 10^9 was 'finished' and saved as trained for 10^9 steps; -5
    trained 5 steps more than asked."""
    p = cld_run / "cld.state.pt"
    state = ck.load_training_state(p)
    state["step"] = step
    ck.save_training_state(p, state)
    assert cli(_cld_toy(cld_run, "--resume", steps=3)) == 2
    assert "step" in _err_line(capsys)


def test_resume_refuses_another_familys_state(cld_run, tmp_path, capsys):
    """A ddpm state under cld.state.pt; before: load_state_dict's RuntimeError traceback."""
    other = tmp_path / "ddpm"
    assert cli(["train", "--model", "ddpm", "--data", "toy2d:grid25", "--out", str(other),
                "--steps", "1", "--batch-size", "16", "--no-eval", "--no-progress"]) == 0
    (cld_run / "cld.state.pt").write_bytes((other / "ddpm.state.pt").read_bytes())
    capsys.readouterr()
    assert cli(_cld_toy(cld_run, "--resume", steps=3)) == 2
    assert "'ddpm' training state" in _err_line(capsys)


def test_resume_with_missing_tensors_is_one_line(cld_run, capsys):
    p = cld_run / "cld.state.pt"
    state = ck.load_training_state(p)
    del state["modules"]["net"][sorted(state["modules"]["net"])[0]]
    state.pop("card", None)          # as a state written before the card field existed
    ck.save_training_state(p, state)
    assert cli(_cld_toy(cld_run, "--resume", steps=3)) == 2
    assert "does not fit this run's cld modules" in _err_line(capsys)


def test_resume_of_a_matching_state_still_works(cld_run):
    assert cli(_cld_toy(cld_run, "--resume", steps=4)) == 0
    assert ck.load_training_state(cld_run / "cld.state.pt")["step"] == 4


#-----------------------------------------------------------------------------------------------
# Temp files of a killed run.

def test_stale_temp_files_are_cleaned_at_the_next_start(tmp_path):
    """Before: SIGKILL mid-write left .<name>.state.pt.*.tmp files that stayed forever."""
    d = tmp_path / "run"
    d.mkdir()
    stale = [d / ".ddpm.state.pt.k2j3h4.tmp", d / ".ddpm.safetensors.x9y8z7.tmp"]
    keep = [d / ".other.state.pt.abc.tmp", d / "notes.txt"]
    for p in stale + keep:
        p.write_bytes(b"half a file")
    train(TinyFamily(), sample_batch, _cfg(steps=2), d)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert json.loads((d / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 2
