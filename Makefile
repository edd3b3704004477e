# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
BUILD_DEPS  := scikit-build-core pybind11 pip cmake ninja
# the pip build directory (persistent, incremental): build/<wheel tag>
BUILD_DIR    = $(shell ls -d build/cp*/ 2>/dev/null | head -n 1)
JOBS        ?= $(shell nproc)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(JOBS)

.PHONY: install demo test upstream-tools bench cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# build tools inside the venv; re-checked when this Makefile changes
$(VENV)/.build-deps: $(PY) Makefile
	$(PY) -m pip install -q --upgrade $(BUILD_DEPS)
	touch $@

# editable install; re-run after changing C++ (the build dir is reused, so it is incremental)
install: $(VENV)/.build-deps
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]' \
	    -Ccmake.define.PYLLAMA_UPSTREAM_TOOLS=ON

# upstream's own llama-completion and llama-bench, from the same vendored tree and flags
upstream-tools: install
	$(VENV)/bin/cmake --build $(BUILD_DIR) --target llama-completion llama-bench llama-quantize
	mkdir -p build/bin && cp $(BUILD_DIR)/bin/llama-completion $(BUILD_DIR)/bin/llama-bench \
	    $(BUILD_DIR)/bin/llama-quantize build/bin/

demo: install
	$(PY) -m pyllama_inf.cli demo

test: upstream-tools
	$(PY) -m pytest -q

bench: upstream-tools
	$(PY) benchmarks/overhead.py --out benchmarks/results

# a CUDA wheel in its own build directory (dist/); CUDA_ARCH: one architecture. Extra CMake
# options for this build: CUDA_CMAKE="-Ccmake.define.CUDAToolkit_ROOT=/path ..."
CUDA_ARCH ?= 90
CUDA_CMAKE ?=
cuda: $(VENV)/.build-deps
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist . \
	    -Cbuild-dir=build/cuda-$(CUDA_ARCH) -Ccmake.define.GGML_CUDA=ON \
	    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) $(CUDA_CMAKE)

clean:
	rm -rf build $(VENV) vendor
