"""What the package ships besides code: a type stub that matches the native module, py.typed,
licenses, one version."""

import ast
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyllama_inf as pi
import pyllama_inf._core as core

PKG = Path(pi.__file__).resolve().parent
ROOT = PKG.parent


def stub_names():
    """Names the stub declares: module level, and per class."""
    tree = ast.parse((PKG / "_core.pyi").read_text())
    top, classes = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            classes[node.name] = {b.name for b in node.body if isinstance(b, ast.FunctionDef)} | \
                                 {b.target.id for b in node.body if isinstance(b, ast.AnnAssign)}
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            top.add(node.target.id)
    return top, classes


def test_stub_declares_everything_the_native_module_has():
    top, classes = stub_names()
    real = {n for n in dir(core) if not n.startswith("_")}
    assert real == top, f"missing in the stub: {real - top}; not in the module: {top - real}"
    for name in sorted(real):
        obj = getattr(core, name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            attrs = {a for a in dir(obj) if not a.startswith("_")}
            declared = classes[name] - {"__init__"}
            assert attrs == declared, f"{name}: missing {attrs - declared}, stale {declared - attrs}"


def test_typed_marker_and_licenses_ship_with_the_package():
    assert (PKG / "py.typed").is_file()
    assert "Permission is hereby granted" in (ROOT / "LICENSE").read_text()


def test_one_version():
    text = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version\s*=', text, re.M), "the version is read from pyllama_inf/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pi.__version__)


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("nm") is None, reason="ELF and nm only")
def test_native_module_exports_its_init_function_alone():
    """llama.cpp, ggml and the libstdc++ template code they instantiate are linked into _core;
    none of it may be exported, or its static data binds to other modules' copies (a crash
    in the tokenizer's std::regex was seen on a GCC 13 build when numpy was imported first)."""
    out = subprocess.run(["nm", "-D", "--defined-only", core.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert [line.split()[-1] for line in out.splitlines()] == ["PyInit__core"], out[:2000]


def test_model_loads_after_numpy_and_gguf_were_imported_first(tiny_model):
    """The import order that crashed: numpy (and gguf) loaded before the native module."""
    code = ("import numpy, numpy.random, gguf\n"
            "import pyllama_inf as pi\n"
            f"with pi.Model({tiny_model!r}, n_ctx=256, n_threads=1) as m:\n"
            "    print(m.logits(m.tokenize('hello world')).shape[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) >= 2
