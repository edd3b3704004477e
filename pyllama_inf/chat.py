"""A conversation on a terminal (``pyllama-inf chat``): a document read once, then questions
answered from the context the model keeps between turns."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, TextIO

from ._model import Model
from .errors import ContextFullError, PyllamaError

DOCUMENT_SYSTEM = "Answer the user's questions about the following document."


def opening(document: Optional[str], system: Optional[str]) -> List[Dict[str, str]]:
    """The messages before the first question: the system message, with the document in it."""
    if document is None:
        return [] if system is None else [{"role": "system", "content": system}]
    intro = DOCUMENT_SYSTEM if system is None else system
    return [{"role": "system", "content": f"{intro}\n\n<document>\n{document}\n</document>"}]


def read_document(m: Model, messages: List[Dict[str, str]], *, template: Optional[str], state: Optional[str],
                  progress, stderr: TextIO) -> None:
    """Evaluate the opening messages (or load them from ``state``), so that the first question
    only adds its own tokens; save them to ``state`` when it was not there."""
    if state is not None and os.path.exists(state):
        m.load_state(state)
        stderr.write(f"[context loaded from {state}: {len(m.context_tokens)} tokens]\n")
    if not messages:
        return
    prefix = m.apply_chat_template(messages, add_generation_prompt=False, template=template)
    r = m.generate(prefix, max_tokens=0, progress=progress)
    stderr.write(f"[document: {r.n_prompt_tokens} tokens, {r.timings.prompt_tokens} evaluated in "
                 f"{r.timings.prefill_s:.1f} s]\n")
    if state is not None and not os.path.exists(state):
        m.save_state(state)
        stderr.write(f"[context saved to {state}]\n")


def interactive(m: Model, *, document: Optional[str], system: Optional[str], template: Optional[str],
                state: Optional[str], sampling: dict, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read questions from ``stdin`` until end of input or ``/exit``; stream each answer to
    ``stdout`` and a line of statistics to ``stderr``. ``/reset`` forgets the conversation
    (not the document). Ctrl-C stops an answer, a second one at the prompt ends the session.
    Returns the number of answered questions."""
    progress = stderr.isatty()
    messages = opening(document, system)
    read_document(m, messages, template=template, state=state, progress=progress, stderr=stderr)
    start = list(messages)
    answered = 0
    while True:
        stderr.write("> ")
        stderr.flush()
        line = stdin.readline()
        if not line:
            stderr.write("\n")
            return answered
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return answered
        if question == "/reset":
            messages = list(start)
            stderr.write("[conversation forgotten]\n")
            continue
        messages.append({"role": "user", "content": question})
        try:
            with m.chat(messages, template=template, stream=True, progress=progress, **sampling) as stream:
                for piece in stream:
                    stdout.write(piece)
                    stdout.flush()
        except KeyboardInterrupt:
            messages.pop()
            stdout.write("\n")
            stderr.write("[answer stopped]\n")
            continue
        except ContextFullError as e:
            messages.pop()
            stderr.write(f"[{e}; /reset starts the conversation again]\n")
            continue
        except PyllamaError as e:
            messages.pop()
            stderr.write(f"[error: {e}]\n")
            continue
        r = stream.result
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": r.text})
        answered += 1
        t = r.timings
        stderr.write(f"[{t.prompt_tokens} prompt tokens evaluated in {t.prefill_s:.2f} s, {r.n_reused_tokens} kept; "
                     f"{len(r.tokens)} tokens at {t.decode_tok_s:.1f} tok/s]\n")
