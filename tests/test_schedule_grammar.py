"""schedule.txt's number grammar: one file of cases (kernels/tests/schedule_grammar_cases.txt)
that the C++ reader (ctest schedule_grammar) and Python's parse_value / Table.parse both pass."""

from pathlib import Path

import pytest

from fastsample.samplers.plan import ScheduleError, Table, parse_value

CASES = Path(__file__).resolve().parents[1] / "kernels" / "tests" / "schedule_grammar_cases.txt"


def _cases():
    out = []
    for n, line in enumerate(CASES.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        verdict, tok = line.split()
        assert verdict in ("accept", "reject"), f"{CASES.name}:{n}: {line!r}"
        out.append(pytest.param(tok, verdict == "accept", id=f"{n}-{verdict}-{tok}"))
    return out


def _schedule(value: str) -> str:
    return ("fastsample-schedule 1\nfamily ddgan\nsampler posterior\nnfe 1\ndata_shape 2\n"
            f"z_dim 1\npostprocess none\ncolumns i c0 c1 sigma\nrow 1 {value} 0 0\n")


def test_cases_file_covers_both_verdicts():
    verdicts = [p.values[1] for p in _cases()]
    assert sum(verdicts) >= 10 and verdicts.count(False) >= 10


@pytest.mark.parametrize("tok, accepted", _cases())
def test_parse_value(tok, accepted):
    if accepted:
        assert parse_value(tok) == float(tok)
    else:
        with pytest.raises(ValueError):
            parse_value(tok)


@pytest.mark.parametrize("tok, accepted", _cases())
def test_table_parse_uses_the_grammar(tok, accepted):
    if accepted:
        assert Table.parse(_schedule(tok)).rows[0][1] == float(tok)
    else:
        with pytest.raises(ScheduleError, match=r"<schedule>:9: bad 'row' line"):
            Table.parse(_schedule(tok))
