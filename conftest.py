"""Root conftest: `pytest --benchmark bench/` must work, but pytest-benchmark has no plain
`--benchmark` flag, so register one. Without it, bench/ files are skipped when collected by a
plain `pytest` run that names them."""

import os

# The Triton interpreter must be on before any kernel is decorated: this conftest is imported
# before the package under test. On a CUDA machine the compiled kernels are used instead.
def _want_interpreter() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except Exception:
        return True


if "TRITON_INTERPRET" not in os.environ and _want_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the pytest-benchmark suites under bench/")


def pytest_collection_modifyitems(config, items):
    import pytest
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest --benchmark bench/`")
    for item in items:
        if "bench" in item.nodeid.split("/")[0:1] or item.nodeid.startswith("bench/"):
            item.add_marker(skip)
