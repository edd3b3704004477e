"""Long-context evaluation: synthetic retrieval tasks and the loss on a long text.

Retrieval tasks are built locally from a seed (nothing is downloaded); lengths are counted in
the model's tokens, and the same seed gives the same prompt to every cache, so caches are
compared on identical prompts. Every task hides its facts at fractions of the prompt
("depths") in a filler text and asks for them at the end, in completion style (no chat
template), and is scored by exact match (every asked value right):

``passkey``     one 5-digit key in filler; the first number of the answer must be the key.
``multikey``    four "special magic numbers", each for another word; one word is asked and
                the first number of the answer must be its number (the others compete).
``multivalue``  one word holds four numbers; the answer must name all four.
``kv``          a JSON object of random UUID-like keys and values (no filler: the pairs are the
                haystack); the answer must begin with the asked key's value.
``vartrack``    a chain of variable assignments (``VAR A = 12345. VAR B = VAR A. ...``) in
                filler; the answer must name every variable of the chain.

The two tasks with several answers (multivalue, vartrack) also get a recall: the share of the
asked values the answer names (RULER's ``string_match_all``), which still separates caches
where a small model rarely names all four; for the others recall equals exact match.

The asked fact sits at ``depth`` (0 = start of the haystack, 1 = its end); the others at
seeded random depths. :func:`evaluate` runs a grid of cache x task x length x depth x trial,
appends every finished trial to ``records.jsonl`` (a run that stops keeps what it finished
and a new run with the same settings continues after it) and writes ``eval.json``,
``eval.md`` and ``eval.png``.

:func:`perplexity` scores the last ``target`` tokens of a long text given ``context - target``
tokens before them: the same scored tokens at every context length, so the loss shows how
much of the longer context a cache lets the model use. :func:`kjv_text` reads the King James
Bible from Debian's ``bible-kjv`` package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import passkey

TASKS = ("passkey", "multikey", "multivalue", "kv", "vartrack")
CACHES = ("full", "infllm")
MULTI_ANSWER = ("multivalue", "vartrack")   # the tasks whose recall differs from exact match

FILLER = passkey.FILLER
_NUMBER = re.compile(r"\d+")
_WORDS = ("apple", "river", "candle", "mountain", "violin", "harbor", "lantern", "meadow", "falcon", "pepper",
          "thunder", "garden", "compass", "marble", "orchid", "glacier", "saddle", "copper", "willow", "anchor",
          "biscuit", "canyon", "dolphin", "ember", "feather", "granite", "hammock", "island", "jasmine", "kettle")


@dataclass(frozen=True)
class Task:
    """One prompt of a task: ``answers`` must all be found in the answer (see the module doc)."""

    name: str
    prompt: str
    answers: Tuple[str, ...]
    n_tokens: int
    depth: float
    seed: int
    max_tokens: int


def _fit(n_tokens: int, build: Callable[[int], str], unit_tokens: float, count: Callable[[str], int]
         ) -> Tuple[str, int]:
    """The prompt build(n) whose token count is closest to n_tokens, n the number of filler
    units (each about unit_tokens tokens); a few corrections, counts are not exactly additive."""
    fixed = count(build(0))
    if fixed > n_tokens:
        raise ValueError(f"this task needs at least {fixed} tokens with this tokenizer, asked for {n_tokens}")
    n = max(0, round((n_tokens - fixed) / unit_tokens))
    prompt, got = build(n), 0
    for _ in range(5):
        prompt = build(n)
        got = count(prompt)
        if abs(got - n_tokens) <= unit_tokens:
            break
        n = max(0, n + round((n_tokens - got) / unit_tokens))
    return prompt, got


def _in_filler(intro: str, needles: Sequence[Tuple[float, str]], question: str) -> Callable[[int], str]:
    """A builder: n filler sentences with each needle at its depth (fraction of the filler)."""
    order = sorted(needles, key=lambda x: x[0])

    def build(n: int) -> str:
        parts, done = [intro], 0
        for depth, text in order:
            at = round(n * depth)
            parts.append(FILLER * (at - done))
            parts.append(text)
            done = at
        parts.append(FILLER * (n - done))
        parts.append(question)
        return "".join(parts)
    return build


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _distinct(rng: random.Random, n: int, make: Callable[[], str]) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        x = make()
        if x not in out:
            out.append(x)
    return out


def make_task(name: str, n_tokens: int, depth: float, seed: int, count_tokens: Callable[[str], int]) -> Task:
    """Build one prompt of task ``name`` of about ``n_tokens`` tokens (as ``count_tokens``
    counts them) with the asked fact at ``depth``. Deterministic in ``seed``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_tokens < 64:
        raise ValueError(f"a task prompt needs at least 64 tokens, got {n_tokens}")
    rng = random.Random(f"{name}:{seed}")
    filler_tokens = max(1.0, count_tokens(FILLER * 20) / 20)
    if name == "passkey":
        t = passkey.make_task(n_tokens, depth, seed, count_tokens)
        return Task(name, t.prompt, (t.answer,), t.n_tokens, depth, seed, max_tokens=8)
    if name == "multikey":
        words = rng.sample(_WORDS, 4)
        numbers = _distinct(rng, 4, lambda: _number(rng, 6))
        asked = words[0]
        depths = [depth] + [rng.random() for _ in words[1:]]
        build = _in_filler(
            "Below is a long text. Hidden in it are special magic numbers, each for a different word. "
            "Remember them: you will be asked for one of them at the end.\n\n",
            [(d, f"\nThe special magic number for {w} is {x}.\n") for d, w, x in zip(depths, words, numbers)],
            f"\n\nWhat is the special magic number for {asked}? The special magic number for {asked} is")
        prompt, got = _fit(n_tokens, build, filler_tokens, count_tokens)
        return Task(name, prompt, (numbers[0],), got, depth, seed, max_tokens=10)
    if name == "multivalue":
        word = rng.choice(_WORDS)
        numbers = _distinct(rng, 4, lambda: _number(rng, 6))
        depths = [depth] + [rng.random() for _ in numbers[1:]]
        build = _in_filler(
            f"Below is a long text. Hidden in it are four special magic numbers for the word {word}. "
            "Remember all of them: you will be asked for them at the end.\n\n",
            [(d, f"\nOne of the special magic numbers for {word} is {x}.\n") for d, x in zip(depths, numbers)],
            f"\n\nWhat are all the special magic numbers for {word}? The special magic numbers for {word} are")
        prompt, got = _fit(n_tokens, build, filler_tokens, count_tokens)
        return Task(name, prompt, tuple(numbers), got, depth, seed, max_tokens=48)
    if name == "vartrack":
        names = _distinct(rng, 4, lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        value = _number(rng, 5)
        later = sorted(depth + (1.0 - depth) * rng.random() for _ in names[1:])
        chain = [f"\nVAR {names[0]} = {value}.\n"] + [f"\nVAR {b} = VAR {a}.\n" for a, b in zip(names, names[1:])]
        build = _in_filler(
            "Memorize the variable assignments hidden in the text below. You will be asked which "
            "variables hold a value.\n\n",
            list(zip([depth] + later, chain)),
            f"\n\nWhich variables are assigned the value {value}? The variables assigned the value {value} are:")
        prompt, got = _fit(n_tokens, build, filler_tokens, count_tokens)
        return Task(name, prompt, tuple(names), got, depth, seed, max_tokens=32)
    # kv: the pairs are the haystack
    intro = "Extract the value that belongs to the given key from the JSON object below.\n\nJSON data:\n{"
    pair_tokens = max(1.0, count_tokens("".join(f'"{_uuid(rng)}": "{_uuid(rng)}", ' for _ in range(8))) / 8)
    pool: List[Tuple[str, str]] = []

    def build(n: int) -> str:
        while len(pool) < n + 1:
            pool.append((_uuid(rng), _uuid(rng)))
        pairs = pool[1:n + 1]
        pairs.insert(round(n * depth), pool[0])
        key = pool[0][0]
        return (intro + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}\n\n"
                f'Key: "{key}"\nThe value that belongs to the key "{key}" is: "')
    prompt, got = _fit(n_tokens, build, pair_tokens, count_tokens)
    return Task(name, prompt, (pool[0][1],), got, depth, seed, max_tokens=32)


