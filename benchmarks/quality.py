#!/usr/bin/env python3
"""Long-context quality: the retrieval tasks of `pyllama-inf eval` and the loss on a long text,
the stock cache (the reference, up to the trained context) against kv="infllm".

Tasks: pyllama_inf.evals.evaluate over --tasks x --lengths x --depths x --trials, resumable
(trials already in OUT/records.jsonl with the same settings are not run again). Loss:
pyllama_inf.evals.perplexity of the same last --target tokens of the King James Bible (Debian's
bible-kjv) at each of --ppl-contexts, also resumable (OUT/ppl.jsonl). Every invocation is logged
in OUT/runs.jsonl (commit, machine, command, date); OUT/quality.md collects the tables.
Usage: python benchmarks/quality.py [--model gemma3] --lengths 4096,8192 --ppl-contexts 4096,8192 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf import evals
from pyllama_inf.testing import gemma3_270m_path, smollm2_path

from _common import command, header, infllm_defaults, machine, now, write_markdown


def ppl_runs(model: str, caches: list[str], contexts: list[int], target: int, threads: int, full_max: int,
             infllm: pi.InfLLMConfig, out: Path) -> list[dict]:
    path = out / "ppl.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    name = Path(model).name
    text = None
    end = max(contexts)   # the scored tokens end here in every context, so they are the same tokens
    for cache in caches:
        setup = "full" if cache == "full" else "infllm " + json.dumps(dataclasses.asdict(infllm), sort_keys=True)
        have = {(d["context"], d["target"], d["end"]) for d in done if d["model"] == name and d["setup"] == setup}
        todo = [c for c in contexts if (cache != "full" or c <= full_max) and (c, target, end) not in have]
        if not todo:
            continue
        text = text or evals.kjv_text()
        kw = dict(kv="infllm", infllm=infllm) if cache == "infllm" else dict(kv="full", flash_attn=True)
        with pi.Model(model, n_ctx=max(todo), n_threads=threads, **kw) as m:
            tokens = m.tokenize(text, add_special=False, parse_special=False)
            for c in todo:
                p = evals.perplexity(m, tokens, [c], target=target, cache=cache, end=end)[0]
                row = {"model": name, "setup": setup, "end": end, **dataclasses.asdict(p)}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(f"{cache:>7} context {c:>7}: loss {p.nll:.4f} ({p.seconds:.0f} s)", file=sys.stderr, flush=True)
    return done


def infllm_config(spec: str) -> pi.InfLLMConfig:
    """An InfLLMConfig from "field=value,..." (values are ints, or text for positions)."""
    kw = {}
    for item in filter(None, spec.split(",")):
        field, sep, value = item.partition("=")
        if not sep or field not in {f.name for f in dataclasses.fields(pi.InfLLMConfig)}:
            raise SystemExit(f"--infllm: {item!r} is not field=value of InfLLMConfig")
        kw[field] = value if field == "positions" else int(value)
    return pi.InfLLMConfig(**kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="a GGUF path, or a test model: smollm2 (8K trained) or gemma3 (Gemma 3 270M, 32K trained)")
    ap.add_argument("--tasks", default=",".join(evals.TASKS))
    ap.add_argument("--lengths", default="4096,8192", help="task prompt lengths ('' for none)")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--caches", default="full,infllm")
    ap.add_argument("--ppl-contexts", default="", help="contexts for the loss on the long text ('' for none)")
    ap.add_argument("--target", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--infllm", default="",
                    help="InfLLMConfig fields that differ from the defaults, e.g. n_local=1024,repr_keys=8")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fetch = {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}.get(args.model)
    model = str(fetch()) if fetch else args.model
    caches = [c for c in args.caches.split(",") if c]
    infllm = infllm_config(args.infllm)
    full_max = pi.inspect(model).n_ctx_train
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command(), "model": Path(model).name, "machine": machine(), "date": now(),
            "upstream_commit": pi.UPSTREAM_COMMIT}
    with open(args.out / "runs.jsonl", "a") as f:
        f.write(json.dumps(meta) + "\n")

    summaries = []
    if args.lengths:
        summaries = evals.evaluate(model, caches=caches, tasks=args.tasks.split(","),
                                   lengths=[int(x) for x in args.lengths.split(",")],
                                   depths=[float(x) for x in args.depths.split(",")], trials=args.trials,
                                   out=args.out, infllm=infllm, threads=args.threads, progress=sys.stderr.isatty(),
                                   log=lambda s: print(s, file=sys.stderr))
    ppl = []
    if args.ppl_contexts:
        ppl = ppl_runs(model, caches, [int(x) for x in args.ppl_contexts.split(",")], args.target, args.threads,
                       full_max, infllm, args.out)

    runs = [json.loads(line) for line in (args.out / "runs.jsonl").read_text().splitlines() if line.strip()]
    lines = header("Long-context quality: retrieval tasks and loss on a long text", meta,
                   f"trained context {full_max}, greedy, {args.threads} threads; InfLLM "
                   f"{'defaults' if infllm == pi.InfLLMConfig() else 'settings'} ({infllm_defaults(infllm)}); "
                   "stock cache with flash attention, only up to the trained context") + [
        f"- runs that wrote these results (commit, date): "
        + "; ".join(f"{r['machine']['commit']} {r['date']}" for r in runs), ""]
    if summaries:
        lines += ["## Retrieval tasks (exact match; `pyllama_inf.evals`)", "",
                  f"depths {args.depths}, {args.trials} trial(s) per depth", "", evals.markdown(summaries)]
    if ppl:
        lines += ["## Loss of the same last tokens of the King James Bible given growing contexts", "",
                  "The scored tokens are the same in every row with the same end (the token index where they end).", "",
                  "| cache | context | scored tokens | end | loss (nats/token) | perplexity |", "|---|---:|---:|---:|---:|---:|"]
        for p in sorted(ppl, key=lambda p: (p["setup"], p["context"])):
            lines.append(f"| {p['setup'].split()[0]} | {p['context']} | {p['target']} | {p['end']} | {p['nll']:.4f} | "
                         f"{p['ppl']:.3f} |")
    return write_markdown(args.out, "quality", lines)


if __name__ == "__main__":
    sys.exit(main())
