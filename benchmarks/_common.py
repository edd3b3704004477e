"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pyllama_inf as pi

from pyllama_inf.bench import cpu_name, filler_prompt


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
    text = filler_prompt(m, n_tokens)
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
