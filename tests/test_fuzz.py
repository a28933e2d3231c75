"""Issue 18: property-based fuzz (Hypothesis) of the three parsers a user's file reaches (the
checkpoint card, schedule.txt, manifest.json) and of the CLI's numeric arguments.

Properties: only the package's own error types come out (ValueError subclasses: CheckpointError,
ScheduleError, ExportError; SystemExit 2 from the CLI), nothing hangs (each example has a
deadline), and invalid input never succeeds. Bounded to about a minute in all: the example counts
below are fixed and `derandomize=True` makes every run the same, so the suite stays repeatable.
"""

import json
import math
import re
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastsample import checkpoint as ck  # noqa: E402
from fastsample.export.core import ExportError  # noqa: E402
from fastsample.samplers.plan import ScheduleError, Table  # noqa: E402
from fastsample.export.verify import MAX_BATCH, MAX_STEPS, parse_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "checkpoints" / "grid25"

FUZZ = settings(max_examples=300, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
CLI_FUZZ = settings(FUZZ, max_examples=60, deadline=20000)

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


#-----------------------------------------------------------------------------------------------
# The checkpoint card.

VALID_CARD = json.loads((GRID / "ddgan.json").read_text())


def _card_is_valid(d) -> bool:
    """The card contract (checkpoint.py), written independently of the parser."""
    if not isinstance(d, dict) or set(d) - (set(VALID_CARD) | {"config", "data_shape"}) \
            or set(ck._REQUIRED) - set(d):
        return False

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    v2 = is_int(d["format_version"]) and d["format_version"] == 2
    if v2 and not (isinstance(d.get("config"), dict) and isinstance(d.get("data_shape"), list)
                   and 1 <= len(d["data_shape"]) <= 4
                   and all(is_int(n) and 1 <= n <= 4096 for n in d["data_shape"])):
        return False
    family = d["family"]
    return (isinstance(family, str) and re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", family) is not None
            and isinstance(d["dataset"], str) and d["dataset"] != ""
            and isinstance(d["net_config"], dict) and isinstance(d["sde_config"], dict)
            and is_int(d["train_steps"]) and d["train_steps"] >= 0 and is_int(d["seed"])
            and isinstance(d["wall_time_s"], (int, float)) and not isinstance(d["wall_time_s"],
                                                                               bool)
            and math.isfinite(d["wall_time_s"]) and d["wall_time_s"] >= 0
            and isinstance(d["package_version"], str) and isinstance(d["git_commit"], str)
            and is_int(d["format_version"]) and d["format_version"] in (1, ck.FORMAT_VERSION)
            and d.get("stored_dtype", "float32") in ("float32", "float16", "bfloat16")
            and isinstance(d.get("extra", {}), dict))


@st.composite
def mutated_cards(draw):
    d = dict(VALID_CARD)
    for key in draw(st.lists(st.sampled_from(sorted(VALID_CARD) + ["bogus"]), max_size=3)):
        action = draw(st.sampled_from(["set", "drop"]))
        if action == "drop":
            d.pop(key, None)
        else:
            d[key] = draw(json_values | st.sampled_from(["ddgan", "cld", "float16", "", 0, -1,
                                                          1, 2, True]))
    return d


@FUZZ
@given(mutated_cards())
def test_card_parser_fuzz(d):
    text = json.dumps(d)
    try:
        card = ck.CheckpointCard.from_json(text)
    except ValueError as e:
        assert "\n" not in str(e)
        assert not _card_is_valid(d), f"valid card refused: {e}"
        return
    assert _card_is_valid(d), "an invalid card was accepted"
    assert ck.CheckpointCard.from_json(card.to_json()) == card


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
       | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
       | st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n))
def test_card_parser_on_arbitrary_text(text):
    try:
        ck.CheckpointCard.from_json(text)
    except ValueError:
        return
    raise AssertionError("arbitrary text parsed as a card")


@FUZZ
@given(mutated_cards() | json_values)
def test_card_through_a_safetensors_file(tmp_path_factory, d):
    """read_card / load_checkpoint of a file whose card is fuzzed: CheckpointError only."""
    import torch
    from safetensors.torch import save_file
    p = tmp_path_factory.mktemp("card") / "c.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={ck.CARD_KEY: json.dumps(d)})
    for fn in (ck.read_card, ck.load_checkpoint):
        try:
            fn(p)
        except ck.CheckpointError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)
            continue
        assert _card_is_valid(d)