def _n_found(name: str, answers: Sequence[str], text: str) -> int:
    """How many of ``answers`` the answer ``text`` gives, as task ``name`` scores it."""
    if name in ("passkey", "multikey"):
        m = _NUMBER.search(text)
        return int(m is not None and m.group(0) == answers[0])
    if name == "multivalue":
        found = set(_NUMBER.findall(text))
        return sum(a in found for a in answers)
    if name == "vartrack":
        found = set(re.findall(r"[A-Z]{5}", text))
        return sum(a in found for a in answers)
    return int(text.strip().startswith(answers[0]))


def is_correct(task: Task, text: str) -> bool:
    """Exact-match scoring of ``text`` (the model's answer) for ``task`` (see the module doc)."""
    return _n_found(task.name, task.answers, text) == len(task.answers)


def recall(task: str, answers: Sequence[str], text: str) -> float:
    """The share of ``answers`` that ``text`` gives for task ``task`` (1.0 or 0.0 for the
    tasks with one answer; see the module doc)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not answers:
        raise ValueError("recall needs at least one answer")
    return _n_found(task, answers, text) / len(answers)


# -- the grid --------------------------------------------------------------------------------

@dataclass
class EvalRecord:
    """One finished trial (a line of ``records.jsonl``)."""

    model: str
    cache: str
    setup: str              # the cache's settings, as compared on resume
    task: str
    length: int             # asked length
    n_tokens: int           # the prompt's real length
    depth: float
    trial: int
    seed: int
    answers: List[str]
    output: str
    correct: bool
    seconds: float

    def key(self) -> Tuple:
        return (self.model, self.setup, self.task, self.length, self.depth, self.trial)


@dataclass
class EvalSummary:
    """Accuracy of one model x cache x task x length over its trials; ``recalled`` is the sum
    of the trials' recalls (the share of the asked values named; ``correct`` when not given)."""

    model: str
    cache: str
    task: str
    length: int
    correct: int
    trials: int
    recalled: Optional[float] = None
    accuracy: float = field(init=False)
    recall: float = field(init=False)

    def __post_init__(self) -> None:
        if self.recalled is None:
            self.recalled = float(self.correct)
        self.accuracy = self.correct / self.trials if self.trials else float("nan")
        self.recall = self.recalled / self.trials if self.trials else float("nan")


