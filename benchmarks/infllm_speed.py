#!/usr/bin/env python3
"""Decode and prefill speed of kv="infllm" against the stock cache at growing depths.

Same build, same threads, one run. For each depth d (a multiple of 512) each cache runs
generate() on a d-token prompt and then decodes --n-gen tokens:
  prefill tok/s: the last 512-token chunk of the prompt (pp512 at depth d - 512), timed with
                 the prompt-progress callback;
  decode tok/s:  the single-token steps after the prompt (tg at depth d).
Both are the median of --reps measurements: after the first generate() the same prompt is run
again --reps - 1 times; the context keeps all of it but its last chunk (prefix reuse), so each
repeat evaluates that chunk again and decodes after it. One 128-token decode lasts a few
seconds, and on a shared two-core machine single runs were seen to vary by 15%.
The stock cache runs with flash attention on and off (ratios against the faster of the two)
up to --stock-max-depth; the InfLLM cache uses the default InfLLMConfig (block 128, n_init
128, n_local 4096, topk 16; --positions changes its positions) at every depth, and its counters (hand-overs, transfers, host
work per decoded token) are recorded. --n-gpu-layers puts the layers (and both caches) on a
GPU. Writes infllm_speed.json and infllm_speed.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf.testing import smollm2_path

from _common import command, header, infllm_defaults, machine, now, prompt_of, write_markdown

CHUNK = 512
# the caches compared: the stock cache with and without flash attention (which of the two is
# faster depends on the CPU and the depth; the ratio is taken against the faster), and InfLLM
CACHES = {"full-fa": dict(flash_attn=True), "full-nofa": dict(flash_attn=False),
          "infllm": dict(kv="infllm", infllm=pi.InfLLMConfig())}


def infllm_counters(m: pi.Model) -> dict:
    inf = m.kv_stats().infllm
    return {} if inf is None else {"callbacks": inf.callbacks, "ubatches": inf.ubatches,
                                   "bytes_h2d": inf.bytes_h2d, "misses": inf.misses,
                                   "host_work_s": inf.host_work_s, "transfer_wait_s": inf.transfer_wait_s}


def measure(model: str, cache: str, depths: list[int], threads: int, n_gen: int, n_gpu_layers: int,
            reps: int) -> dict:
    n_ctx = max(depths) + n_gen + 64
    out = {}
    # n_batch = n_ubatch: one progress callback per 512-token chunk
    with pi.Model(model, n_ctx=n_ctx, n_threads=threads, n_batch=CHUNK, n_ubatch=CHUNK, n_gpu_layers=n_gpu_layers,
                  **CACHES[cache]) as m:
        for d in depths:
            prompt = prompt_of(m, d)
            m.reset()   # every depth from an empty context
            stamps = [(0, time.perf_counter())]
            before = infllm_counters(m)
            r = m.generate(prompt, max_tokens=n_gen + 1, temperature=0,
                           progress=lambda done, total: stamps.append((done, time.perf_counter())))
            after = infllm_counters(m)
            (n0, t0), (n1, t1) = stamps[-2], stamps[-1]
            pp, tg = [(n1 - n0) / (t1 - t0)], [r.timings.decode_tok_s]
            out[d] = {"decode_tokens": r.timings.decode_tokens, "prompt_tokens": r.n_prompt_tokens,
                      "prompt_s": r.timings.prefill_s, "kv_device_bytes": m.kv_stats().device_bytes}
            if after:
                # the first generate(): prefill and decode together
                out[d]["infllm"] = {k: after[k] - before[k] for k in after}
            for _ in range(reps - 1):
                again = m.generate(prompt, max_tokens=n_gen + 1, temperature=0)
                if r.n_prompt_tokens - again.n_reused_tokens != CHUNK or again.text != r.text:
                    raise RuntimeError(f"a repeat at depth {d} evaluated {r.n_prompt_tokens - again.n_reused_tokens} "
                                       f"tokens (expected {CHUNK}) or generated other text")
                pp.append(CHUNK / again.timings.prefill_s)
                tg.append(again.timings.decode_tok_s)
            out[d].update(prefill_tok_s=statistics.median(pp), decode_tok_s=statistics.median(tg), prefill_runs=pp, decode_runs=tg)
            print(f"{cache:>9} depth {d:>6}: prefill {out[d]['prefill_tok_s']:7.1f} tok/s, "
                  f"decode {out[d]['decode_tok_s']:6.2f} tok/s", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="2048,8192,16384,32768")
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--stock", default="full-fa,full-nofa", help="stock configurations to run ('none': InfLLM only)")
    ap.add_argument("--stock-max-depth", type=int, default=None,
                    help="run the stock cache only up to this depth (default: every depth)")
    ap.add_argument("--reps", type=int, default=3, help="measurements per cache and depth (median; default 3)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    ap.add_argument("--positions", choices=pi.POSITIONS, default=None,
                    help="InfLLMConfig.positions of the InfLLM cache (default: the default)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = pi.InfLLMConfig() if args.positions is None else pi.InfLLMConfig(positions=args.positions)
    CACHES["infllm"] = dict(kv="infllm", infllm=cfg)
    ran_on = machine()   # the commit the measured build comes from: read before the long run
    model = args.model or str(smollm2_path())
    depths = [int(d) for d in args.depths.split(",")]
    stock = [] if args.stock == "none" else args.stock.split(",")

    stock_depths = [d for d in depths if stock and (args.stock_max_depth is None or d <= args.stock_max_depth)]
    res = {c: measure(model, c, stock_depths, args.threads, args.n_gen, args.n_gpu_layers, args.reps) for c in stock}
    res["infllm"] = measure(model, "infllm", depths, args.threads, args.n_gen, args.n_gpu_layers, args.reps)
    inf = res["infllm"]
    rows = []
    for d in depths:
        row = {"depth": d}
        have_stock = d in stock_depths
        for c in stock:
            row[f"{c}_prefill_tok_s"] = round(res[c][d]["prefill_tok_s"], 2) if have_stock else None
            row[f"{c}_decode_tok_s"] = round(res[c][d]["decode_tok_s"], 2) if have_stock else None
        row.update({"infllm_prefill_tok_s": round(inf[d]["prefill_tok_s"], 2),
                    "infllm_decode_tok_s": round(inf[d]["decode_tok_s"], 2),
                    "prefill_ratio": None, "decode_ratio": None})
        if have_stock:
            best_pp = max(res[c][d]["prefill_tok_s"] for c in stock)
            best_tg = max(res[c][d]["decode_tok_s"] for c in stock)
            row["prefill_ratio"] = round(inf[d]["prefill_tok_s"] / best_pp, 3)
            row["decode_ratio"] = round(inf[d]["decode_tok_s"] / best_tg, 3)
        rows.append(row)
    meta = {"command": command(), "model": Path(model).name, "threads": args.threads, "n_gen": args.n_gen,
            "n_gpu_layers": args.n_gpu_layers, "gpu_devices": pi.gpu_devices(),
            "infllm_config": dataclasses.asdict(cfg),
            "machine": ran_on, "upstream_commit": pi.UPSTREAM_COMMIT, "date": now(), "raw": res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infllm_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    names = {"full-fa": "stock FA", "full-nofa": "stock no-FA"}
    head = ["depth"] + [f"prefill {names.get(c, c)}" for c in stock] + ["prefill infllm", "ratio"] + \
           [f"decode {names.get(c, c)}" for c in stock] + ["decode infllm", "ratio"]
    lines = header(
        "InfLLM cache vs stock cache: prefill and decode speed", meta,
        f"threads: {args.threads}, InfLLM {'defaults' if cfg == pi.InfLLMConfig() else 'settings'} "
        f"({infllm_defaults(cfg)}, no kv_budget); "
        f"stock cache: {', '.join(names.get(c, c) for c in stock) or 'not run'}",
        f"; layers on {', '.join(d for _, d in meta['gpu_devices'])}" if args.n_gpu_layers else "") + [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    def cell(v, fmt):
        return "—" if v is None else format(v, fmt)

    for r in rows:
        cells = [str(r["depth"])] + [cell(r[c + "_prefill_tok_s"], ".1f") for c in stock] + \
                [f"{r['infllm_prefill_tok_s']:.1f}", cell(r["prefill_ratio"], ".2f") + "x" * (r["prefill_ratio"] is not None)] + \
                [cell(r[c + "_decode_tok_s"], ".2f") for c in stock] + \
                [f"{r['infllm_decode_tok_s']:.2f}", cell(r["decode_ratio"], ".2f") + "x" * (r["decode_ratio"] is not None)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"tok/s, medians of {args.reps} runs; prefill = the {CHUNK}-token chunk ending at the depth, "
                 f"decode = {args.n_gen} single-token steps after it. Ratios are InfLLM over the faster stock configuration at that depth"
                 + ("." if stock_depths == depths else
                    f"; the stock cache ran at {stock_depths or 'no depth'} (—: not run)."))
    lines.append("")
    lines.append("InfLLM counters of the first generate() (prefill and decode): hand-overs to the cache during the compute, "
                 "host->device MiB, host work ms per decoded token:")
    lines.append("")
    for d in depths:
        c = inf[d].get("infllm", {})
        if c:
            lines.append(f"- {d}: {c['callbacks']} hand-overs in {c['ubatches']} ubatches, "
                         f"{c['bytes_h2d'] / 2**20:.1f} MiB h2d, {c['misses']} misses, "
                         f"host work {1e3 * c['host_work_s'] / max(1, inf[d]['decode_tokens']):.2f} ms/token")
    return write_markdown(args.out, "infllm_speed", lines)


if __name__ == "__main__":
    sys.exit(main())
