#!/usr/bin/env python3
"""One long document, then questions about it: what the kept context saves.

For each cache (the stock cache with flash attention; the InfLLM cache with its defaults), in
one Model: the document goes into the system message of a chat and three questions follow,
each a chat() call on [system with the document, the question] — the first evaluates the
whole prompt, the next ones reuse the document from the context. Recorded per question: the
time to the first token (the prompt evaluation, GenerationResult.timings.prefill_s), the
tokens kept and the answer. After the first question the context is saved (save_state);
at the end a new Model loads it and answers the second question from it. Before that, in the first Model,
the later questions are answered again after reset() (no reuse; the first question was
evaluated from an empty context already) to compare the answers.
The document is filler text with three facts (vault codes) at 20%, 50% and 80% depth.

Bars (issue "One long document, many questions"): time to first token of each later
question <= 3% of the first's; loading the saved context <= 5% of the time its evaluation
took; the answers identical with and without reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf.testing import smollm2_path

from _common import command, header, infllm_defaults, machine, now, write_markdown

FACTS = [("red", "4711"), ("green", "2958"), ("blue", "8364")]
DEPTHS = [0.2, 0.5, 0.8]
CACHES = {"stock": dict(flash_attn=True), "infllm": dict(kv="infllm")}


def document(m: pi.Model, n_tokens: int) -> str:
    """Filler sentences with the facts at DEPTHS, about n_tokens tokens long."""
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
    per = len(m.tokenize(filler, add_special=False))
    n = max(1, n_tokens // per)
    parts = [filler] * n
    for (colour, code), depth in zip(FACTS, DEPTHS):
        parts.insert(int(depth * len(parts)), f"The code of the {colour} vault is {code}. ")
    return "".join(parts)


def messages(doc: str, question: str) -> list:
    return [{"role": "system", "content": "Answer questions about the following document.\n\n" + doc},
            {"role": "user", "content": question}]


def question(colour: str) -> str:
    return f"What is the code of the {colour} vault? Answer with the number only."


def ask(m: pi.Model, doc: str, colour: str, n_gen: int) -> dict:
    r = m.chat(messages(doc, question(colour)), max_tokens=n_gen, temperature=0)
    return {"colour": colour, "ttft_s": r.timings.prefill_s, "prompt_tokens": r.n_prompt_tokens,
            "evaluated": r.timings.prompt_tokens, "kept": r.n_reused_tokens, "answer": r.text}


def run(cache: str, model: str, n_doc: int, threads: int, n_gen: int, state_dir: str) -> dict:
    kw = dict(n_ctx=n_doc + 1024, n_threads=threads, **CACHES[cache])
    state = os.path.join(state_dir, f"{cache}.state")
    out: dict = {"cache": cache}
    with pi.Model(model, **kw) as m:
        doc = document(m, n_doc)
        out["reuse"] = []
        for i, (colour, _) in enumerate(FACTS):
            out["reuse"].append(ask(m, doc, colour, n_gen))
            print(f"{cache}: question {i + 1} with reuse: {out['reuse'][-1]}", file=sys.stderr, flush=True)
            if i == 0:
                t0 = time.perf_counter()
                m.save_state(state)
                out["save_s"] = time.perf_counter() - t0
                out["state_bytes"] = os.path.getsize(state)
                out["saved_tokens"] = len(m.context_tokens)
        # the first question was already evaluated from an empty context
        out["fresh"] = [out["reuse"][0]]
        for colour, _ in FACTS[1:]:
            m.reset()
            out["fresh"].append(ask(m, doc, colour, n_gen))
            print(f"{cache}: fresh: {out['fresh'][-1]}", file=sys.stderr, flush=True)
        out["kv"] = {"reused_tokens": m.kv_stats().reused_tokens, "reuse_fallbacks": m.kv_stats().reuse_fallbacks}
    with pi.Model(model, **kw) as m:
        t0 = time.perf_counter()
        m.load_state(state)
        out["load_s"] = time.perf_counter() - t0
        out["after_load"] = ask(m, doc, FACTS[1][0], n_gen)
    os.remove(state)
    first = out["reuse"][0]["ttft_s"]
    out["ttft_ratios"] = [q["ttft_s"] / first for q in out["reuse"][1:]]
    out["load_ratio"] = out["load_s"] / first
    out["same_answers"] = [a["answer"] == b["answer"] for a, b in zip(out["reuse"], out["fresh"])]
    out["after_load_same"] = out["after_load"]["answer"] == out["reuse"][1]["answer"]
    out["correct"] = [code in q["answer"] for q, (_, code) in zip(out["reuse"], FACTS)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-tokens", type=int, default=32768)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--caches", default="stock,infllm")
    ap.add_argument("--state-dir", default=None, help="where the saved states go (default: a temporary directory)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model or str(smollm2_path())
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        results = [run(c, model, args.doc_tokens, args.threads, args.n_gen, tmp) for c in args.caches.split(",")]
    meta = {"command": command(), "model": Path(model).name, "threads": args.threads, "doc_tokens": args.doc_tokens,
            "machine": machine(), "date": now(), "upstream_commit": pi.UPSTREAM_COMMIT}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_document.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = header(
        "One long document, three questions", meta,
        f"{args.threads} threads, document of ~{args.doc_tokens} tokens with three facts; "
        f"stock cache with flash attention, InfLLM cache with its defaults ({infllm_defaults()})") + [
        "",
        "| cache | question | time to first token (s) | tokens evaluated | tokens kept | vs the first | "
        "answer | same without reuse |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        for i, q in enumerate(r["reuse"]):
            ratio = "—" if i == 0 else f"{r['ttft_ratios'][i - 1]:.2%}"
            lines.append(f"| {r['cache']} | {i + 1} | {q['ttft_s']:.2f} | {q['evaluated']} | {q['kept']} | {ratio} | "
                         f"{q['answer'].strip()!r} | {'yes' if r['same_answers'][i] else 'no'} |")
    lines += ["", "| cache | saved tokens | state file | save (s) | load (s) | load vs evaluation | "
              "answer after load the same |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['cache']} | {r['saved_tokens']} | {r['state_bytes'] / 2**20:.1f} MiB | {r['save_s']:.2f} | "
                     f"{r['load_s']:.2f} | {r['load_ratio']:.2%} | {'yes' if r['after_load_same'] else 'no'} |")
    lines += ["", "Time to first token = the prompt evaluation of that call (timings.prefill_s). The first "
              "question evaluates the whole prompt; the later ones keep the document (up to the last "
              "n_ubatch boundary it shares with the context) and evaluate the rest. 'load vs evaluation': "
              "load_state() time over the first question's evaluation (which built the saved context)."]
    return write_markdown(args.out, "long_document", lines)


if __name__ == "__main__":
    sys.exit(main())
