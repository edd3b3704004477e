#!/usr/bin/env bash
# The device path on a CUDA GPU, in one go, for a machine that has one (about 5 minutes on a
# 16-core H200 node, 3.5 of them the build; nothing of it runs in CI):
#   1. build the package for one CUDA architecture (build/cuda-$CUDA_ARCH), editable;
#   2. the device tests on the GPU (tests/test_device.py: stock vs InfLLM agreement, resident
#      vs offload bit-identical, blocks evicted and fetched, zero transfers when resident), as
#      built and again with GGML_CUDA_GRAPH_OPT=1 (ggml-cuda may reorder nodes), on a tiny
#      model of head dim $DEVICE_HEAD_DIM (default 64);
#   3. stock vs InfLLM prefill and decode at $DEPTHS, every layer on the GPU
#      (benchmarks/infllm_speed.py --n-gpu-layers -1);
#   4. the host tier on the GPU: device bytes under a budget as the context grows, and the
#      cost of offload (benchmarks/offload.py --n-gpu-layers -1).
# Steps 2-4 each get what is left of DEADLINE_S; a step that fails or runs out of time does not
# stop the next. OUT_DIR receives at most 8 files: gpu.txt (machine, step times and exit
# codes), run.log (the steps' output), infllm_speed.{json,md}, offload.{json,md}, and
# cuda-graphs-off/infllm_speed.{json,md}; build.log only when the build fails.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]  (default benchmarks/results/gpu)
#   BACKEND=cuda        or vulkan, or cpu (no GPU: a dry run of everything but the GPU)
#   CUDA_ARCH=90        one architecture (90: H100/H200)
#   CUDA_CMAKE="-Ccmake.define.X=Y ..."  extra build options
#   PY=python3          install into this interpreter's environment (default: a venv, $VENV)
#   VENV=.venv-cuda     the venv made when PY is not given (its packages from the index)
#   WHEELHOUSE=dir      no package index: what PY lacks comes from the wheels in dir only
#   SDIST=file          this project's sdist: where the checkout has no vendor/llama.cpp, the
#                       verified, patched tree it carries is unpacked (no download)
#   MODEL=file|random   the model of steps 3-4 (default: the SmolLM2 test model; "random":
#                       random weights in SmolLM2-135M's shape, Q8_0, written here — the
#                       default with WHEELHOUSE, where the test model cannot be fetched)
#   DEPTHS=16384,32768,65536,131072  step 3's depths;  THREADS=8  CPU threads
#   DEVICE_HEAD_DIM=64  the head dim of step 2's tiny model
#   DEADLINE_S=540      seconds from the start within which the script ends
#   ONLY_BUILD=1        stop after step 1 (the build), e.g. to run something else on it
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${1:-benchmarks/results/gpu}
ARCH=${CUDA_ARCH:-90}
BACKEND=${BACKEND:-cuda}
BUILD=build/$BACKEND-check
[ "$BACKEND" = cuda ] && BUILD=build/cuda-$ARCH
DEADLINE=${DEADLINE_S:-540}
DEPTHS=${DEPTHS:-16384,32768,65536,131072}
THREADS=${THREADS:-8}
mkdir -p "$OUT" build
OUT=$(cd "$OUT" && pwd)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
note() { echo "$*" | tee -a "$OUT/gpu.txt"; }
step() { echo "== $1 ($(date +%T), $(left) s left)"; }
die() { note "FAILED: $*"; exit 1; }

: > "$OUT/gpu.txt"
note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
note "commit: ${PYLLAMA_INF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
note "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# --- the interpreter and what the build and the tests need -------------------------------------
if [ -n "${PY:-}" ]; then
    PY=$(command -v "$PY") || die "no interpreter $PY"
else
    VENV=${VENV:-.venv-cuda}
    test -x "$VENV/bin/python" || python3 -m venv "$VENV" || die "venv"
    PY=$VENV/bin/python
