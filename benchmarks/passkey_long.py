#!/usr/bin/env python3
"""Passkey retrieval beyond the trained context: kv="infllm" (defaults) against the stock cache.

For each length, --trials prompts at each depth (the key depends on --seed, the depth, the length and the trial).
Writes passkey_long.json and passkey_long.md to --out.
Usage: python benchmarks/passkey_long.py [--model gemma3] --runs "infllm:16384:0.1,0.5,0.9;full:16384:0.5" --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pyllama_inf as pi
from pyllama_inf import passkey
from pyllama_inf.testing import gemma3_270m_path, smollm2_path

from _common import command, header, infllm_defaults, machine, now


def run(model: str, kv: str, length: int, depths: list[float], trials: int, threads: int, seed: int) -> list[dict]:
    kwargs = dict(kv="infllm", infllm=pi.InfLLMConfig()) if kv == "infllm" else dict(flash_attn=True)
    rows = []
    with pi.Model(model, n_ctx=length + 64, n_threads=threads, **kwargs) as m:
        for depth in depths:
            t0 = time.perf_counter()
            # the key depends on (seed, depth, length, trial), not on where the depth is listed
            key_seed = seed + 1_000_003 * round(depth * 1000) + length
            for r in passkey.run(m, length, [depth], trials, seed=key_seed):
                rows.append({"kv": kv, "length": length, **dataclasses.asdict(r)})
                print(f"{kv:>6} {length:>6} depth {depth:.2f}: {'ok ' if r.correct else 'MISS'} {r.output!r}",
                      file=sys.stderr, flush=True)
            rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="a GGUF path, or a test model: smollm2 (8K trained) or gemma3 (Gemma 3 270M, 32K trained)")
    ap.add_argument("--runs", default="infllm:16384:0.1,0.5,0.9;infllm:32768:0.1,0.5,0.9;full:16384:0.1,0.5,0.9",
                    help="';'-separated CACHE:LENGTH:DEPTHS (CACHE is infllm or full)")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="base of the key seeds (new keys for a new run)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fetch = {"smollm2": smollm2_path, "gemma3": gemma3_270m_path}.get(args.model)
    model = str(fetch()) if fetch else args.model
    rows = []
    for spec in args.runs.split(";"):
        kv, length, depths = spec.split(":")
        rows += run(model, kv, int(length), [float(d) for d in depths.split(",")], args.trials, args.threads, args.seed)

    summary = {}
    for r in rows:
        key = (r["kv"], r["length"])
        ok, n = summary.get(key, (0, 0))
        summary[key] = (ok + r["correct"], n + 1)
    info = pi.inspect(model)
    meta = {"command": command(), "model": Path(model).name, "n_ctx_train": info.n_ctx_train,
            "infllm_config": dataclasses.asdict(pi.InfLLMConfig()), "runs": args.runs, "trials": args.trials,
            "machine": machine(), "date": now()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "passkey_long.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = header("Passkey retrieval beyond the trained context", meta,
                   f"trained context {info.n_ctx_train}, greedy, 2 threads; InfLLM defaults ({infllm_defaults()}); "
                   "stock cache with flash attention") + [
             f"- runs (cache:length:depths) `{args.runs}`, {args.trials} trial(s) per depth, a different key per trial",
             "",
             "| cache | length | correct | accuracy |", "|---|---:|---:|---:|"]
    if not rows:
        raise SystemExit("no runs")
    for (kv, length), (ok, n) in sorted(summary.items()):
        lines.append(f"| {kv} | {length} | {ok}/{n} | {ok / n:.0%} |")
    (args.out / "passkey_long.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
