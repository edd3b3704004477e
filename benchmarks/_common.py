"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pyllama_inf as pi

FILLER = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill. "
          "Scholars argued for hours about the meaning of the inscription on the northern wall. ")


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}


def command() -> str:
    """The command line that is running, for the results file."""
    return "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def prompt_of(m: pi.Model, n_tokens: int) -> str:
    """A text that tokenizes to about n_tokens tokens with m's tokenizer (checked)."""
    text = FILLER * (n_tokens // 30 + 2)
    ids = m.tokenize(text)[:n_tokens]
    text = m.detokenize(ids)
    got = len(m.tokenize(text))
    if abs(got - n_tokens) > 2:
        raise RuntimeError(f"could not build a {n_tokens}-token prompt (got {got})")
    return text


def write_markdown(out: Path, name: str, lines: list[str]) -> int:
    """Write lines as out/name.md, print them, and return 0 (the script's exit status)."""
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text, end="")
    return 0