fi
pip_get() {   # install the named distributions (from WHEELHOUSE alone when it is set)
    if [ -n "${WHEELHOUSE:-}" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}
missing=()
for pair in scikit_build_core:scikit-build-core pybind11:pybind11 cmake:cmake ninja:ninja numpy:numpy \
            gguf:gguf tqdm:tqdm pytest:pytest hypothesis:hypothesis; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
note "python: $("$PY" --version 2>&1); installing: ${missing[*]:-nothing}"
[ ${#missing[@]} -eq 0 ] || pip_get "${missing[@]}" || die "could not install ${missing[*]}"
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"

# --- the pinned llama.cpp ---------------------------------------------------------------------------
if [ ! -f vendor/llama.cpp/CMakeLists.txt ] && [ -n "${SDIST:-}" ]; then
    mkdir -p vendor
    tar -xzf "$SDIST" -C vendor --strip-components=2 --wildcards '*/vendor/llama.cpp/*' || die "unpacking $SDIST"
fi

# --- the CUDA toolkit: nvcc, cuBLAS, the driver stub ------------------------------------------------
case $BACKEND in
    cuda) BACKEND_OPTS=(-Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH") ;;
    vulkan) BACKEND_OPTS=(-Ccmake.define.GGML_VULKAN=ON) ;;
    cpu) BACKEND_OPTS=() ;;
    *) die "BACKEND must be cuda, vulkan or cpu" ;;
esac
CUDA_OPTS=()
if [ "$BACKEND" = cuda ]; then
    NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null) || die "no nvcc"
    CUDA=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
    CUDA_OPTS=(-Ccmake.define.CMAKE_CUDA_COMPILER="$NVCC")
    note "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
    if ! ls "$CUDA"/include/cublas_v2.h "$CUDA"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
        # no cuBLAS in the toolkit: take the one the interpreter's NVIDIA packages hold
        # (PyTorch's), its headers alone on the include path, its libraries named to CMake
        hdr=$("$PY" -c "import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d).rglob('cublas_v2.h')))" 2>/dev/null) \
            || die "the toolkit at $CUDA has no cuBLAS and the interpreter's nvidia packages hold none"
        blas=$(dirname "$(dirname "$hdr")")
        inc=$PWD/build/cublas-include
        rm -rf "$inc"; mkdir -p "$inc"; ln -s "$blas"/include/cublas* "$inc/"
        CUDA_OPTS+=(-Ccmake.define.CMAKE_CUDA_FLAGS="-I$inc" -Ccmake.define.CMAKE_CXX_FLAGS="-I$inc"
                    -Ccmake.define.CUDA_cublas_LIBRARY="$(ls "$blas"/lib/libcublas.so.* | head -n 1)"
                    -Ccmake.define.CUDA_cublasLt_LIBRARY="$(ls "$blas"/lib/libcublasLt.so.* | head -n 1)")
        export LD_LIBRARY_PATH="$blas/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        note "cuBLAS: from $blas"
    fi
    if ! ls "$CUDA"/lib64/stubs/libcuda.so "$CUDA"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1; then
        CUDA_OPTS+=(-Ccmake.define.GGML_CUDA_NO_VMM=ON)   # no driver library to link against
        note "no libcuda stub: GGML_CUDA_NO_VMM=ON"
    fi
fi
TOOLS=OFF
[ -f vendor/llama.cpp/tools/CMakeLists.txt ] && TOOLS=ON   # the sdist's tree has no tools

# --- 1. build ----------------------------------------------------------------------------------------
step "build ($BACKEND, upstream tools $TOOLS)"
t=$(date +%s)
# shellcheck disable=SC2086
"$PY" -m pip install -v --no-build-isolation --no-deps -e . -Cbuild-dir="$BUILD" \
    "${BACKEND_OPTS[@]}" -Ccmake.define.PYLLAMA_UPSTREAM_TOOLS=$TOOLS "${CUDA_OPTS[@]}" ${CUDA_CMAKE:-} > build/check-build.log 2>&1 \
    || { cp build/check-build.log "$OUT/build.log"; tail -n 60 "$OUT/build.log"; die "build (build.log)"; }
