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

.PHONY: all build venv ext cmake cpp-example test test-cpp test-python demo bench sass-cost cuda-check cuda-emu test-cuda-emu clean FORCE

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
	@mkdir -p build
	@echo "building the extension qwix_torch._C (log: build/ext.log)"
	@$(LOCK) bash -c 'MAX_JOBS=$(JOBS) $(PY) setup.py build_ext --inplace > build/ext.log 2>&1 || { tail -n 80 build/ext.log; exit 1; }; \
	  $(PY) -c "import qwix_torch" 2>/dev/null || QWIX_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e . '

cmake: venv
	@echo "building the CMake tree $(CMAKE_BUILD) (log: build/cmake.log)"
	@mkdir -p build
	@$(LOCK) bash -c '{ $(CMAKE) -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$$(realpath $(VENV)/bin/ninja) \
	  -DCMAKE_PREFIX_PATH=$$($(PY) -c "import torch; print(torch.utils.cmake_prefix_path)") \
	  -DPython3_EXECUTABLE=$$(realpath $(PY)) && $(CMAKE) --build $(CMAKE_BUILD) -j $(JOBS); } > build/cmake.log 2>&1 || { tail -n 80 build/cmake.log; exit 1; }'

build: ext cmake

# Installs the CMake package and builds examples/cpp against it with find_package(qwix_torch).
cpp-example: cmake
	@echo "installing the CMake package and building examples/cpp (log: build/example.log)"
	@$(LOCK) bash -c '{ $(CMAKE) --install $(CMAKE_BUILD) --prefix build/install && \
	  $(CMAKE) -S examples/cpp -B build/example -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$$(realpath $(VENV)/bin/ninja) \
	  -DCMAKE_PREFIX_PATH="$$(realpath build/install);$$($(PY) -c "import torch; print(torch.utils.cmake_prefix_path)")" && \
	  $(CMAKE) --build build/example; } > build/example.log 2>&1 || { tail -n 60 build/example.log; exit 1; }'
	./build/example/train_qat

test-cpp: cmake
	cd $(CMAKE_BUILD) && ../../$(VENV)/bin/ctest --output-on-failure

test-python: ext
	$(PY) -m pytest tests/python -q -x -p no:cacheprovider --ignore=tests/python/test_cuda_emulated.py

