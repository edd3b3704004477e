#!/usr/bin/env python3
"""The host tier of kv="infllm": device bytes under a fixed budget, host growth, cost of offload.

Two parts, one model, same threads, one run:
  growth: one --length prompt under --budget; at each multiple of --every tokens (read from
          the prompt-progress callback) device bytes, host bytes, blocks resident, hits,
          misses and host->device bytes are recorded.
  cost:   a --cost-length prompt then --n-gen decode steps, for three device pools: the
          blocks of one selection only (cache_blocks=topk: every other pick comes from the
          host store), the --budget, and every block (no budget: resident). Prefill tok/s
          (last chunk), decode tok/s, hit rate, host->device bytes, hand-overs to the cache
          and the share of decode time spent waiting for transfers, per decoded token.
Writes offload.json and offload.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf.testing import smollm2_path

from _common import command, header, infllm_defaults, machine, now, prompt_of, write_markdown

MiB = 1 << 20


def snapshot(m: pi.Model, n: int) -> dict:
    s = m.kv_stats()
    inf = s.infllm
    return {"tokens": n, "device_bytes": s.device_bytes, "host_bytes": s.host_bytes, "n_pool": inf.n_pool,
            "blocks": inf.n_blocks, "blocks_resident": inf.blocks_resident, "hits": inf.hits,
            "misses": inf.misses, "bytes_h2d": inf.bytes_h2d, "bytes_d2h": inf.bytes_d2h,
            "transfer_wait_s": inf.transfer_wait_s, "host_work_s": inf.host_work_s,
            "callbacks": inf.callbacks, "resident": inf.resident}


def growth(model: str, length: int, every: int, budget: int, threads: int, n_gpu_layers: int) -> list[dict]:
    rows = []
    with pi.Model(model, n_ctx=length + 64, n_threads=threads, n_gpu_layers=n_gpu_layers, kv="infllm",
                  kv_budget=budget) as m:
        prompt = prompt_of(m, length)
        marks = set(range(every, length + 1, every))

        def progress(done, total):
            if done in marks or done == total:
                rows.append(snapshot(m, done))
                print(f"growth {done:>6}: device {rows[-1]['device_bytes'] / MiB:8.1f} MiB, "
                      f"host {rows[-1]['host_bytes'] / MiB:8.1f} MiB", file=sys.stderr, flush=True)

        m.generate(prompt, max_tokens=1, temperature=0, progress=progress)
    return rows


def cost(model: str, length: int, n_gen: int, budgets: dict, threads: int, n_gpu_layers: int) -> list[dict]:
    rows = []
    for name, kw in budgets.items():
        budget = kw.get("kv_budget")
        # n_batch = n_ubatch: the last progress interval is one 512-token chunk
        with pi.Model(model, n_ctx=length + n_gen + 64, n_threads=threads, n_batch=512, n_gpu_layers=n_gpu_layers,
                      kv="infllm", **kw) as m:
            prompt = prompt_of(m, length)
            stamps = [(0, time.perf_counter())]
            before = {}

            def progress(done, total):
                stamps.append((done, time.perf_counter()))
                if done == total:
                    before.update(snapshot(m, done))

            r = m.generate(prompt, max_tokens=n_gen + 1, temperature=0, progress=progress)
            after = snapshot(m, length + n_gen)
            (n0, t0), (n1, t1) = stamps[-2], stamps[-1]
            steps = max(r.timings.decode_tokens, 1)
            d_hits = after["hits"] - before["hits"]
            d_miss = after["misses"] - before["misses"]
            rows.append({"budget": name, "budget_bytes": budget, "n_pool": after["n_pool"],
                         "device_bytes": after["device_bytes"], "host_bytes": after["host_bytes"],
                         "prefill_tok_s": round((n1 - n0) / (t1 - t0), 2),
                         "decode_tok_s": round(r.timings.decode_tok_s, 2),
                         "prefill_hit_rate": round(before["hits"] / max(before["hits"] + before["misses"], 1), 3),
                         "decode_hit_rate": round(d_hits / max(d_hits + d_miss, 1), 3),
                         "decode_h2d_bytes_per_token": round((after["bytes_h2d"] - before["bytes_h2d"]) / steps),
                         "decode_host_work_ms_per_token": round(1000 * (after["host_work_s"] - before["host_work_s"]) / steps, 2),
                         "decode_callbacks_per_token": round((after["callbacks"] - before["callbacks"]) / steps, 1),
                         "decode_wait_share": round((after["transfer_wait_s"] - before["transfer_wait_s"])
                                                    / max(r.timings.decode_s, 1e-9), 4),
                         "resident": after["resident"], "transfer_wait_s": round(after["transfer_wait_s"], 3)})
            print(f"cost {name:>12}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="256MiB", help="the fixed device budget")
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--every", type=int, default=8192)
    ap.add_argument("--cost-length", type=int, default=16384)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="layers (and the cache) on the GPU (-1: all)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model or str(smollm2_path())
    budget = pi.parse_bytes(args.budget)

    grow = growth(model, args.length, args.every, budget, args.threads, args.n_gpu_layers)
    costs = cost(model, args.cost_length, args.n_gen,
                 {"one selection": dict(infllm=pi.InfLLMConfig(cache_blocks=pi.InfLLMConfig().topk)),
                  args.budget: dict(kv_budget=budget), "resident (no budget)": {}}, args.threads, args.n_gpu_layers)

    meta = {"command": command(), "model": Path(model).name, "threads": args.threads, "budget": args.budget,
            "n_gpu_layers": args.n_gpu_layers, "gpu_devices": pi.gpu_devices(),
            "infllm_config": dataclasses.asdict(pi.InfLLMConfig()), "machine": machine(),
            "upstream_commit": pi.UPSTREAM_COMMIT, "date": now()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload.json").write_text(json.dumps({"meta": meta, "growth": grow, "cost": costs}, indent=1) + "\n")
    lines = header(
        "InfLLM host tier: device bytes under a budget, host growth, cost of offload", meta,
        f"threads: {args.threads}, InfLLM defaults ({infllm_defaults()})",
        f"; layers and cache on {', '.join(d for _, d in meta['gpu_devices'])}, the host store in its host "
        "buffers" if args.n_gpu_layers else
        " (CPU backend: the \"device\" and the host store are both system RAM; the same code path, "
        "transfers are memcpy)") + [
        "",
        f"## Growth under kv_budget={args.budget} (one {args.length}-token prompt)",
        "",
        "| tokens | device MiB | host MiB | memory blocks | blocks resident (layer x block) | misses | host->device MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in grow:
        lines.append(f"| {r['tokens']} | {r['device_bytes'] / MiB:.1f} | {r['host_bytes'] / MiB:.1f} | {r['blocks']} | "
                     f"{r['blocks_resident']} | {r['misses']} | {r['bytes_h2d'] / MiB:.1f} |")
    lines += [
        "",
        f"## Cost of offload ({args.cost_length}-token prompt, then {args.n_gen} decode steps)",
        "",
        "| budget | pool slots | device MiB | prefill tok/s | decode tok/s | prefill hit rate | "
        "decode hit rate | host->device bytes / token | hand-overs / token | host work ms / token | "
        "decode time waiting for transfers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in costs:
        lines.append(f"| {r['budget']} | {r['n_pool']} | {r['device_bytes'] / MiB:.1f} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.2f} | {r['prefill_hit_rate']:.3f} | {r['decode_hit_rate']:.3f} | "
                     f"{r['decode_h2d_bytes_per_token']} | {r['decode_callbacks_per_token']:.1f} | "
                     f"{r['decode_host_work_ms_per_token']:.2f} | {100 * r['decode_wait_share']:.1f}% |")
    lines.append("")
    lines.append("hit rate: picked (layer, block) pairs found in the device pool (1.0 when resident); hand-overs: "
                 "times a graph stopped for the cache (offload: the selection of each layer, and each layer's "
                 "eviction when blocks leave the window); host work: the time spent in them.")
    return write_markdown(args.out, "offload", lines)


if __name__ == "__main__":
    sys.exit(main())