if [ "$TOOLS" = ON ]; then
    cmake --build "$BUILD" --target ggml-rpc-server >> build/check-build.log 2>&1 \
        && mkdir -p build/bin && cp "$BUILD/bin/ggml-rpc-server" build/bin/
fi
note "build: $(( $(date +%s) - t )) s"
DEVICES=$(cd /tmp && "$PY" -c 'import pyllama_inf as pi; print(pi.gpu_devices())') || die "import"
note "devices: $DEVICES"
[ -n "${ONLY_BUILD:-}" ] && exit 0

run_step() {   # run_step NAME SECONDS LOG CMD...: a step under its own time limit, rc noted
    local name=$1 secs=$2 log=$3; shift 3
    step "$name (limit $secs s)"
    if [ "$secs" -lt 20 ]; then note "$name: skipped, no time left"; return; fi
    t=$(date +%s)
    timeout -k 5 "$secs" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    note "$name: rc=$rc, $(( $(date +%s) - t )) s"
}

# --- 2. device tests ---------------------------------------------------------------------------------
# head dim 64: ggml-cuda's flash attention has no kernel for the tiny model's 16 (the node
# would run on the CPU), and 64 is SmolLM2's
export PYLLAMA_INF_DEVICE_HEAD_DIM=${DEVICE_HEAD_DIM:-64}
TESTS=("$PY" -m pytest -q -p no:cacheprovider tests/test_device.py)
run_step "device tests" $(( $(left) - 240 < 180 ? $(left) - 240 : 180 )) run.log "${TESTS[@]}"
run_step "device tests, GGML_CUDA_GRAPH_OPT=1" $(( $(left) - 200 < 120 ? $(left) - 200 : 120 )) run.log \
    env GGML_CUDA_GRAPH_OPT=1 "${TESTS[@]}"

# --- 3-4. speed and the host tier ------------------------------------------------------------------
if [ -z "${MODEL:-}" ] && [ -n "${WHEELHOUSE:-}" ]; then MODEL=random; fi
if [ "${MODEL:-}" = random ]; then
    MODEL=build/random-smollm2-shape.gguf
    "$PY" -c "
from pyllama_inf.testing import write_random_llama
# SmolLM2-135M's shape (its GGUF metadata): 30 layers, 576 wide, 9 heads, 3 KV heads of 64, FFN 1536
write_random_llama('$MODEL', n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536,
                   n_ctx_train=8192, rope_theta=100000.0, dtype='q8_0', seed=0)" || die "random model"
    note "model: random weights in SmolLM2-135M's shape (Q8_0)"
fi
MODEL_ARG=()
[ -n "${MODEL:-}" ] && MODEL_ARG=(--model "$(readlink -f "$MODEL")")
cd benchmarks
run_step "speed at $DEPTHS" $(( $(left) - 150 )) run.log "$PY" infllm_speed.py --depths "$DEPTHS" --n-gen 64 \
    --reps 2 --threads "$THREADS" --n-gpu-layers -1 "${MODEL_ARG[@]}" --out "$OUT"
# InfLLM alone again with ggml-cuda's CUDA graphs off: do graph re-captures cost its decode?
run_step "InfLLM speed, CUDA graphs off" $(( $(left) - 100 )) run.log env GGML_CUDA_DISABLE_GRAPHS=1 "$PY" \
    infllm_speed.py --depths 32768 --n-gen 64 --reps 2 --stock none --threads "$THREADS" --n-gpu-layers -1 \
    "${MODEL_ARG[@]}" --out "$OUT/cuda-graphs-off"
run_step "host tier" $(( $(left) - 5 )) run.log "$PY" offload.py --length 65536 --every 16384 --cost-length 16384 \
    --n-gen 64 --threads "$THREADS" --n-gpu-layers -1 "${MODEL_ARG[@]}" --out "$OUT"
step "done: $OUT"
