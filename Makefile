# Two commands do everything: `make demo` and `make test`. Each creates .venv on first use.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
BUILD_DEPS  := scikit-build-core pybind11 pip cmake ninja
# the pip build directory (persistent, incremental): build/<wheel tag>
BUILD_DIR    = $(shell ls -d build/cp*/ 2>/dev/null | head -n 1)
JOBS        ?= $(shell nproc)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(JOBS)

.PHONY: install demo test test-slow test-vulkan vulkan-install upstream-tools bench kernel-bench cuda sanitize clean dist-check

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
	$(VENV)/bin/cmake --build $(BUILD_DIR) --target llama-completion llama-bench llama-quantize ggml-rpc-server
	mkdir -p build/bin && cp $(BUILD_DIR)/bin/llama-completion $(BUILD_DIR)/bin/llama-bench \
	    $(BUILD_DIR)/bin/llama-quantize $(BUILD_DIR)/bin/ggml-rpc-server build/bin/

demo: install
	$(PY) -m pyllama_inf.cli demo

# the suite without the tests marked slow (the README's test command); CI runs both
test: upstream-tools
	$(PY) -m pytest -q --durations=20 -m "not slow"

test-slow: upstream-tools
	$(PY) -m pytest -q --durations=10 -m slow

# build like a user: sdist -> isolated wheel (no llama.cpp download allowed) -> fresh venv -> smoke
# test outside the tree; checks what the sdist and the wheel hold (scripts/dist_check.py)
DIST_PYTHONS ?= python3.10
dist-check: $(VENV)/.build-deps
	$(PY) scripts/dist_check.py --also-python $(DIST_PYTHONS)

bench: upstream-tools
	$(PY) benchmarks/overhead.py --out benchmarks/results

# the CPU decode kernel alone (benchmarks/attn_kernel_bench.cpp), linked against the build's ggml
GGML_LIBS = $(addprefix $(BUILD_DIR)llama.cpp/ggml/src/,libggml.a libggml-cpu.a libggml-base.a)
kernel-bench: install
	mkdir -p build/bin
	$(CXX) -O3 -DNDEBUG -std=c++17 -Icsrc/engine -Ivendor/llama.cpp/ggml/include \
	    benchmarks/attn_kernel_bench.cpp csrc/engine/llama-infllm-attn-cpu.cpp $(GGML_LIBS) \
	    -fopenmp -lpthread -o build/bin/attn_kernel_bench

# a CUDA wheel in its own build directory (dist/); CUDA_ARCH: one architecture. Extra CMake
# options for this build: CUDA_CMAKE="-Ccmake.define.CUDAToolkit_ROOT=/path ..."
CUDA_ARCH ?= 90
CUDA_CMAKE ?=
cuda: $(VENV)/.build-deps
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist . \
	    -Cbuild-dir=build/cuda-$(CUDA_ARCH) -Ccmake.define.GGML_CUDA=ON \
	    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) $(CUDA_CMAKE)

# the test suite against a build with AddressSanitizer + UndefinedBehaviorSanitizer (its own
# venv and build dir; python itself is not instrumented, so the runtimes are preloaded).
# Leak checks are off: the interpreter keeps memory until exit by design.
SAN_VENV   ?= .venv-san
SAN_FLAGS  := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
SAN_CMAKE   = -Cbuild-dir=build/sanitize -Ccmake.build-type=RelWithDebInfo \
	-Ccmake.define.CMAKE_C_FLAGS="$(SAN_FLAGS)" -Ccmake.define.CMAKE_CXX_FLAGS="$(SAN_FLAGS)" \
	-Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
	-Ccmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
	-Ccmake.define.CMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
SAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
SAN_TESTS  ?= tests
sanitize: upstream-tools
	test -x $(SAN_VENV)/bin/python || $(PYTHON) -m venv $(SAN_VENV)
	$(SAN_VENV)/bin/python -m pip install -q --upgrade $(BUILD_DEPS)
	$(SAN_VENV)/bin/python -m pip install -q --no-build-isolation -e '.[test,bench]' $(SAN_CMAKE)
	LD_PRELOAD="$(SAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYLLAMA_INF_SANITIZED=1 \
	    $(SAN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SAN_TESTS)

# the device tests on Vulkan (Mesa's lavapipe: a Vulkan device that computes on the CPU),
# from a Vulkan build in its own venv and build dir. Needs the Debian packages
# mesa-vulkan-drivers glslc libvulkan-dev; ggml only lists CPU-type Vulkan devices when
# GGML_VK_VISIBLE_DEVICES names them.
VK_VENV  ?= .venv-vulkan
VK_CMAKE := -Cbuild-dir=build/vulkan -Ccmake.define.GGML_VULKAN=ON
vulkan-install: $(VENV)/.build-deps
	test -x $(VK_VENV)/bin/python || $(PYTHON) -m venv $(VK_VENV)
	$(VK_VENV)/bin/python -m pip install -q --upgrade $(BUILD_DEPS)
	$(VK_VENV)/bin/python -m pip install -q --no-build-isolation -e '.[test]' $(VK_CMAKE)

test-vulkan: vulkan-install upstream-tools
	GGML_VK_VISIBLE_DEVICES=0 PYLLAMA_INF_DEVICE_TESTS=vulkan $(VK_VENV)/bin/python -m pytest -q tests/test_device.py

clean:
	rm -rf build $(VENV) $(SAN_VENV) $(VK_VENV) vendor