# CI has nvcc but no GPU: compile every .cu file for sm_80 and sm_90 against torch's headers, in
# C++17 -- the GPU machine's torch (2.11) builds extensions with C++17, this machine's (2.13) with
# C++20 -- and check that every csrc/ .cpp file is valid C++17 too, so that the GPU build never
# fails on a C++20-only construct that the CPU build accepts.
NVCC ?= nvcc
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
TORCH_INC = $(shell $(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
PY_INC = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CU_OBJS := $(patsubst cuda/%.cu,build/cuda-check/%.o,$(wildcard cuda/*.cu))
CXX17_OKS := $(patsubst csrc/%.cpp,build/cxx17-check/%.ok,$(wildcard csrc/*/*.cpp csrc/*/*/*.cpp))
cuda-check: venv
	@command -v $(NVCC) > /dev/null || { echo "error: nvcc not found (needed by cuda-check)"; exit 1; }
	@$(MAKE) --no-print-directory -j $(JOBS) $(CU_OBJS) $(CXX17_OKS)
	@echo "cuda-check: compiled $(words $(CU_OBJS)) CUDA files for sm_80 and sm_90, $(words $(CXX17_OKS)) C++ files as C++17"
build/cuda-check/%.o: cuda/%.cu $(wildcard cuda/*.cuh) $(wildcard csrc/numerics/*.h) csrc/ops/common.h
	@mkdir -p $(@D)
	$(NVCC) -c -std=c++17 -O3 --expt-relaxed-constexpr $(CUDA_ARCHS) -Icsrc -I. -Icuda/compile_check $(TORCH_INC) $< -o $@
build/cxx17-check/%.ok: csrc/%.cpp $(wildcard csrc/*/*.h) $(wildcard csrc/qwix/*.h)
	@mkdir -p $(@D)
	@$(CXX) -std=c++17 -fsyntax-only -w -Icsrc -I. $(TORCH_INC) -I$(PY_INC) $< && touch $@

# CI has no GPU either: the CUDA kernels also run on the CPU under a small CUDA emulator
# (tests/cuda_emu: fibers for threads, real barriers for __syncthreads and shuffles), built with
# AddressSanitizer and UBSan as a library of qwix_cuda_emu ops that test_cuda_emulated.py compares
# with the CPU ops.
EMU := build/cuda-emu
EMU_FLAGS := -std=c++20 -O1 -g -fPIC -fno-math-errno -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -Wall -Wno-unknown-pragmas -Wno-unused-function
# nvcc fuses a * b + c into an FMA by default; so does the emulated build where the CPU has FMA (the
# CPU kernels it is compared with do not), so a result that depends on contraction shows here too.
# (GCC contracts only with -fexpensive-optimizations, which -O1 leaves off.)
EMU_FLAGS += $(if $(shell grep -qw fma /proc/cpuinfo 2> /dev/null && echo y),-mfma -ffp-contract=fast -fexpensive-optimizations)
# Layouts of more than 8192 elements take the kernels' 64-bit index path (>= 2^31 elements on a GPU).
EMU_FLAGS += -DQWIX_CUDA_INDEX32_MAX=8192
EMU_HEADERS := $(wildcard tests/cuda_emu/include/*.h tests/cuda_emu/include/c10/cuda/*.h cuda/*.cuh cuda/*.h \
  csrc/numerics/*.h csrc/ops/*.h)
EMU_CUH := $(patsubst cuda/%,$(EMU)/cuda/%,$(wildcard cuda/*.cuh))
EMU_GEN := $(patsubst cuda/%.cu,$(EMU)/cuda/%.cpp,$(wildcard cuda/*.cu)) $(EMU)/selftest.cpp
EMU_CSRC_OBJS := $(patsubst csrc/%.cpp,$(EMU)/csrc/%.o,$(wildcard csrc/numerics/*.cpp) csrc/ops/common.cpp csrc/ops/nvfp4.cpp)
EMU_OBJS := $(EMU_GEN:.cpp=.o) $(EMU)/runtime.o $(EMU_CSRC_OBJS)
EMU_CXX = $(CXX) $(EMU_FLAGS) -Itests/cuda_emu/include -I$(EMU) -Icsrc -I. $(TORCH_INC)
$(EMU)/cuda/%.cpp: cuda/%.cu tests/cuda_emu/translate.py
	@mkdir -p $(@D) && $(PY) tests/cuda_emu/translate.py $< $@
$(EMU_CUH): $(EMU)/cuda/%.cuh: cuda/%.cuh tests/cuda_emu/translate.py
	@mkdir -p $(@D) && $(PY) tests/cuda_emu/translate.py $< $@
$(EMU)/selftest.cpp: tests/cuda_emu/selftest.cu tests/cuda_emu/translate.py
	@mkdir -p $(@D) && $(PY) tests/cuda_emu/translate.py $< $@
# The flags the objects were built with: a change rebuilds them.
$(EMU)/flags: FORCE
	@mkdir -p $(@D) && { echo '$(EMU_FLAGS)' | cmp -s - $@ || echo '$(EMU_FLAGS)' > $@; }
$(EMU_GEN:.cpp=.o): %.o: %.cpp $(EMU_HEADERS) $(EMU_CUH) $(EMU)/flags
	@$(EMU_CXX) -c $< -o $@ 2> $@.log || { cat $@.log; exit 1; }
$(EMU)/runtime.o: tests/cuda_emu/runtime.cpp $(EMU_HEADERS) $(EMU)/flags
	@mkdir -p $(@D) && $(EMU_CXX) -c $< -o $@ 2> $@.log || { cat $@.log; exit 1; }
$(EMU_CSRC_OBJS): $(EMU)/csrc/%.o: csrc/%.cpp $(EMU_HEADERS) $(EMU)/flags
	@mkdir -p $(@D) && $(EMU_CXX) -c $< -o $@ 2> $@.log || { cat $@.log; exit 1; }
$(EMU)/libqwix_cuda_emu.so: $(EMU_OBJS)
	@$(CXX) $(EMU_FLAGS) -shared $^ -o $@ -L$(TORCH_LIB) -lc10 -ltorch_cpu
.PRECIOUS: $(EMU_GEN) $(EMU_CUH)
cuda-emu: venv
	@echo "building the emulated CUDA kernels $(EMU)/libqwix_cuda_emu.so"
	@$(MAKE) --no-print-directory -j $(JOBS) $(EMU)/libqwix_cuda_emu.so
# The ASan and UBSan runtimes go first (the instrumented library is loaded into python). Address
# randomization off (setarch -R): gcc 12's ASan can loop on kernels with high mmap randomization.
test-cuda-emu: ext cuda-emu
	@for lib in libasan.so libubsan.so; do [ -f "$$($(CXX) -print-file-name=$$lib)" ] || \
	  { echo "error: $(CXX) has no $$lib (Debian: libasan8, libubsan1), needed by test-cuda-emu"; exit 1; }; done
	QWIX_CUDA_EMU_LIB=$(EMU)/libqwix_cuda_emu.so ASAN_OPTIONS=detect_leaks=0 \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	  setarch $$(uname -m) -R $(PY) -m pytest tests/python/test_cuda_emulated.py -q -x -p no:cacheprovider --capture=sys

test: build cuda-check test-cpp cpp-example test-python test-cuda-emu

demo: build
	$(PY) examples/qat_digits.py

bench: ext
	$(PY) benchmarks/bench_ops.py --json build/bench_ops.json
	$(PY) benchmarks/bench_qat.py --json build/bench_qat.json
	$(PY) benchmarks/bench_attention.py --json build/bench_attention.json
	$(PY) benchmarks/bench_func.py --json build/bench_func.json

# No GPU needed: SASS instructions per element of the CUDA per-element forms (nvcc + cuobjdump).
sass-cost: venv
	$(PY) benchmarks/sass_cost.py --json build/sass_cost.json

clean:
	rm -rf build python/qwix_torch/*.so
