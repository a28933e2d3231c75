# Each target creates/refreshes the local virtualenv first, so it works on a fresh clone.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test cpp ctest asan ctest-asan bench venv clean checkpoints

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU wheel of torch first: an unpinned torch would pull gigabytes of CUDA libraries.
	$(VPY) -m pip install -q torch==2.13.0
	# setuptools prints an "Editable installation" UserWarning banner from inside pip's build
	# subprocess (which inherits PYTHONWARNINGS); it warns about nothing this repo does.
	PYTHONWARNINGS=ignore::UserWarning $(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastsample demo

# The C++ runtime is built first so pytest's export test can run the exported artifact through
# fastsample-run; ctest runs after pytest, then the same ctest suite under AddressSanitizer +
# UBSan (build/asan, sharing build/cmake's fixture).
test: cpp
	# pytest exits 5 when it collects no test; that is not a failure of the code.
	$(VPY) -m pytest -q; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi
	cd $(BUILD) && ctest --output-on-failure
	$(MAKE) ctest-asan

# The C++ runtime (kernels/, CMakeLists.txt) against the wheel's libtorch, then its ctest tests.
BUILD       ?= build/cmake
BUILD_JOBS  ?= 2
cpp: $(STAMP)
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DFASTSAMPLE_PYTHON=$(abspath $(VPY)) \
	    -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(BUILD) -j $(BUILD_JOBS)

ctest: cpp
	cd $(BUILD) && ctest --output-on-failure

# Everything in CMakeLists.txt again with -fsanitize=address,undefined: an out-of-bounds read
# or undefined behaviour in the runtime, its parsers or the tests fails the suite.
ASAN_BUILD  ?= build/asan
asan: $(STAMP)
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Release -DFASTSAMPLE_ASAN=ON \
	    -DFASTSAMPLE_PYTHON=$(abspath $(VPY)) -DFASTSAMPLE_FIXTURE_DIR=$(abspath $(BUILD))/fixture \
	    -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(ASAN_BUILD) -j $(BUILD_JOBS)

ctest-asan: asan
	cd $(ASAN_BUILD) && ctest --output-on-failure

bench: $(STAMP)
	$(VPY) -m pytest --benchmark bench/

# Retrains every released checkpoint with `fastsample train` defaults (CPU: expect ~20 min per
# digits model on 2 cores; DEVICE=cuda JOBS=7 trains them side by side on one GPU).
DEVICE ?= cpu
JOBS   ?= 1
checkpoints: $(STAMP)
	$(VPY) -m fastsample.train.release --device $(DEVICE) --jobs $(JOBS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache build
