"""Compare GGUF models at device-memory budgets: speed, KV memory and passkey accuracy.

:func:`compare` runs a grid of model x budget x context. A budget is one of

- ``"full"``: llama.cpp's stock cache, the whole context on the device;
- ``"full-host"``: the stock cache with K/V kept in host memory (llama.cpp's
  ``offload_kqv=False``); only differs from ``"full"`` when layers run on a GPU, so on a
  CPU-only run its rows are recorded as skipped;
- ``"infllm"``: the InfLLM cache without a byte bound (default block cache);
- a size (``"256MiB"``, ``"1GB"``, bytes as an int): the InfLLM cache with that ``kv_budget``.

Every cell of the grid becomes a row (a :class:`BenchRow`). A cell that cannot run — a budget
below the working set, a stock cache that would not fit in memory, an error while running —
is recorded with ``status`` and ``reason`` instead of stopping the grid.

Per row: prefill tok/s and time to first token for a ``context``-token prompt, decode tok/s
(and ms per token) for ``n_gen`` tokens after it, the KV bytes on the device and on the
host after the run (for the InfLLM cache the device bytes are fixed at load, so they are the
peak), the block-cache hit rate, and passkey accuracy over ``passkey_trials`` prompts at
each of ``depths``. :func:`write_outputs` writes ``results.json``, ``results.md`` and PNG
plots (matplotlib, when installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from . import passkey
from ._model import Model
from .config import InfLLMConfig, parse_bytes
from .errors import PyllamaError
from ._memory import available_memory
from .gguf_info import inspect

BudgetSpec = Union[str, int]

FILLER = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill. "
          "Scholars argued for hours about the meaning of the inscription on the northern wall. ")

# keys every row of results.json has (more may follow)
ROW_KEYS = ("model", "budget", "context", "prefill_tok_s", "decode_tok_s", "device_kv_bytes", "host_kv_bytes",
            "passkey_acc")


@dataclass
class BenchRow:
    """One cell of the grid. Speed and memory fields are None when the row did not run."""

    model: str
    budget: str
    context: int
    status: str = "ok"                 # "ok", "skipped" (not run, see reason) or "failed" (raised)
    reason: str = ""
    kv: str = ""                       # "full" or "infllm"
    budget_bytes: Optional[int] = None
    prefill_tok_s: Optional[float] = None
    ttft_s: Optional[float] = None     # time to the first token: the whole prompt's evaluation
    decode_tok_s: Optional[float] = None
    tpot_ms: Optional[float] = None    # ms per decoded token
    decode_tokens: Optional[int] = None
    device_kv_bytes: Optional[int] = None
    host_kv_bytes: Optional[int] = None
    hit_rate: Optional[float] = None   # picked blocks found on the device (InfLLM only)
    passkey_acc: Optional[float] = None
    passkey_trials: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _budget_name(b: BudgetSpec) -> str:
    return str(b).strip() if isinstance(b, str) else f"{b}B"


def parse_budget(b: BudgetSpec) -> Dict[str, object]:
    """The Model keyword arguments of a budget spec (see the module doc); ValueError if unknown."""
    if isinstance(b, str) and b.strip().lower() in ("full", "full-host", "infllm"):
        name = b.strip().lower()
        if name == "full":
            return {"kv": "full"}
        if name == "full-host":
            return {"kv": "full", "offload_kqv": False}
        return {"kv": "infllm"}
    value = parse_bytes(b, name="budget")
    if not value:
        raise ValueError(f"budget {b!r} must be 'full', 'full-host', 'infllm' or a size above 0 bytes")
    return {"kv": "infllm", "kv_budget": value}


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def filler_prompt(m: Model, n_tokens: int) -> str:
    """A filler text of about n_tokens tokens in m's tokenizer."""
    text = FILLER * (n_tokens // 30 + 2)
    return m.detokenize(m.tokenize(text)[:n_tokens])


def _skip_reason(kw: Dict[str, object], info, context: int, n_gpu_layers: int) -> str:
    if kw.get("offload_kqv") is False and n_gpu_layers == 0:
        return "same as 'full' here: no layers on a GPU, so the stock cache's K/V are in host memory already"
    if kw["kv"] == "full":
        need = info.kv_bytes_per_token() * context
        avail = available_memory()
        if avail is not None and need > 0.8 * avail:
            return (f"the stock cache needs {need / 2**20:.0f} MiB of KV for {context} tokens, more than 80% of "
                    f"the {avail / 2**20:.0f} MiB available")
    return ""


def run_cell(model: str, budget: BudgetSpec, context: int, *, n_gen: int = 32, passkey_trials: int = 1,
             depths: Sequence[float] = (0.1, 0.5, 0.9), threads: Optional[int] = None, n_gpu_layers: int = 0,
             infllm: Optional[InfLLMConfig] = None, seed: int = 0) -> BenchRow:
    """Measure one model x budget x context cell; failures become the row's status."""
    row = BenchRow(model=Path(model).name, budget=_budget_name(budget), context=int(context))
    t0 = time.perf_counter()
    try:
        kw = parse_budget(budget)
        row.kv = str(kw["kv"])
        row.budget_bytes = kw.get("kv_budget")  # type: ignore[assignment]
        reason = _skip_reason(kw, inspect(model), context, n_gpu_layers)
        if reason:
            row.status, row.reason = "skipped", reason
            return row
        if row.kv == "infllm" and infllm is not None:
            kw["infllm"] = infllm
        n_ctx = context + max(n_gen, 16) + 64
        with Model(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, **kw) as m:
            r = m.generate(filler_prompt(m, context), max_tokens=n_gen, temperature=0)
            t = r.timings
            row.prefill_tok_s = round(t.prefill_tok_s, 2)
            row.ttft_s = round(t.prefill_s, 3)
            row.decode_tokens = t.decode_tokens
            if t.decode_tokens:
                row.decode_tok_s = round(t.decode_tok_s, 2)
                row.tpot_ms = round(1000.0 / t.decode_tok_s, 2)
            if passkey_trials > 0:
                res = passkey.run(m, context, list(depths), passkey_trials, seed=seed)
                row.passkey_trials = len(res)
                row.passkey_acc = round(sum(x.correct for x in res) / len(res), 3)
            s = m.kv_stats()
            row.device_kv_bytes, row.host_kv_bytes = s.device_bytes, s.host_bytes
            if s.infllm is not None:
                row.hit_rate = round(s.infllm.hit_rate, 3)
    except (PyllamaError, ValueError, MemoryError, OSError) as e:
        row.status, row.reason = "failed", f"{type(e).__name__}: {e}"
    finally:
        row.seconds = round(time.perf_counter() - t0, 1)
    return row


def compare(models: Sequence[str], budgets: Sequence[BudgetSpec] = ("full", "256MiB"),
            contexts: Sequence[int] = (2048, 8192), *, passkey_trials: int = 1,
            depths: Sequence[float] = (0.1, 0.5, 0.9), n_gen: int = 32, threads: Optional[int] = None,
            n_gpu_layers: int = 0, infllm: Optional[InfLLMConfig] = None, out: Union[str, Path, None] = None,
            progress: bool = True, on_row: Optional[Callable[[BenchRow], None]] = None) -> List[BenchRow]:
    """Run the model x budget x context grid; return its rows (and write them to ``out``).

    models: GGUF paths. budgets: see the module doc. contexts: prompt lengths in tokens.
    passkey_trials: prompts per depth (0 skips passkey). n_gen: decoded tokens timed per
    cell. infllm: the InfLLM config for the InfLLM budgets (default config when None).
    out: a directory for results.json, results.md and the plots (written after every row,
    so an interrupted grid keeps what it measured). progress: a tqdm bar over the grid.
    """
    models = [str(m) for m in models]
    if not models:
        raise ValueError("compare() needs at least one model")
    for m in models:
        if not os.path.isfile(m):
            raise FileNotFoundError(f"model file not found: {m}")
    for b in budgets:
        parse_budget(b)   # reject unknown budgets before anything runs
    contexts = [int(c) for c in contexts]
    if not contexts or min(contexts) < 64:
        raise ValueError("contexts must be given, each of at least 64 tokens")
    if passkey_trials < 0 or n_gen < 1:
        raise ValueError("passkey_trials must be >= 0 and n_gen >= 1")
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"passkey depths must be in [0, 1], got {d}")

    from . import UPSTREAM_COMMIT
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "models": [Path(m).name for m in models],
            "budgets": [_budget_name(b) for b in budgets], "contexts": contexts, "n_gen": n_gen,
            "passkey_trials_per_depth": passkey_trials, "passkey_depths": list(depths),
            "threads": threads, "n_gpu_layers": n_gpu_layers,
            "infllm": dataclasses.asdict(infllm or InfLLMConfig()), "cpu": cpu_name(),
            "cores": os.cpu_count(), "llama.cpp": UPSTREAM_COMMIT}
    cells = [(m, b, c) for m in models for b in budgets for c in contexts]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cells), desc="bench", unit="cell")
    rows: List[BenchRow] = []
    try:
        for m, b, c in cells:
            if bar is not None:
                bar.set_postfix_str(f"{Path(m).name} {_budget_name(b)} {c}")
            row = run_cell(m, b, c, n_gen=n_gen, passkey_trials=passkey_trials, depths=depths, threads=threads,
                           n_gpu_layers=n_gpu_layers, infllm=infllm)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if out is not None:
                write_outputs(rows, out, plots=False, meta=meta)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if out is not None:
        write_outputs(rows, out, meta=meta)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(rows: Iterable[BenchRow]) -> str:
    """The rows as a Markdown table (sizes in MiB)."""
    lines = ["| model | budget | context | prefill tok/s | TTFT s | decode tok/s | TPOT ms | device KV MiB | "
             "host KV MiB | hit rate | passkey | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        pk = "-" if r.passkey_acc is None else f"{r.passkey_acc:.2f} ({r.passkey_trials})"
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        lines.append(f"| {r.model} | {r.budget} | {r.context} | {_fmt(r.prefill_tok_s, '.1f')} | "
                     f"{_fmt(r.ttft_s, '.2f')} | {_fmt(r.decode_tok_s, '.2f')} | {_fmt(r.tpot_ms, '.1f')} | "
                     f"{_fmt(mib(r.device_kv_bytes), '.1f')} | {_fmt(mib(r.host_kv_bytes), '.1f')} | "
                     f"{_fmt(r.hit_rate, '.3f')} | {pk} | {status.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'pyllama-inf[bench]')"


def can_plot() -> bool:
    """True when matplotlib is installed (the ``bench`` extra), so results come with plots."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def _plot(rows: List[BenchRow], out: Path) -> List[Path]:
    if not can_plot():
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    specs = [("decode_tok_s", "decode tok/s", "decode_vs_context.png", False),
             ("device_kv_bytes", "device KV MiB", "device_memory_vs_context.png", True),
             ("passkey_acc", "passkey accuracy", "passkey_vs_context.png", False)]
    for key, label, name, mib in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        for series in sorted({(r.model, r.budget) for r in rows}):
            pts = sorted((r.context, getattr(r, key)) for r in rows
                         if (r.model, r.budget) == series and r.status == "ok" and getattr(r, key) is not None)
            if pts:
                xs = [p[0] for p in pts]
                ys = [p[1] / 2**20 if mib else p[1] for p in pts]
                ax.plot(xs, ys, marker="o", label=f"{series[0]} / {series[1]}")
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(out / name)
    return made


def write_outputs(rows: Sequence[BenchRow], out: Union[str, Path], *, plots: bool = True,
                  meta: Optional[dict] = None) -> List[Path]:
    """Write results.json (``{"meta": ..., "rows": [...]}``), results.md and, with plots,
    the PNGs into ``out``; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    doc = {"meta": meta or {}, "rows": [r.as_dict() for r in rows]}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    head = "# pyllama-inf bench\n\n"
    if meta:
        head += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    (out / "results.md").write_text(head + markdown_table(rows))
    written = [out / "results.json", out / "results.md"]
    if plots:
        written += _plot(rows, out)
    return written
