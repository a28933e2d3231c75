"""pytest-benchmark suites (run with `pytest --benchmark bench/`); a package so that
bench/test_kernels.py and tests/test_kernels.py do not collide as modules."""
