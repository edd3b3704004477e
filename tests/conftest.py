"""Shared fixtures: the real test model, a synthetic model and upstream's own tools."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tiny_ids(n: int) -> list[int]:
    """n token ids inside the synthetic models' vocabulary (pyllama_inf.testing, 278 tokens)."""
    return [2 + (i * 7 + i // 13) % 250 for i in range(n)]


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct Q4_1 (fetched and verified once, then cached)."""
    from pyllama_inf.testing import smollm2_path
    return str(smollm2_path())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random-weight llama GGUF (2 layers, n_embd 64)."""
    from pyllama_inf.testing import write_random_llama
    return str(write_random_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=1))


def upstream_tool(name: str) -> Path:
    """An upstream llama.cpp tool built from the same vendored tree (`make upstream-tools`)."""
    base = Path(os.environ.get("PYLLAMA_INF_UPSTREAM_BIN", ROOT / "build" / "bin"))
    path = base / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build upstream's tools first with `make upstream-tools`")
    return path


def run_upstream_completion(model: str, prompt: str, *, n: int, flash_attn: bool, n_ctx: int = 512,
                            threads: int = 2) -> str:
    """Greedy text from upstream's llama-completion (its own sampling and decode loop)."""
    cmd = [str(upstream_tool("llama-completion")), "-m", model, "-p", prompt, "-n", str(n),
           "--temp", "0", "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
           "-fa", "on" if flash_attn else "off", "-no-cnv", "--no-display-prompt", "--no-warmup",
           "--seed", "1", "-ngl", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