#-----------------------------------------------------------------------------------------------
# schedule.txt (Table.parse).

KEYS = ["fastsample-schedule", "family", "sampler", "nfe", "data_shape", "postprocess", "z_dim",
        "columns", "row", "grid", "#", "junk"]
TOKENS = (st.sampled_from(["1", "0", "-1", "4", "2.5", "1e39", "-1e39", "1e-320", "nan", "inf",
                           "-inf", "0x1p3", "1_000", "ddgan", "cld", "quantize17", "i", "c0",
                           "99999999999999999999999999", "9" * 5000, "+", "", "1e", "٣"])
          | st.floats(allow_nan=True, allow_infinity=True).map(repr)
          | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6))


@st.composite
def schedules(draw):
    lines = []
    if draw(st.booleans()):
        lines = ["fastsample-schedule 1", "family ddgan", "sampler posterior", "nfe 2",
                 "data_shape 2", "z_dim 4", "postprocess none", "columns i c0 c1 sigma",
                 "row 2 0.5 0.5 0.1", "row 1 1 0 0"]
    for _ in range(draw(st.integers(0, 5))):
        line = " ".join([draw(st.sampled_from(KEYS))] + draw(st.lists(TOKENS, max_size=5)))
        lines.insert(draw(st.integers(0, len(lines))), line)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n", "\x00"]))


@FUZZ
@given(schedules() | st.text(max_size=300))
def test_schedule_parser_fuzz(text):
    _check_schedule_parse(text)


# Two bugs of Table.parse this fuzz found (now fixed in fastsample/samplers/plan.py).

def test_schedule_parser_bare_version_line():
    with pytest.raises(ScheduleError, match="no value"):
        Table.parse("fastsample-schedule\nfamily ddgan\n", "fuzz.txt")


def test_schedule_parser_row_before_columns():
    with pytest.raises(ScheduleError, match="before the columns"):
        Table.parse("row\nfastsample-schedule 1\nfamily ddgan\nsampler posterior\n"
                    "nfe 1\ndata_shape 2\npostprocess none\ncolumns i c0 c1 sigma\n"
                    "row 1 1 0 0\n", "fuzz.txt")
    with pytest.raises(ScheduleError, match="second columns"):
        Table.parse("fastsample-schedule 1\ncolumns i c0 c1 sigma\nrow 1 1 0 0\n"
                    "columns t\n", "fuzz.txt")


def _check_schedule_parse(text):
    try:
        tab = Table.parse(text, "fuzz.txt")
    except ScheduleError as e:
        assert str(e).startswith("fuzz.txt") and "\n" not in str(e)
        return
    assert tab.rows and all(len(r) == len(tab.columns) for r in tab.rows)
    assert all(math.isfinite(v) for r in tab.rows for v in r), "non-finite row accepted"
    for key in ("family", "sampler", "nfe", "data_shape", "postprocess"):
        assert key in tab.header
    assert Table.parse(tab.to_text()).rows == tab.rows


#-----------------------------------------------------------------------------------------------
# manifest.json (export/verify.py).

GOOD_MANIFEST = {"manifest_version": 1, "family": "ddgan", "what": "sampler", "format": "onnx",
                 "inputs": [{"name": "x_T", "shape": ["batch", 2]},
                            {"name": "z", "shape": [4, "batch", 32]}],
                 "outputs": [{"name": "x0", "shape": ["batch", 2]}],
                 "batch": {"min": 1, "max": 256, "dynamic": True}, "steps": 4,
                 "schedule": {"rows": [[4, 0.5, 0.5, 0.1]]},
                 "files": {"model.onnx": "a" * 64, "schedule.txt": "b" * 64}}

SIZES = st.integers(-2**65, 2**65) | st.sampled_from([0, 1, -1, MAX_BATCH, MAX_BATCH + 1,
                                                      MAX_STEPS, MAX_STEPS + 1, 10**12])