def _setup_of(cache: str, infllm) -> str:
    if cache == "full":
        return "full"
    return "infllm " + json.dumps(dataclasses.asdict(infllm), sort_keys=True)


def _check_grid(caches, tasks, lengths, depths, trials) -> None:
    for c in caches:
        if c not in CACHES:
            raise ValueError(f"unknown cache {c!r}; choose from {', '.join(CACHES)}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if not caches or not tasks or not lengths or not depths:
        raise ValueError("caches, tasks, lengths and depths must each name at least one value")
    for n in lengths:
        if int(n) < 64:
            raise ValueError(f"lengths must be at least 64 tokens, got {n}")
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {d}")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")


def read_records(path: Union[str, Path]) -> List[EvalRecord]:
    """The trials in a ``records.jsonl`` (a torn last line, from a run that was killed, is skipped)."""
    path = Path(path)
    out: List[EvalRecord] = []
    if not path.exists():
        return out
    names = {f.name for f in dataclasses.fields(EvalRecord)}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and names <= d.keys():
            out.append(EvalRecord(**{k: d[k] for k in names}))
    return out


def summarize(records: Iterable[EvalRecord]) -> List[EvalSummary]:
    """Accuracy and recall per model x cache x task x length (recall is scored again from each
    record's output, so records written before it existed get one too)."""
    acc: Dict[Tuple, List[float]] = {}
    for r in records:
        c = acc.setdefault((r.model, r.cache, r.task, r.length), [0, 0, 0.0])
        c[0] += bool(r.correct)
        c[1] += 1
        c[2] += recall(r.task, r.answers, r.output)
    return [EvalSummary(m, c, t, n, int(ok), int(tot), rec) for (m, c, t, n), (ok, tot, rec) in sorted(acc.items())]


