"""The ``pyllama-inf`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from typing import List, Optional

from ._model import CACHE_TYPES, Model
from .config import POSITIONS, InfLLMConfig
from .errors import PyllamaError
from .gguf_info import inspect

DEMO_PROMPT = ("<|im_start|>user\nIn two sentences, what is a KV cache in a transformer?<|im_end|>\n"
               "<|im_start|>assistant\n")


def _add_infllm_args(g) -> None:
    d = InfLLMConfig()
    # defaults are None, so that a flag given without --kv infllm can be refused
    g.add_argument("--block-size", type=int, default=None, help=f"tokens per block (default {d.block_size})")
    g.add_argument("--n-init", type=int, default=None, help=f"sink tokens (default {d.n_init})")
    g.add_argument("--n-local", type=int, default=None, help=f"local window (default {d.n_local})")
    g.add_argument("--topk", type=int, default=None, help=f"blocks selected per chunk (default {d.topk})")
    g.add_argument("--rewind", type=int, default=None,
                   help=f"ring cells kept to take back the end of the context (default {d.rewind})")
    g.add_argument("--repr-keys", type=int, default=None,
                   help=f"score a block by its r most-attended keys, 0: by all its keys (default {d.repr_keys})")
    g.add_argument("--positions", choices=POSITIONS, default=None,
                   help="memory at one fixed distance (infllm), at true positions (absolute), at true "
                        "positions inside the model's trained context and infllm past it (auto), or packed "
                        f"in its order just before the window (packed; default {d.positions})")


_INFLLM_FLAGS = ("block_size", "n_init", "n_local", "topk", "rewind", "repr_keys", "positions")


def _infllm_config(args, **extra) -> InfLLMConfig:
    given = {k: getattr(args, k) for k in _INFLLM_FLAGS if getattr(args, k) is not None}
    return InfLLMConfig(**given, **extra)


def _add_model_args(p: argparse.ArgumentParser, *, need_model: bool = True) -> None:
    if need_model:
        p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    p.add_argument("-mg", "--main-gpu", type=int, default=0, help="the GPU that holds the model (default 0)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="run the offloaded layers on llama.cpp rpc-server(s) instead of local GPUs")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="most prompt tokens per llama.cpp call (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="tokens per compute step (default 512)")
    p.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto")
    p.add_argument("--kv", choices=("full", "infllm"), default="full", help="KV cache type")
    p.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16", help="K cache type (default f16)")
    p.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16",
                   help="V cache type (default f16; a quantized one needs flash attention)")
    g = p.add_argument_group("InfLLM cache (--kv infllm)")
    _add_infllm_args(g)
    g.add_argument("--kv-budget", default=None,
                   help="device bytes for the cache, e.g. 256MiB (default: no bound, every block on the device)")
    g.add_argument("--cache-blocks", type=int, default=None,
                   help="device block slots per layer without --kv-budget, at least --topk (default: every block)")
    g.add_argument("--host-budget", default=None, help="most host bytes the block store may reach, e.g. 8GiB")
    p.add_argument("--seed", type=int, default=None)


def _add_sampling_args(p: argparse.ArgumentParser, *, n: int, temp: float) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=n, help=f"tokens to generate (default {n})")
    p.add_argument("--temp", type=float, default=temp, help=f"temperature, 0 = greedy (default {temp})")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyllama-inf", description="Run GGUF models with llama.cpp.")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text after a prompt")
    _add_model_args(g)
    g.add_argument("-p", "--prompt", help="prompt text")
    g.add_argument("-f", "--file", help="read the prompt from this file")
    _add_sampling_args(g, n=128, temp=0.8)

    i = sub.add_parser("inspect", help="show GGUF metadata and KV bytes per token (no weights loaded)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")

    pk = sub.add_parser("passkey", help="passkey retrieval accuracy at one context length")
    _add_model_args(pk)
    pk.add_argument("--length", type=int, required=True, help="prompt length in tokens")
    pk.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated needle depths in [0, 1]")
    pk.add_argument("--trials", type=int, default=1, help="prompts per depth")
    pk.add_argument("--json", action="store_true", help="print every trial as JSON")

    b = sub.add_parser("bench", help="compare models at device-memory budgets: speed, KV memory, passkey")
    b.add_argument("-m", "--model", action="append", required=True, help="GGUF model file (repeatable)")
    b.add_argument("--budgets", default="full,256MiB",
                   help="comma-separated: full, full-host (stock cache, K/V in host memory), infllm (no bound) "
                        "or sizes such as 64MiB for the InfLLM cache (default full,256MiB)")
    b.add_argument("--contexts", default="2048,8192", help="comma-separated prompt lengths in tokens")
    b.add_argument("--passkey-trials", type=int, default=1, help="passkey prompts per depth (0: none)")
    b.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated passkey depths in [0, 1]")
    b.add_argument("--n-gen", type=int, default=32, help="decoded tokens timed per cell (default 32)")
    b.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    b.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    _add_infllm_args(b.add_argument_group("InfLLM cache (the InfLLM budgets)"))
    b.add_argument("--out", required=True, help="directory for results.json, results.md and the plots")

    e = sub.add_parser("eval", help="long-context retrieval tasks (passkey, multikey, multivalue, kv, vartrack) "
                                     "with the stock and the InfLLM cache; resumable")
    e.add_argument("-m", "--model", required=True, help="GGUF model file")
    e.add_argument("--tasks", default="passkey,multikey,multivalue,kv,vartrack", help="comma-separated tasks")
    e.add_argument("--lengths", default="4096,8192", help="comma-separated prompt lengths in tokens")
    e.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated depths of the asked fact in [0, 1]")
    e.add_argument("--trials", type=int, default=1, help="prompts per task x length x depth (default 1)")
    e.add_argument("--caches", default="full,infllm",
                   help="comma-separated: full (stock cache, only up to the trained context) and/or infllm")
    e.add_argument("--full-max-length", type=int, default=None,
                   help="longest prompt for the stock cache (default: the model's trained context)")
    e.add_argument("--seed", type=int, default=0, help="trial t uses seed + t (default 0)")
    e.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    e.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    e.add_argument("--scratch-dir", default=None,
                   help="where the contexts that prompts share are saved while the run lasts (default: the "
                        "system's temporary directory; gigabytes at long contexts)")
    e.add_argument("--no-shared-prefixes", action="store_true",
                   help="evaluate every prompt from its first token (same answers, slower for the InfLLM cache)")
    _add_infllm_args(e.add_argument_group("InfLLM cache"))
    e.add_argument("--out", required=True,
                   help="directory for records.jsonl (trials already there are not run again), eval.json, "
                        "eval.md and eval.png")

    pp = sub.add_parser("perplexity", help="loss of the last tokens of a long text given growing contexts, "
                                           "stock vs InfLLM cache")
    pp.add_argument("-m", "--model", required=True, help="GGUF model file")
    pp.add_argument("--text", default=None,
                    help="a UTF-8 text file (default: the King James Bible from Debian's bible-kjv package)")
    pp.add_argument("--contexts", default="4096,8192,16384", help="comma-separated context lengths in tokens")
    pp.add_argument("--target", type=int, default=1024, help="scored tokens at the end of each context (default 1024)")
    pp.add_argument("--caches", default="full,infllm", help="comma-separated: full and/or infllm")
    pp.add_argument("--full-max-length", type=int, default=None,
                    help="longest context for the stock cache (default: the model's trained context)")
    pp.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    pp.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers on the GPU (-1: all)")
    _add_infllm_args(pp.add_argument_group("InfLLM cache"))
    pp.add_argument("--json", action="store_true", help="print the points as JSON")

    c = sub.add_parser("chat", help="a conversation on the terminal; -f reads a document once, then answers "
                                     "questions about it from the kept context")
    _add_model_args(c)
    c.add_argument("-f", "--file", help="a document to read before the first question")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--template", default=None, help="chat template name or text (default: the model's own)")
    c.add_argument("--state", default=None, metavar="FILE",
                   help="load the context from FILE when it exists (same model and settings), else save it "
                        "there after reading the document")
    _add_sampling_args(c, n=512, temp=0.2)

    d = sub.add_parser("demo", help="fetch the SmolLM2-135M test model and generate with it")
    _add_model_args(d, need_model=False)
    _add_sampling_args(d, n=64, temp=0.0)
    return ap


def _model_from_args(args, path: str) -> Model:
    fa = {"on": True, "off": False, "auto": None}[args.flash_attn]
    infllm = None
    extra = {}
    if args.kv == "infllm":
        infllm = _infllm_config(args, cache_blocks=args.cache_blocks)
        extra = dict(kv_budget=_size(args.kv_budget), host_budget=_size(args.host_budget))
    else:
        given = [k for k in _INFLLM_FLAGS + ("kv_budget", "cache_blocks", "host_budget") if getattr(args, k) is not None]
        if given:
            raise ValueError(", ".join("--" + k.replace("_", "-") for k in given) +
                             " apply to the InfLLM cache only; add --kv infllm")
    return Model(path, n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                 main_gpu=args.main_gpu, rpc_servers=args.rpc, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                 flash_attn=fa, kv=args.kv, infllm=infllm,
                 seed=args.seed, type_k=args.cache_type_k, type_v=args.cache_type_v, **extra)


def _size(text):
    """A --kv-budget / --host-budget value: digits are bytes, anything else a size string."""
    return int(text) if text is not None and text.isdigit() else text


def _generate(args, path: str, prompt: str) -> None:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, stop=args.stop, progress=sys.stderr.isatty())
    with _model_from_args(args, path) as m:
        if args.stream:
            with m.generate(prompt, stream=True, **kwargs) as stream:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            result = stream.result
            sys.stdout.write("\n")
        else:
            result = m.generate(prompt, **kwargs)
            print(result.text)
        kv = m.kv_stats()
    t = result.timings
    print(f"[{t.prompt_tokens} prompt tokens at {t.prefill_tok_s:.1f} tok/s, "
          f"{len(result.tokens)} generated at {t.decode_tok_s:.1f} tok/s, finish: {result.finish_reason}, "
          f"KV {kv.device_bytes / 2**20:.1f} MiB for n_ctx {kv.n_ctx}]", file=sys.stderr)


def _chat(args) -> None:
    from . import chat
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, stop=args.stop)
    document = None
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            document = f.read()
    with _model_from_args(args, args.model) as m:
        chat.interactive(m, document=document, system=args.system, template=args.template, state=args.state,
                         sampling=sampling, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)


def _inspect(args) -> None:
    info = inspect(args.path)
    if args.json:
        d = dataclasses.asdict(info)
        d["kv_bytes_per_token_f16"] = info.kv_bytes_per_token()
        print(json.dumps(d, indent=1, default=str))
        return
    for f in dataclasses.fields(info):
        print(f"{f.name:>18}: {getattr(info, f.name)}")
    print(f"{'KV bytes/token':>18}: {info.kv_bytes_per_token()} (f16 K and V)")


def _passkey(args) -> None:
    from . import passkey
    depths = _split(args.depths, float, "--depths")
    if args.ctx < args.length + 16:
        args.ctx = args.length + 16
    with _model_from_args(args, args.model) as m:
        results = passkey.run(m, args.length, depths, args.trials, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    for depth in depths:
        rows = [r for r in results if r.depth == depth]
        print(f"depth {depth:.2f}: {sum(r.correct for r in rows)}/{len(rows)} correct "
              f"({rows[0].n_tokens} tokens)", file=sys.stderr)
    print(f"accuracy: {sum(r.correct for r in results) / len(results):.3f}")


def _split(text: str, kind, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from None


def _bench(args) -> None:
    from . import bench
    rows = bench.compare(args.model, budgets=_split(args.budgets, str, "--budgets"),
                         contexts=_split(args.contexts, int, "--contexts"), passkey_trials=args.passkey_trials,
                         depths=_split(args.depths, float, "--depths"), n_gen=args.n_gen, threads=args.threads,
                         n_gpu_layers=args.n_gpu_layers, infllm=_infllm_config(args), out=args.out,
                         progress=sys.stderr.isatty())
    print(bench.markdown_table(rows), end="")
    if not bench.can_plot():
        print(bench.PLOTS_MISSING, file=sys.stderr)
    print(f"results in {args.out}", file=sys.stderr)


def _eval(args) -> None:
    from . import evals
    summaries = evals.evaluate(
        args.model, caches=_split(args.caches, str, "--caches"), tasks=_split(args.tasks, str, "--tasks"),
        lengths=_split(args.lengths, int, "--lengths"), depths=_split(args.depths, float, "--depths"),
        trials=args.trials, out=args.out, infllm=_infllm_config(args), threads=args.threads,
        n_gpu_layers=args.n_gpu_layers, full_max_length=args.full_max_length, seed=args.seed,
        share_prefixes=not args.no_shared_prefixes, scratch_dir=args.scratch_dir,
        progress=sys.stderr.isatty(), log=lambda msg: print(msg, file=sys.stderr))
    print(evals.markdown(summaries), end="")
    print(f"results in {args.out}", file=sys.stderr)


def _perplexity(args) -> None:
    from . import evals
    from .gguf_info import inspect as _inspect_gguf
    caches = _split(args.caches, str, "--caches")
    contexts = sorted(set(_split(args.contexts, int, "--contexts")))
    for c in caches:
        if c not in evals.CACHES:
            raise ValueError(f"unknown cache {c!r}; choose from {', '.join(evals.CACHES)}")
    if not contexts:
        raise ValueError("--contexts must name at least one length")
    if args.target < 1 or contexts[0] <= args.target:
        raise ValueError(f"every context must be longer than --target ({args.target}), got {contexts}")
    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        text = evals.kjv_text()
    full_max = args.full_max_length or _inspect_gguf(args.model).n_ctx_train
    points = []
    for cache in caches:
        ctxs = [c for c in contexts if cache != "full" or c <= full_max]
        if len(ctxs) < len(contexts):
            print(f"{cache}: contexts above {full_max} skipped", file=sys.stderr)
        if not ctxs:
            continue
        kw = {"kv": "infllm", "infllm": _infllm_config(args)} if cache == "infllm" else {"kv": "full", "flash_attn": True}
        with Model(args.model, n_ctx=max(ctxs), n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, **kw) as m:
            tokens = m.tokenize(text, add_special=False, parse_special=False)
            # every cache scores the tokens that end at the longest context asked for
            for p in evals.perplexity(m, tokens, ctxs, target=args.target, cache=cache, end=max(contexts)):
                points.append(p)
                print(f"{cache:>7} context {p.context:>7}: loss {p.nll:.4f} nats/token, perplexity {p.ppl:.3f} "
                      f"({p.seconds:.0f} s)", file=sys.stderr)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in points], indent=1))
    else:
        print("| cache | context | loss (nats/token) | perplexity |\n|---|---:|---:|---:|")
        for p in points:
            print(f"| {p.cache} | {p.context} | {p.nll:.4f} | {p.ppl:.3f} |")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as soon as Python code runs (a long native call checks
    for signals every 50 ms), so that ``with`` blocks close models and remove scratch files."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pyllama-inf`` command; returns the exit status (1 for an error, 130
    after Ctrl-C, 143 after SIGTERM; both stop it cleanly, keeping what ``eval`` finished)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    except _Terminated:
        print("\npyllama-inf: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    try:
        if args.command == "generate":
            if (args.prompt is None) == (args.file is None):
                raise ValueError("give exactly one of -p/--prompt and -f/--file")
            prompt = args.prompt
            if args.file is not None:
                with open(args.file, encoding="utf-8") as f:
                    prompt = f.read()
            _generate(args, args.model, prompt)
        elif args.command == "chat":
            _chat(args)
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "passkey":
            _passkey(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "perplexity":
            _perplexity(args)
        elif args.command == "demo":
            from .testing import smollm2_path
            path = smollm2_path()
            print(f"model: {path}\nprompt: {DEMO_PROMPT!r}\n", file=sys.stderr)
            args.stream = True
            _generate(args, str(path), DEMO_PROMPT)
    except (PyllamaError, ValueError, TypeError, OSError) as e:
        print(f"pyllama-inf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npyllama-inf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
