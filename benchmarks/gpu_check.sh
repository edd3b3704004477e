#!/usr/bin/env bash
# The device path on a CUDA GPU, in one go, for a machine that has one (sized for ~10 minutes
# on a 16-core H200 node; nothing of it runs in CI):
#   1. build the package for one CUDA architecture (ccache, build/cuda-$CUDA_ARCH, .venv-cuda),
#      with upstream's rpc-server;
#   2. the device tests on the GPU (tests/test_device.py: stock vs InfLLM agreement, resident
#      vs offload bit-identical, blocks evicted and fetched, zero transfers when resident);
#   3. stock vs InfLLM prefill and decode at 16K and 32K, every layer on the GPU
#      (benchmarks/infllm_speed.py --n-gpu-layers -1).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]  (default benchmarks/results/gpu)
#   CUDA_ARCH=90          one architecture (90: H100/H200)
#   CUDA_CMAKE="-D..."    extra CMake options, e.g. -DCUDAToolkit_ROOT=...
#   PIP_FIND_LINKS=dir    a wheelhouse when the machine has no package index
#   PYLLAMA_INF_UPSTREAM_SDIST=file  the pinned llama.cpp archive when it cannot be downloaded
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
ARCH=${CUDA_ARCH:-90}
VENV=${VENV:-.venv-cuda}
BUILD=build/cuda-$ARCH
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt" || true

step() { echo "== $1 ($(date +%T))"; }

step "build (CUDA $ARCH)"
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade scikit-build-core pybind11 cmake ninja numpy gguf tqdm pytest hypothesis
t0=$(date +%s)
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . -Cbuild-dir="$BUILD" \
    -Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -Ccmake.define.PYLLAMA_UPSTREAM_TOOLS=ON ${CUDA_CMAKE:-} 2>&1 | tail -20
"$VENV/bin/cmake" --build "$BUILD" --target ggml-rpc-server
mkdir -p build/bin && cp "$BUILD/bin/ggml-rpc-server" build/bin/
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"

step "device tests on $("$VENV/bin/python" -c 'import pyllama_inf as pi; print(pi.gpu_devices())')"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/device_tests.log"

step "speed, 16K and 32K, every layer on the GPU"
timeout 480 "$VENV/bin/python" benchmarks/infllm_speed.py --depths 16384,32768 --n-gen 64 --threads 8 \
    --n-gpu-layers -1 --out "$OUT" 2>&1 | tee "$OUT/speed.log"
step "done: $OUT"