@st.composite
def mutated_manifests(draw):
    m = json.loads(json.dumps(GOOD_MANIFEST))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["steps", "batch.min", "batch.max", "dim", "file", "digest",
                                     "version", "format", "drop", "junk"]))
        if what == "steps":
            m["steps"] = draw(SIZES | json_values)
        elif what.startswith("batch."):
            if isinstance(m.get("batch"), dict):
                m["batch"][what[6:]] = draw(SIZES | json_values)
        elif what == "dim":
            if "inputs" in m:
                m["inputs"][0]["shape"][1] = draw(SIZES | json_values)
        elif what == "file":
            if isinstance(m.get("files"), dict):
                m["files"][draw(st.sampled_from(["../x", "/etc/passwd", "", "a/../b", "ok.bin",
                                             "manifest.json", "a//b", "c\\d"])
                                | st.text(max_size=10))] = "c" * 64
        elif what == "digest":
            if isinstance(m.get("files"), dict):
                m["files"]["model.onnx"] = draw(st.text(max_size=70) | json_values)
        elif what == "version":
            m["manifest_version"] = draw(SIZES | json_values)
        elif what == "format":
            m["format"] = draw(st.sampled_from(["onnx", "aoti", "exe"]) | json_values)
        elif what == "drop":
            m.pop(draw(st.sampled_from(sorted(m))), None)
        else:
            m[draw(st.text(max_size=5))] = draw(json_values)
    return m


def _manifest_is_valid(m) -> bool:
    """The bounds verify.py documents, written independently of it."""
    import re

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    try:
        files = m["files"]
        ok = (m["manifest_version"] == 1 and is_int(m["manifest_version"])
              and isinstance(files, dict) and 0 < len(files) <= 1000
              and m["format"] in ("onnx", "aoti", "tensorrt", "triton-repo")
              and (m["family"], m["what"]) in {("ddgan", "generator"), ("ddgan", "sampler"),
                                               ("cld", "score"), ("lsgm", "decoder"),
                                               ("lsgm", "score")}
              and is_int(m["steps"]) and 1 <= m["steps"] <= MAX_STEPS
              and is_int(m["batch"]["min"]) and is_int(m["batch"]["max"])
              and 1 <= m["batch"]["min"] <= m["batch"]["max"] <= MAX_BATCH)
        for rel, digest in files.items():
            parts = rel.split("/")
            ok = ok and rel != "manifest.json" and not rel.startswith("/") and "\\" not in rel \
                and "\x00" not in rel and all(p not in ("", ".", "..") for p in parts) \
                and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None
        for t in m["inputs"] + m["outputs"]:
            ok = ok and all(d == "batch" or (is_int(d) and 1 <= d <= 2**20) for d in t["shape"])
        return bool(ok)
    except (KeyError, TypeError, AttributeError):
        return False


@FUZZ
@given(mutated_manifests())
def test_manifest_parser_fuzz(m):
    try:
        parse_manifest(json.dumps(m))
    except ExportError as e:
        assert "\n" not in str(e)
        assert not _manifest_is_valid(m), f"valid manifest refused: {e}"
        return
    assert _manifest_is_valid(m), "an invalid manifest was accepted"


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.integers(1, 5000).map(lambda n: ("[" * n).encode()))
def test_manifest_parser_on_arbitrary_bytes(blob):
    try:
        parse_manifest(blob)
    except ExportError:
        return
    raise AssertionError("arbitrary bytes parsed as a manifest")


#-----------------------------------------------------------------------------------------------
# The CLI's numeric arguments (fastsample.cli.main in-process, heavy work stubbed).

class _Reached(BaseException):
    """A stub of the heavy work was called: the arguments passed every check."""


INTS = (st.integers(-2**64, 2**64) | st.sampled_from([0, 1, -1, 2, 2**31, 2**63 - 1, 2**63,
                                                     10**9, 65536, 65537, 4096, 4097, 10000,
                                                     10001])).map(str) \
    | st.sampled_from(["1.5", "", "1e3", "abc", "0x10", "٣"])
FLOATS = st.floats(allow_nan=True, allow_infinity=True).map(repr) \
    | st.sampled_from(["-0.0", "nan", "-inf", "1e400", "abc"])


def _as_int(s):
    try:
        return int(s)
    except ValueError:
        return None


def _cli(argv, capsys):
    from fastsample.cli import main
    try:
        rc = main(argv)
    except SystemExit as e:      # argparse: an unparsable number
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc


@pytest.fixture
def train_stub(monkeypatch):
    import fastsample.train
    calls = []

    def stub(family, sample_batch, cfg, out, **kw):
        calls.append(cfg)
        return {}
    monkeypatch.setattr(fastsample.train, "train", stub)
    return calls


@CLI_FUZZ
@given(steps=INTS, batch=INTS, seed=INTS, minutes=FLOATS)
def test_train_numeric_arguments(tmp_path_factory, capsys, train_stub, steps, batch, seed,
                                 minutes):
    from fastsample.train.loop import MAX_BATCH as TB, MAX_STEPS as TS
    out = tmp_path_factory.mktemp("train") / "run"
    train_stub.clear()
    rc = _cli(["train", "--model", "cld", "--data", "toy2d:grid25", "--out", str(out),
               "--steps", steps, "--batch-size", batch, "--seed", seed, "--max-minutes",
               minutes, "--no-eval", "--no-progress"], capsys)
    s, b, sd = _as_int(steps), _as_int(batch), _as_int(seed)
    try:
        m = float(minutes)
    except ValueError:
        m = None
    valid = (s is not None and 1 <= s <= TS and b is not None and 1 <= b <= TB
             and sd is not None and 0 <= sd < 2**63 and m is not None and math.isfinite(m)
             and m >= 0)
    if valid:
        assert rc == 0 and len(train_stub) == 1
        cfg = train_stub[0]
        assert (cfg.steps, cfg.batch_size, cfg.seed, cfg.max_minutes) == (s, b, sd, m)
    else:
        assert rc == 2 and not train_stub, f"invalid input gave exit {rc}"


@pytest.fixture
def load_stub(monkeypatch):
    import fastsample.models

    def stub(*a, **k):
        raise _Reached()
    monkeypatch.setattr(fastsample.models, "load_model", stub)


@CLI_FUZZ
@given(steps=INTS, batch=INTS, max_batch=INTS)
def test_export_numeric_arguments(tmp_path_factory, capsys, load_stub, steps, batch,
                                  max_batch):
    out = tmp_path_factory.mktemp("export") / "art"
    argv = ["export", str(GRID / "cld.safetensors"), "--format", "onnx", "--out", str(out),
            "--steps", steps, "--max-batch", max_batch]
    if batch != "1.5":
        argv += ["--batch", batch]
    s, b, mb = _as_int(steps), _as_int(batch) if batch != "1.5" else None, _as_int(max_batch)
    valid = (s is not None and 1 <= s <= 10000 and mb is not None and 1 <= mb <= 4096
             and (batch == "1.5" or (b is not None and 1 <= b <= 4096)))
    try:
        rc = _cli(argv, capsys)
    except _Reached:
        assert valid, "invalid export arguments reached the export"
        return
    assert not valid and rc == 2, f"exit {rc}"


@CLI_FUZZ
@given(steps=st.sampled_from(["4"]) | INTS, num=INTS, batch=st.none() | INTS, seed=INTS)
def test_sample_numeric_arguments(tmp_path_factory, capsys, one_thread, steps, num, batch,
                                  seed):
    """`fastsample sample` of the small grid25 DDGAN (T = 4), sampled for real: --num is kept
    below 2000 so an example stays fast (the CLI has no --num bound of its own to fuzz)."""
    n = _as_int(num)
    if n is not None and n > 2000:
        n = n % 2000 + 1
        num = str(n)
    out = tmp_path_factory.mktemp("sample") / "s.npz"
    argv = ["sample", str(GRID / "ddgan.safetensors"), "--sampler", "posterior", "--steps",
            steps, "--num", num, "--seed", seed, "--out", str(out)]
    if batch is not None:
        argv += ["--batch", batch]
    rc = _cli(argv, capsys)
    s, sd, b = _as_int(steps), _as_int(seed), None if batch is None else _as_int(batch)
    valid = (n is not None and n >= 1 and s == 4 and sd is not None and 0 <= sd < 2**63
             and (batch is None or (b is not None and 1 <= b <= 1_000_000)))
    if valid:
        assert rc == 0 and out.exists()
    else:
        assert rc == 2 and not out.exists(), f"invalid input gave exit {rc}"
