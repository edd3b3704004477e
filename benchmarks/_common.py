"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pyllama_inf as pi

from pyllama_inf.bench import cpu_name, filler_prompt


def project_commit() -> str:
    """$PYLLAMA_INF_COMMIT where set (a copy of the tree, whose .git, if any, may be stale: the
    first GPU run's files named the session's first commit), else the checkout's commit
    ("+changes" when the tree differs from it), "unknown" outside git."""
    explicit = os.environ.get("PYLLAMA_INF_COMMIT")
    if explicit:
        return explicit
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def machine() -> dict:
    """What the numbers were measured on, and with which commit of this project."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "commit": project_commit()}


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


def infllm_defaults(c: pi.InfLLMConfig | None = None) -> str:
    """An InfLLMConfig (the default one unless given) in words, as the results files name it."""
    c = c or pi.InfLLMConfig()
    return (f"block {c.block_size}, n_init {c.n_init}, n_local {c.n_local}, topk {c.topk}, rewind {c.rewind}, "
            f"repr_keys {c.repr_keys}, positions {c.positions}")


def header(title: str, meta: dict, about: str, machine_note: str = "") -> list[str]:
    """The opening lines of a results file: title, model, machine and commits, command, date."""
    m = meta["machine"]
    return [f"# {title}", "",
            f"- model: {meta['model']}, {about}",
            f"- machine: {m['cpu']}, {m['cores']} cores{machine_note}; pyllama-inf {m['commit']}, "
            f"llama.cpp {pi.UPSTREAM_COMMIT}",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']}"]


def write_markdown(out: Path, name: str, lines: list[str]) -> int:
    """Write lines as out/name.md, print them, and return 0 (the script's exit status)."""
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text, end="")
    return 0
