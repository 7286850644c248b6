# The two commands of the README: `make demo` (the main job) and `make test` (every test).
# Both build first; the build installs everything into .venv (torch 2.13.0 CPU from local disk).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= $(shell nproc)
CMAKE_BUILD := build/cmake
CMAKE := $(VENV)/bin/cmake
LOCK := flock /tmp/qwix-torch-build.lock

.PHONY: all build venv ext cmake test test-cpp test-python demo bench cuda-check clean

all: build

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing GoogleTest (Debian libgtest-dev)"; \
	  (apt-get update -qq && apt-get install -y -qq libgtest-dev) || { echo "error: libgtest-dev is needed"; exit 1; }; fi
	touch $@

# The Python extension, built in place and installed editable (--no-build-isolation: against this torch).
ext: venv
	$(LOCK) bash -c 'MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace && \
	  { $(PY) -c "import qwix_torch" 2>/dev/null || $(PY) -m pip install -q --no-build-isolation --no-deps -e . ; }'

cmake: venv
	$(LOCK) bash -c '$(CMAKE) -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$$(realpath $(VENV)/bin/ninja) \
	  -DCMAKE_PREFIX_PATH=$$($(PY) -c "import torch; print(torch.utils.cmake_prefix_path)") \
	  -DPython3_EXECUTABLE=$$(realpath $(PY)) > /dev/null && $(CMAKE) --build $(CMAKE_BUILD) -j $(JOBS)'

build: ext cmake

test-cpp: cmake
	cd $(CMAKE_BUILD) && ../../$(VENV)/bin/ctest --output-on-failure

test-python: ext
	$(PY) -m pytest tests/python -q -x -p no:cacheprovider

test: build test-cpp test-python

demo: build
	$(PY) examples/qat_digits.py

bench: ext
	$(PY) benchmarks/bench_ops.py --json build/bench_ops.json

clean:
	rm -rf build python/qwix_torch/*.so
