#!/usr/bin/env python3
"""Overhead of pyllama-inf's generate() against upstream llama-bench, same build and threads.

Both sides use the stock KV cache, flash attention on, n_batch 2048, n_ubatch 512.

  prefill pp512 @ depth d  upstream: llama-bench -p 512 -d d
                           ours: generate() on a prompt of d + 512 tokens; the time of the
                           last 512-token chunk, from the prompt-progress callback
  decode tg128 @ depth d   upstream: llama-bench -n 128 -d d
                           ours: generate(max_tokens=129) after a prompt of max(d, 8)
                           tokens; decode tok/s over the single-token evaluations (sampling
                           and the Python per-token callback included)

Each figure is the mean over --reps runs. Writes overhead.json and overhead.md to --out.
Usage: python benchmarks/overhead.py [--model PATH] [--threads 2] [--depths 0,4096] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf.testing import smollm2_path

from _common import command, header, machine, now, prompt_of, write_markdown

ROOT = Path(__file__).resolve().parent.parent
UBATCH = 512
N_GEN = 128
def llama_bench(model: str, threads: int, depths: list[int], reps: int) -> dict:
    exe = Path(os.environ.get("PYLLAMA_INF_UPSTREAM_BIN", ROOT / "build" / "bin")) / "llama-bench"
    cmd = [str(exe), "-m", model, "-t", str(threads), "-fa", "1", "-b", "2048", "-ub", str(UBATCH),
           "-p", str(UBATCH), "-n", str(N_GEN), "-d", ",".join(map(str, depths)), "-r", str(reps), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = {}
    for row in json.loads(res.stdout):
        kind = "prefill" if row["n_prompt"] else "decode"
        out[(kind, row["n_depth"])] = row["avg_ts"]
    return out, " ".join(cmd)


def ours(model: str, threads: int, depths: list[int], reps: int) -> dict:
    out = {}
    n_ctx = max(depths) + UBATCH + N_GEN + 256
    with pi.Model(model, n_ctx=n_ctx, n_threads=threads, flash_attn=True) as m:
        m.generate("warm up", max_tokens=4, temperature=0)
        for d in depths:
            prompt = prompt_of(m, d + UBATCH)
            rates = []
            for _ in range(reps):
                m.reset()   # llama-bench evaluates each repetition from an empty context
                stamps = [(0, time.perf_counter())]
                r = m.generate(prompt, max_tokens=0,
                               progress=lambda done, total: stamps.append((done, time.perf_counter())))
                if d == 0:
                    rates.append(r.timings.prefill_tok_s)
                else:
                    (n0, t0), (n1, t1) = stamps[-2], stamps[-1]
                    rates.append((n1 - n0) / (t1 - t0))
            out[("prefill", d)] = statistics.mean(rates)

            prompt = prompt_of(m, max(d, 8))
            rates, counts = [], []
            for _ in range(reps):
                m.reset()
                r = m.generate(prompt, max_tokens=N_GEN + 1, temperature=0)
                rates.append(r.timings.decode_tok_s)
                counts.append(r.timings.decode_tokens)
            out[("decode", d)] = statistics.mean(rates)
            out[("decode_tokens", d)] = min(counts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="0,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model or str(smollm2_path())
    depths = [int(d) for d in args.depths.split(",")]

    upstream, bench_cmd = llama_bench(model, args.threads, depths, args.reps)
    mine = ours(model, args.threads, depths, args.reps)

    rows = []
    for kind in ("prefill", "decode"):
        for d in depths:
            up, me = upstream[(kind, d)], mine[(kind, d)]
            rows.append({"test": f"{'pp' if kind == 'prefill' else 'tg'}{UBATCH if kind == 'prefill' else N_GEN}",
                         "depth": d, "llama_bench_tok_s": round(up, 2), "pyllama_inf_tok_s": round(me, 2),
                         "ratio": round(me / up, 4), "overhead_pct": round(100 * (1 - me / up), 2)})
    meta = {
        "command": command(),
        "llama_bench_command": bench_cmd,
        "model": Path(model).name, "threads": args.threads, "reps": args.reps,
        "machine": machine(),
        "upstream_commit": pi.UPSTREAM_COMMIT,
        "date": now(),
        "decode_tokens_ours": {str(d): mine[("decode_tokens", d)] for d in depths},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = header("generate() overhead vs llama-bench", meta,
                   f"threads: {args.threads}, flash-attn on, reps: {args.reps}") + [
        f"- upstream: `{bench_cmd}`",
        "",
        "| test | depth | llama-bench tok/s | pyllama-inf tok/s | ratio | overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['test']} | {r['depth']} | {r['llama_bench_tok_s']:.1f} | {r['pyllama_inf_tok_s']:.1f} | "
                     f"{r['ratio']:.3f} | {r['overhead_pct']:+.1f}% |")
    return write_markdown(args.out, "overhead", lines)


if __name__ == "__main__":
    sys.exit(main())