def markdown(summaries: Sequence[EvalSummary]) -> str:
    """Accuracy as a table: one row per model x task x cache, one column per length; the
    tasks with several answers also show their recall."""
    lengths = sorted({s.length for s in summaries})
    rows: Dict[Tuple[str, str, str], Dict[int, EvalSummary]] = {}
    for s in summaries:
        rows.setdefault((s.model, s.task, s.cache), {})[s.length] = s
    lines = ["| model | task | cache | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|---|" + "---:|" * len(lengths)]
    for (m, t, c), by_len in sorted(rows.items(), key=lambda x: (x[0][0], TASKS.index(x[0][1]), x[0][2])):
        cells = [f"{by_len[n].accuracy:.0%} ({by_len[n].correct}/{by_len[n].trials})"
                 + (f", recall {by_len[n].recall:.0%}" if t in MULTI_ANSWER else "") if n in by_len else "—"
                 for n in lengths]
        lines.append(f"| {m} | {t} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[EvalSummary], path: Union[str, Path]) -> Optional[Path]:
    """Accuracy against length, one panel per task, one line per model x cache (and a dashed
    one for the recall of the tasks with several answers). Returns the PNG's path, or None
    when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = [t for t in TASKS if any(s.task == t for s in summaries)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], tasks):
        for series in sorted({(s.model, s.cache) for s in summaries if s.task == t}):
            pts = sorted((s.length, s.accuracy, s.recall) for s in summaries
                         if s.task == t and (s.model, s.cache) == series)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{series[0]} / {series[1]}")
            if t in MULTI_ANSWER:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", linestyle="--", color=line.get_color(),
                        label=f"{series[0]} / {series[1]} recall")
        ax.set_xscale("log", base=2)
        ax.set_title(t)
        ax.set_xlabel("prompt tokens")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    legend: Dict[str, object] = {}   # one legend under the panels, each series once
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    rows = math.ceil(len(legend) / 4)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(4, len(legend)), fontsize=7)
    fig.set_figheight(3.4 + 0.22 * rows)
    fig.tight_layout(rect=(0, 0.22 * rows / (3.4 + 0.22 * rows) + 0.02, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _SharedPrefixes:
    """Runs prompts so that a prefix several of them share is evaluated once.

    The prompts go in token order; where later prompts branch off the current one (the filler
    before a needle, the same at every trial of a depth), the context is saved there with
    :meth:`Model.save_state` and loaded again before them. It only chooses the context a
    prompt starts from: the model's own prefix reuse decides what is evaluated, and its
    results are those of evaluating the whole prompt afresh (see :class:`Model`). This
    matters for the InfLLM cache, which can go back only about ``n_ubatch + rewind`` tokens,
    so without a saved state every long prompt is evaluated from its first token.
    """

    def __init__(self, model, prompts: Sequence[str], *, grid: int, rewind: Optional[int], scratch: str):
        self.m, self.grid, self.rewind, self.scratch = model, grid, rewind, scratch
        self.seqs = [model.tokenize(p) for p in prompts]
        self.order = sorted(range(len(prompts)), key=lambda i: self.seqs[i])
        o = self.order
        self.branch = [_common_prefix(self.seqs[a], self.seqs[b]) for a, b in zip(o, o[1:])]
        self.stack: List[Tuple[int, str]] = []      # saved contexts (length, file), prefixes of the current prompt
        self.evaluated = 0                           # tokens evaluated to make the saved contexts

    def prepare(self, j: int) -> None:
        """Make the context the best saved start for prompt order[j], saving the states later prompts need."""
        seq = self.seqs[self.order[j]]
        if j:
            while self.stack and self.stack[-1][0] > self.branch[j - 1]:
                Path(self.stack.pop()[1]).unlink()
        held = self.m.context_tokens
        keep = _common_prefix(held, seq)
        if self.rewind is not None and len(held) - keep > self.rewind:
            keep = 0                                 # the InfLLM cache cannot go back that far
        keep -= keep % self.grid
        if self.stack and self.stack[-1][0] > keep:
            self.m.load_state(self.stack[-1][1])
            keep = self.stack[-1][0]
        wants, low = set(), len(seq)
        for b in self.branch[j:]:                    # where each later prompt leaves this one
            low = min(low, b)
            wants.add(low - low % self.grid)
        for pos in sorted(w for w in wants if keep < w < len(seq)):
            self.m.logits(seq[:pos], last_n=1)
            path = str(Path(self.scratch) / f"{len(self.stack)}.state")
            self.m.save_state(path)
            self.stack.append((pos, path))
            self.evaluated += pos - keep
            keep = pos


def evaluate(model: str, *, caches: Sequence[str] = CACHES, tasks: Sequence[str] = TASKS,
             lengths: Sequence[int] = (4096, 8192), depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 1,
             out: Union[str, Path], infllm=None, threads: Optional[int] = None, n_gpu_layers: int = 0,
             n_ubatch: int = 512, full_max_length: Optional[int] = None, seed: int = 0,
             share_prefixes: bool = True, scratch_dir: Optional[str] = None, progress: bool = False,
             log: Callable[[str], None] = lambda s: None) -> List[EvalSummary]:
    """Run the grid cache x task x length x depth x trial on ``model`` (a GGUF path).

    The stock cache (``"full"``) runs only at lengths up to ``full_max_length`` (default: the
    model's trained context), where full attention is the reference; the InfLLM cache (its
    settings in ``infllm``, default :class:`InfLLMConfig`) at every length. Trial t of every
    cell uses seed ``seed + t``. Finished trials are appended to ``out/records.jsonl``; trials
    already there with the same model and cache settings are not run again. Writes
    ``eval.json``, ``eval.md`` and ``eval.png`` (when matplotlib is installed; ``log`` says
    when it is not) and returns the summaries of every record in ``out``.

    With ``share_prefixes`` (default) the prompts run in token order and a prefix that several
    of them share (the filler before a needle: the same for every trial at a depth, and for
    passkey at every deeper depth) is evaluated once: the context is saved there
    (:meth:`Model.save_state`, files in a temporary directory under ``scratch_dir``, default
    the system's, removed at the end; at a long context they take gigabytes) and loaded for
    the prompts that start with it. The answers are the same as without (the model's prefix
    reuse gives the results of a fresh evaluation); only the time changes, and a trial's
    ``seconds`` then include the saving of states that later trials use. ``n_ubatch`` is the
    model's compute step.
    """
    from ._model import Model
    from .config import InfLLMConfig
    from .gguf_info import inspect

    caches, tasks = list(caches), list(tasks)
    lengths = sorted({int(n) for n in lengths})
    depths = [float(d) for d in depths]
    _check_grid(caches, tasks, lengths, depths, trials)
    infllm = infllm or InfLLMConfig()
    info = inspect(model)
    full_max = info.n_ctx_train if full_max_length is None else int(full_max_length)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    records = read_records(records_path)
    if records_path.exists() and not records_path.read_bytes().endswith(b"\n"):
        with open(records_path, "a", encoding="utf-8") as f:
            f.write("\n")   # a torn last line (a killed run) stays a line of its own
    done = {r.key() for r in records}
    name = Path(model).name

    plan = []   # (cache, setup, [(task, length, depth, trial)])
    for cache in caches:
        setup = _setup_of(cache, infllm)
        ok_lengths = [n for n in lengths if cache != "full" or n <= full_max]
        for n in lengths:
            if n not in ok_lengths:
                log(f"{cache}: {n} tokens skipped (beyond {full_max}, the stock cache's reference lengths)")
        todo = [(t, n, d, k) for n in ok_lengths for t in tasks for d in depths for k in range(trials)
                if (name, setup, t, n, d, k) not in done]
        if todo:
            plan.append((cache, setup, todo))
    bar = None
    if progress and plan:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(p[2]) for p in plan), desc="eval", unit="trial")
    try:
        for cache, setup, todo in plan:
            max_gen = 48
            n_ctx = max(n for _, n, _, _ in todo) + max_gen + 64
            kw = {"kv": "infllm", "infllm": infllm} if cache == "infllm" else {"kv": "full", "flash_attn": True}
            with Model(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, n_ubatch=n_ubatch,
                       **kw) as m, tempfile.TemporaryDirectory(prefix="pyllama-inf-eval-", dir=scratch_dir) as tmp:
                count = lambda text: len(m.tokenize(text))  # noqa: E731
                built = [make_task(t, n, d, seed + k, count) for t, n, d, k in todo]
                shared, n_prompt, n_new = None, 0, 0
                if share_prefixes:
                    # how far back the cache itself goes: the stock cache anywhere (its sliding-window
                    # layers keep every cell, swa_full); InfLLM's ring about rewind tokens, its
                    # window-size sliding-window cache next to nothing
                    back = None if cache == "full" else 0 if info.sliding_window else infllm.rewind
                    shared = _SharedPrefixes(m, [b.prompt for b in built], grid=n_ubatch, scratch=tmp, rewind=back)
                for j in range(len(todo)):
                    i = shared.order[j] if shared else j
                    (t, n, d, k), task = todo[i], built[i]
                    if bar is not None:
                        bar.set_postfix_str(f"{cache} {t} {n} d={d:g}")
                    t0 = time.perf_counter()
                    if shared:
                        shared.prepare(j)
                    r = m.generate(task.prompt, max_tokens=task.max_tokens, temperature=0)
                    n_prompt += r.n_prompt_tokens
                    n_new += r.n_prompt_tokens - r.n_reused_tokens
                    rec = EvalRecord(name, cache, setup, t, n, task.n_tokens, d, k, seed + k, list(task.answers),
                                     r.text, is_correct(task, r.text), round(time.perf_counter() - t0, 2))
                    with open(records_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(dataclasses.asdict(rec)) + "\n")
                    records.append(rec)
                    if bar is not None:
                        bar.update(1)
                if shared:
                    n_new += shared.evaluated
                log(f"{cache}: {n_new} tokens evaluated for {len(todo)} prompts of {n_prompt} tokens"
                    + (" (shared prefixes)" if shared else ""))
    finally:
        if bar is not None:
            bar.close()
        summaries = summarize(records)
        write_outputs(summaries, out, meta={"model": name, "caches": caches, "tasks": tasks, "lengths": lengths,
                                            "depths": depths, "trials": trials, "seed": seed,
                                            "full_max_length": full_max, "infllm": dataclasses.asdict(infllm)},
                      log=log)
    return summaries


def write_outputs(summaries: Sequence[EvalSummary], out: Union[str, Path], *, meta: Optional[dict] = None,
                  log: Callable[[str], None] = lambda s: None) -> List[Path]:
    """Write eval.json, eval.md and eval.png (when matplotlib is installed) into ``out``."""
    from . import UPSTREAM_COMMIT
    out = Path(out)
    doc = {"meta": dict(meta or {}, llama_cpp=UPSTREAM_COMMIT, date=time.strftime("%Y-%m-%d %H:%M:%S %Z")),
           "summaries": [dataclasses.asdict(s) for s in summaries]}
    (out / "eval.json").write_text(json.dumps(doc, indent=1) + "\n")
    head = "# pyllama-inf eval\n\n" + "".join(f"- {k}: {v}\n" for k, v in doc["meta"].items()) + "\n"
    (out / "eval.md").write_text(head + markdown(summaries))
    written = [out / "eval.json", out / "eval.md"]
    png = plot(summaries, out / "eval.png") if summaries else None
    if png is not None:
        written.append(png)
    elif summaries:
        from .bench import PLOTS_MISSING
        log(PLOTS_MISSING)
    return written


# -- loss on a long text ---------------------------------------------------------------------

def kjv_text() -> str:
    """The King James Bible as plain text, from Debian's ``bible-kjv`` package (its ``bible``
    program; ``apt-get install bible-kjv``). Verse numbers and chapter headings are dropped."""
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError("the 'bible' program is not installed (Debian: apt-get install bible-kjv); "
                                "or pass a text of your own")
    raw = subprocess.run([exe, "-l", "100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    verses = []
    for line in raw.splitlines():
        m = re.match(r"\s*\d+ (.*)", line)
        if m:
            verses.append(m.group(1).strip())
    if len(verses) < 30000:
        raise RuntimeError(f"the 'bible' program gave {len(verses)} verses, expected about 31000")
    return " ".join(verses)


@dataclass
class LossPoint:
    """Mean loss of the scored tokens given ``context`` tokens in all (scored ones included)."""

    cache: str
    context: int
    target: int
    nll: float              # mean negative log-likelihood per scored token (nats)
    ppl: float = field(init=False)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.ppl = math.exp(self.nll)


def sequence_nll(logits, targets) -> float:
    """Mean negative log-likelihood of ``targets`` under the rows of ``logits`` (float32
    ``[n, n_vocab]``), computed stably in float64."""
    import numpy as np
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != t.shape[0]:
        raise ValueError(f"logits of shape {x.shape} do not match {t.shape[0]} targets")
    mx = x.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
    return float((lse - x[np.arange(len(t)), t]).mean())


def perplexity(model, tokens: Sequence[int], contexts: Sequence[int], *, target: int = 1024, cache: str = "",
               end: Optional[int] = None, rows_per_call: int = 512,
               progress: Optional[Callable[[int, int], None]] = None) -> List[LossPoint]:
    """The loss of the same ``target`` tokens (those ending at token ``end``, default
    ``max(contexts)``; pass one ``end`` to compare runs over different contexts) given the
    ``c - target`` tokens before them, for each c in ``contexts``, on ``model`` (a
    :class:`pyllama_inf.Model` with ``n_ctx >= max(contexts)``). Logits come ``rows_per_call``
    rows at a time, so memory stays bounded for large vocabularies. ``tokens`` is the text
    without special tokens; each window starts with the model's BOS when it has one."""
    contexts = sorted({int(c) for c in contexts})
    if not contexts or contexts[0] <= target or target < 1:
        raise ValueError(f"every context must be longer than target ({target}), got {contexts}")
    end = contexts[-1] if end is None else int(end)
    if end < contexts[-1] or len(tokens) < end:
        raise ValueError(f"the scored tokens must end at or after the longest context ({contexts[-1]}) and within "
                         f"the text ({len(tokens)} tokens), got end={end}")
    if contexts[-1] > model.n_ctx:
        raise ValueError(f"the longest context ({contexts[-1]}) is more than the model's n_ctx ({model.n_ctx})")
    head = model.tokenize("", add_special=True)   # BOS where the model wants one: each window starts a text
    out = []
    for i, c in enumerate(contexts):
        window = head + list(tokens[end - c + len(head):end])
        t0 = time.perf_counter()
        model.reset()
        total, n = 0.0, 0
        first = c - target          # window[first:] are scored: predicted from position first - 1 on
        for s in range(first, c, rows_per_call):
            e = min(c, s + rows_per_call)
            lg = model.logits(window[:e - 1], last_n=e - s)
            total += sequence_nll(lg, window[s:e]) * (e - s)
            n += e - s
        out.append(LossPoint(cache, c, target, total / n, seconds=round(time.perf_counter() - t0, 2)))
        if progress is not None:
            progress(i + 1, len(contexts))
    return out
