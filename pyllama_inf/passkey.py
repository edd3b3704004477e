"""Passkey retrieval: a number hidden at some depth of a long filler text.

The model is asked for the number at the end of the prompt; a trial passes when the first
number in its greedy answer equals the key. Lengths are measured in the model's tokens.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, List, Sequence

INTRO = ("Below is a long text. Most of it is filler, but one line holds a pass key that you "
         "must remember, because you will be asked for it at the end.\n\n")
FILLER = ("The meadow stays green. The clouds drift east. The river runs to the sea. "
          "The road goes on and on. ")
NEEDLE = "\nRemember this: the pass key is {key}. The pass key is {key}.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class PasskeyTask:
    """One prompt: ``answer`` is hidden at fraction ``depth`` of a ``n_tokens``-token prompt."""

    prompt: str
    answer: str
    n_tokens: int
    depth: float
    seed: int


def make_task(n_tokens: int, depth: float, seed: int, count_tokens: Callable[[str], int]) -> PasskeyTask:
    """Build a prompt of about ``n_tokens`` tokens (as counted by ``count_tokens``) with a
    5-digit key at ``depth`` (0 = start of the filler, 1 = end). Deterministic in ``seed``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = NEEDLE.format(key=key)
    fixed = count_tokens(INTRO + needle + QUESTION)
    per_filler = max(1, count_tokens(FILLER * 20) / 20)
    n_filler = max(0, round((n_tokens - fixed) / per_filler))
    for _ in range(4):  # a few corrections: token counts are not exactly additive
        before = round(n_filler * depth)
        prompt = INTRO + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
        got = count_tokens(prompt)
        if abs(got - n_tokens) <= per_filler:
            break
        n_filler = max(0, n_filler + round((n_tokens - got) / per_filler))
    return PasskeyTask(prompt=prompt, answer=key, n_tokens=got, depth=depth, seed=seed)


def is_correct(task: PasskeyTask, text: str) -> bool:
    """True when the first number in ``text`` is the key."""
    m = _NUMBER.search(text)
    return m is not None and m.group(0) == task.answer


@dataclass(frozen=True)
class PasskeyResult:
    """Outcome of one trial."""

    n_tokens: int
    depth: float
    seed: int
    answer: str
    output: str
    correct: bool
    prefill_tok_s: float


def run(model, length: int, depths: Sequence[float], trials: int, *, seed: int = 0,
        progress: bool = False) -> List[PasskeyResult]:
    """Run ``trials`` prompts at each depth on ``model`` (a :class:`pyllama_inf.Model`)."""
    results = []
    count = lambda text: len(model.tokenize(text))  # noqa: E731
    for depth in depths:
        for t in range(trials):
            task = make_task(length, depth, seed + t, count)
            r = model.generate(task.prompt, max_tokens=8, temperature=0, progress=progress)
            results.append(PasskeyResult(n_tokens=task.n_tokens, depth=depth, seed=seed + t, answer=task.answer,
                                         output=r.text, correct=is_correct(task, r.text),
                                         prefill_tok_s=r.timings.prefill_tok_s))
    return results
