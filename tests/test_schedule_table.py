"""schedule.txt (fastsample/samplers/plan.py): the table round-trips through text exactly, and
its Python loop (the twin of the C++ runtime) reproduces each family's sampler given the
sampler's own noise, on the released checkpoints."""

import pytest
import torch

from fastsample.samplers.plan import (Table, ScheduleError, noise_draws,
                                        postprocess, run_table, twin_noise)
from fastsample.samplers.cld import table as cld_table
from fastsample.samplers.ddgan import table as ddgan_table
from fastsample.models import load_model
from fastsample.samplers import cld as sc
from fastsample.samplers import ddgan as sd

N, SEED = 5, 3


def test_ddgan_table_reproduces_sampler(one_thread):
    m, _ = load_model("checkpoints/digits/ddgan.safetensors")
    tab = ddgan_table(m)
    assert Table.parse(tab.to_text()).rows == tab.rows
    assert tab.header["postprocess"] == ("quantize17",) and tab.header["nfe"] == (m.T,)
    want, _ = sd.sample(m, "posterior", m.T, N, SEED)
    x_T = torch.randn((N, *m.data_shape), generator=torch.Generator().manual_seed(SEED))
    z = sd.draw_latents(m.T, N, m.z_dim, SEED, "cpu")
    got = postprocess(tab, run_table(tab, m.denoise, x_T, twin_noise(tab, SEED, x_T),
                                     z=z))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["sscs", "em"])
def test_cld_table_reproduces_sampler(one_thread, name):
    m, _ = load_model("checkpoints/digits/cld.safetensors")
    tab = cld_table(m, name, 12)
    assert Table.parse(tab.to_text()).rows == tab.rows
    assert tab.header["nfe"] == (12,) and sum(r[0] for r in tab.rows) == 12
    want, nfe = sc.sample(m, name, 12, N, SEED, "cpu")
    x_T, v_T = sc.prior(m.cld, N, m.data_shape, torch.Generator().manual_seed(SEED), "cpu")
    got = postprocess(tab, run_table(tab, m.alpha, x_T, twin_noise(tab, SEED, x_T),
                                     v=v_T))
    assert nfe == 12 and torch.equal(got, want)


@pytest.mark.parametrize("text,msg", [
    ("fastsample-schedule 2\n", "format 1"),
    ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
     "postprocess none\ncolumns i c0 c1 sigma\nrow 1 1 0\n", ":8: bad 'row'"),
    ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe x\n", ":4: bad 'nfe'"),
    ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
     "columns i c0 c1 sigma\nrow 1 1 0 nan\n", "bad 'row'"),
    ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
     "columns i c0 c1 sigma\nrow 1 1 0 0\n", "'postprocess' line is missing"),
])
def test_bad_schedule_text(text, msg):
    with pytest.raises(ScheduleError, match=msg):
        Table.parse(text, "s.txt")


def test_unreadable_schedule(tmp_path):
    with pytest.raises(ScheduleError, match="cannot read"):
        Table.read(tmp_path / "missing.txt")


def test_lsgm_table_reproduces_em_sampler(one_thread):
    from fastsample.samplers.lsgm import em_table as lsgm_table
    from fastsample.samplers import lsgm as sl
    m, _ = load_model("checkpoints/digits/lsgm.safetensors")
    tab = lsgm_table(m, 6)
    assert Table.parse(tab.to_text()).rows == tab.rows
    assert tab.header["latent_shape"] == tuple(m.latent_shape) and tab.header["nfe"] == (6,)
    assert noise_draws(tab) == [1] * 5 + [0]
    want, nfe = sl.sample(m, "em", 6, N, SEED, "cpu")
    z_T = torch.randn((N, *m.latent_shape), generator=torch.Generator().manual_seed(SEED))
    z0 = run_table(tab, m.eps, z_T, twin_noise(tab, SEED, z_T))
    got = postprocess(tab, m.decode(z0))
    assert nfe == 6 and torch.equal(got, want)


@pytest.mark.parametrize("line,match", [
    ("prior_v_scale inf", "invalid number 'inf'"), ("prior_v_scale 1_0", "invalid number"),
    ("nfe 1_000", "invalid integer"), ("z_dim 99999999", "larger than"),
    ("data_shape -1 8 8", "invalid integer")])
def test_header_values_follow_the_one_grammar(line, match):
    """Header numbers obey the same grammar and caps as the C++ reader (issue 18)."""
    text = ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
            "postprocess none\n" + line + "\ncolumns i c0 c1 sigma\nrow 1 1 0 0\n")
    with pytest.raises(ScheduleError, match=match):
        Table.parse(text, "t.txt")


def test_row_count_is_capped():
    from fastsample.samplers.plan import MAX_ROWS
    head = ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
            "postprocess none\ncolumns i c0 c1 sigma\n")
    ok = Table.parse(head + "row 1 1 0 0\n" * MAX_ROWS, "t.txt")
    assert len(ok.rows) == MAX_ROWS
    with pytest.raises(ScheduleError, match=f"more than {MAX_ROWS} rows"):
        Table.parse(head + "row 1 1 0 0\n" * (MAX_ROWS + 1), "t.txt")
