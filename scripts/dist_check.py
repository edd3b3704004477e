#!/usr/bin/env python3
"""Build and install pyllama-inf as a user would, and check what ships.

1. ``python -m build``: an sdist, then a wheel built from that sdist in an isolated
   environment. The llama.cpp fetch is disabled for the build (PYLLAMA_INF_UPSTREAM_SDIST
   points nowhere), so the wheel can only build if the sdist carries the pinned source.
2. The sdist holds the verified, patched llama.cpp (its stamp, its license) and the patches,
   but not upstream's models or docs; the wheel holds the native module, the stub, py.typed
   and both licenses, and no tests or benchmarks.
3. The wheel goes into a fresh venv, and a smoke test runs from a directory outside the
   source tree: import, inspect, a short generate and the CLI, on a tiny random model.

4. With --also-python, the same sdist builds a wheel for each other interpreter named (each
   in its own isolated environment), which gets the same smoke test in its own fresh venv;
   an interpreter that is not installed is reported and skipped.

Usage: python scripts/dist_check.py [--keep DIR] [--also-python python3.10,python3.13]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SMOKE = r'''
import os, subprocess, sys, tempfile
from pathlib import Path
import pyllama_inf as pi
from pyllama_inf.testing import write_random_llama
here = Path(pi.__file__).resolve()
assert "site-packages" in str(here), f"imported from {here}, not from the installed wheel"
tmp = Path(tempfile.mkdtemp())
model = write_random_llama(tmp / "tiny.gguf", seed=1)
info = pi.inspect(model)
assert info.n_layer == 2, info
with pi.Model(str(model), n_ctx=256, n_threads=2) as m:
    r = m.generate("Hello there", max_tokens=4, temperature=0)
    assert r.n_prompt_tokens > 0 and len(r.tokens) == 4, r
with pi.Model(str(model), n_ctx=512, n_threads=2, kv="infllm",
              infllm=pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=0)) as m:
    assert len(m.generate("x " * 150, max_tokens=4, temperature=0).tokens) == 4
cli = Path(sys.executable).parent / "pyllama-inf"
out = subprocess.run([str(cli), "inspect", str(model)], capture_output=True, text=True, check=True).stdout
assert "n_layer" in out, out
out = subprocess.run([str(cli), "generate", "-m", str(model), "-p", "Hi", "-n", "3", "--temp", "0", "-t", "2"],
                     capture_output=True, text=True)
assert out.returncode == 0, out.stderr[-2000:]
print("smoke test passed:", pi.__version__, pi.UPSTREAM_COMMIT, here.parent)
'''


def run(cmd: list, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def check_sdist(path: Path) -> None:
    with tarfile.open(path) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    need = ["pyproject.toml", "CMakeLists.txt", "LICENSE", "scripts/vendor_llama.py", "patches/",
            "vendor/llama.cpp/.pyllama-inf-stamp.json", "vendor/llama.cpp/LICENSE", "vendor/llama.cpp/src/llama.cpp",
            "vendor/llama.cpp/ggml/src/ggml.c", "csrc/engine/llama-kv-cache-infllm.cpp"]
    for n in need:
        assert any(x == n or x.startswith(n) for x in names), f"sdist lacks {n}"
    for bad in ("vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "build/", "benchmarks/results/"):
        assert not any(x.startswith(bad) for x in names), f"sdist holds {bad}"
    print(f"sdist ok: {len(names)} files, {path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)


def check_wheel(path: Path) -> None:
    names = zipfile.ZipFile(path).namelist()
    need = ["pyllama_inf/__init__.py", "pyllama_inf/_core.pyi", "pyllama_inf/py.typed",
            "pyllama_inf/licenses/LICENSE-llama.cpp-ggml"]
    for n in need:
        assert n in names, f"wheel lacks {n}"
    assert any(n.startswith("pyllama_inf/_core.") and n.endswith(".so") for n in names), "wheel lacks _core"
    assert any(".dist-info/" in n and n.endswith("LICENSE") for n in names), "wheel lacks the project's LICENSE"
    for bad in ("tests/", "benchmarks/", "vendor/", "csrc/"):
        assert not any(n.startswith(bad) for n in names), f"wheel holds {bad}"
    print(f"wheel ok: {len(names)} files, {path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="build into this directory and keep it")
    ap.add_argument("--also-python", default="", help="comma-separated other interpreters to build and test for")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pyllama-inf-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    # the checkout's tree must be prepared (fetched, verified, patched) before it is packed
    run([py, ROOT / "scripts" / "vendor_llama.py"])
    run([py, "-m", "pip", "install", "-q", "build"])
    env = dict(os.environ, PYLLAMA_INF_UPSTREAM_SDIST=str(work / "no-such-archive.tar.gz"))
    run([py, "-m", "build", "--outdir", work / "dist", ROOT], env=env)
    sdist = next((work / "dist").glob("*.tar.gz"))
    wheel = next((work / "dist").glob("*.whl"))
    check_sdist(sdist)
    check_wheel(wheel)
    smoke(py, wheel, work / "venv")
    for other in [p for p in args.also_python.split(",") if p]:
        exe = find_python(other)
        if exe is None:
            print(f"dist check: {other} is not installed here; skipped", file=sys.stderr)
            continue
        tools = work / f"build-{other}"
        run([exe, "-m", "venv", tools])
        run([tools / "bin" / "python", "-m", "pip", "install", "-q", "build"])
        out = work / f"dist-{other}"
        run([tools / "bin" / "python", "-m", "build", "--wheel", "--outdir", out, sdist], env=env)
        built = next(out.glob("*.whl"))
        check_wheel(built)
        smoke(exe, built, work / f"venv-{other}")
    return 0


def find_python(name: str) -> str | None:
    """An interpreter called name that runs: on PATH, or among pyenv's installed versions
    (whose shims fail for versions that are not selected)."""
    candidates = [shutil.which(name)]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(str(p) for p in Path(root).glob(f"versions/*/bin/{name}")) if root else []
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "import venv"], capture_output=True).returncode == 0:
            return exe
    return None


def smoke(python: str, wheel: Path, venv: Path) -> None:
    """Install the wheel into a fresh venv of python and run the smoke test outside the tree."""
    run([python, "-m", "venv", venv])
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    outside = venv.parent / "outside"
    outside.mkdir(exist_ok=True)
    run([venv / "bin" / "python", "-c", SMOKE], cwd=outside)


if __name__ == "__main__":
    sys.exit(main())
