#!/usr/bin/env python3
"""What a quantized K/V cache costs and gains: accuracy against f16, and decode speed.

Same build, same threads, one run, for the stock cache and the InfLLM cache with each
--types entry (type_k = type_v):
  agreement: teacher-forced logits of one --agree-tokens prompt against the same cache in
             f16 (top-1 agreement, normalised MSE);
  passkey:   passkey retrieval at --passkey-length tokens, --depths, greedy;
  speed:     prefill (the last 512-token chunk) and decode (--n-gen single-token steps) at
             --depth tokens.
The InfLLM cache uses the default InfLLMConfig; the stock cache runs with flash attention
(llama.cpp needs it for a quantized V cache). Writes kv_types.json and kv_types.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import pyllama_inf as pi
from pyllama_inf import passkey
from pyllama_inf.testing import smollm2_path

from _common import command, header, infllm_defaults, machine, now, prompt_of, write_markdown

CHUNK = 512
CACHES = {"stock": dict(flash_attn=True), "infllm": dict(kv="infllm", infllm=pi.InfLLMConfig())}


def agreement(model, cache, t, n_tokens, threads, ref=None):
    with pi.Model(model, n_ctx=n_tokens + 64, n_threads=threads, n_ubatch=CHUNK, type_k=t, type_v=t,
                  **CACHES[cache]) as m:
        ids = m.tokenize(prompt_of(m, n_tokens))
        lg = m.logits(ids)
    if ref is None:
        return lg, None
    top1 = float((lg.argmax(1) == ref.argmax(1)).mean())
    nmse = float(((lg - ref) ** 2).mean() / (ref ** 2).mean())
    return lg, {"top1": round(top1, 4), "nmse": nmse}


def passkeys(model, cache, t, length, depths, threads):
    with pi.Model(model, n_ctx=length + 128, n_threads=threads, n_ubatch=CHUNK, type_k=t, type_v=t,
                  **CACHES[cache]) as m:
        res = passkey.run(m, length, depths, trials=1)
    return {"correct": sum(r.correct for r in res), "of": len(res)}


def speed(model, cache, t, depth, n_gen, threads):
    with pi.Model(model, n_ctx=depth + n_gen + 64, n_threads=threads, n_batch=CHUNK, n_ubatch=CHUNK, type_k=t, type_v=t,
                  **CACHES[cache]) as m:
        prompt = prompt_of(m, depth)
        stamps = [(0, time.perf_counter())]
        r = m.generate(prompt, max_tokens=n_gen + 1, temperature=0,
                       progress=lambda done, total: stamps.append((done, time.perf_counter())))
        (n0, t0), (n1, t1) = stamps[-2], stamps[-1]
        return {"prefill_tok_s": round((n1 - n0) / (t1 - t0), 2), "decode_tok_s": round(r.timings.decode_tok_s, 2),
                "kv_device_bytes": m.kv_stats().device_bytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--caches", default="stock,infllm")
    ap.add_argument("--agree-tokens", type=int, default=4096)
    ap.add_argument("--passkey-length", type=int, default=8192)
    ap.add_argument("--depths", default="0.25,0.75")
    ap.add_argument("--depth", type=int, default=8192, help="context depth of the speed cells")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model or str(smollm2_path())
    types = args.types.split(",")
    caches = args.caches.split(",")
    depths = [float(d) for d in args.depths.split(",")]

    res = {}
    for cache in caches:
        ref = None
        for t in types:
            lg, agree = agreement(model, cache, t, args.agree_tokens, args.threads, ref)
            if t == "f16":
                ref = lg
            cell = {"agreement_vs_f16": agree,
                    "passkey": passkeys(model, cache, t, args.passkey_length, depths, args.threads),
                    "speed": speed(model, cache, t, args.depth, args.n_gen, args.threads)}
            res[f"{cache}/{t}"] = cell
            print(f"{cache:>6} {t:>5}: {json.dumps(cell)}", file=sys.stderr, flush=True)

    meta = {"command": command(), "model": Path(model).name, "threads": args.threads, "machine": machine(),
            "upstream_commit": pi.UPSTREAM_COMMIT, "date": now(), "agree_tokens": args.agree_tokens,
            "passkey_length": args.passkey_length, "depths": depths, "depth": args.depth, "n_gen": args.n_gen}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_types.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1) + "\n")
    lines = header(
        "Quantized K/V: accuracy against f16 and speed", meta,
        f"threads: {args.threads}; InfLLM defaults ({infllm_defaults()}); stock cache with flash attention") + [
        f"- agreement: teacher-forced {args.agree_tokens}-token prompt, against the same cache in f16; "
        f"passkey: {args.passkey_length} tokens at depths {args.depths}; speed at depth {args.depth}",
        "",
        "| cache | K/V type | top-1 vs f16 | NMSE vs f16 | passkey | prefill tok/s | decode tok/s | decode vs f16 | KV device MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cache in caches:
        base = res[f"{cache}/f16"]["speed"]["decode_tok_s"] if f"{cache}/f16" in res else None
        for t in types:
            c = res[f"{cache}/{t}"]
            a = c["agreement_vs_f16"]
            sp = c["speed"]
            lines.append(f"| {cache} | {t} | {'—' if a is None else format(a['top1'], '.4f')} | "
                         f"{'—' if a is None else format(a['nmse'], '.2e')} | "
                         f"{c['passkey']['correct']}/{c['passkey']['of']} | {sp['prefill_tok_s']:.1f} | "
                         f"{sp['decode_tok_s']:.2f} | {'—' if not base else format(sp['decode_tok_s'] / base, '.2f')} | "
                         f"{sp['kv_device_bytes'] / 2**20:.1f} |")
    return write_markdown(args.out, "kv_types", lines)


if __name__ == "__main__":
    sys.exit(main())
