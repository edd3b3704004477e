"""kv="infllm" across model families: equal to the stock cache, or a clean refusal.

Each family of tests/families.py (a tiny random-weight model) runs in a child process,
so that an abort inside llama.cpp or the engine fails one test instead of killing
pytest. The child computes the logits of 400 tokens with the stock cache (flash
attention, the kernel the InfLLM cache uses) and with two InfLLM configurations:

- window: n_local=1024 covers the whole context, no block ever leaves the window;
- absolute: a window of 16 + 64 tokens, the rest in 16-token memory blocks, topk=64
  selecting every block, at true positions;
- auto: the same with positions="auto": 400 tokens are inside every family's
  trained context, so the memory keys, stored at position 0, are rotated on to their true
  positions in every ubatch.
- auto-steps: "auto" over the first STEP_TOKENS tokens one token per ubatch: decode steps,
  which on the CPU take the cache's own single-query kernel; it turns each memory key by
  its offset in its block (every RoPE layout, partial rotations included).
- packed, packed-steps: the same two with positions="packed": the sinks and the picked blocks
  laid out in their order just before the window. With every block picked that is where
  they are, so the picks must be put in their order (top-k leaves them in none) and each
  given its own place.

All of them give the stock cache's answer in exact arithmetic. For each configuration the
outcome must be top-1 agreement >= 0.99 with the stock logits and an NMSE within MAX_NMSE
(all finite), or, for the
families listed in REFUSED, a ``pyllama_inf.UnsupportedError`` naming the reason, raised
when the model is constructed. Anything else (a crash, another exception, an unexpected
refusal, lower agreement, non-finite logits) fails.

positions="infllm" re-rotates memory keys to the memory position and so has no stock
reference, except for models without RoPE (NO_ROPE), where it must match too.
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import tiny_ids
from families import FAMILIES, write_all

MIN_TOP1 = 0.99
# and the logits themselves: a tiny model's top-1 can survive a real difference (Gemma 2's
# soft-cap left out moves its logits by an NMSE of 1e-2 with every top-1 token kept). Window
# covering differs from stock only in the order of the rows; the other two re-rotate or
# gather the keys in f16 (largest seen: 3e-7)
MAX_NMSE = {"window": 1e-6, "absolute": 1e-5, "auto": 1e-5, "auto-steps": 1e-5, "packed": 1e-5, "packed-steps": 1e-5,
            "infllm": 1e-5}
NAMES = ("window", "absolute", "auto", "auto-steps", "packed", "packed-steps", "infllm")
# families none of whose layers use RoPE: there positions="infllm" has the stock
# answer too, which checks that the cache does not rotate keys the model never rotated
NO_ROPE = {"granite-norope", "starcoder"}
CHILD_TIMEOUT_S = 120
# families the cache refuses today, with a phrase of the reason; every other family must
# run (a refusal there is a regression, not a pass)
REFUSED = {}

CHILD = r"""
import json, sys
import numpy as np
import pyllama_inf as pi

path = sys.argv[1]
ids = [2 + (i * 7 + i // 13) % 250 for i in range(400)]
CONFIGS = {
    "window": pi.InfLLMConfig(n_local=1024, n_init=16, block_size=16, topk=4),
    "absolute": pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="absolute"),
    "auto": pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="auto"),
    "auto-steps": pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="auto"),
    "packed": pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="packed"),
    "packed-steps": pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="packed"),
}
STEP_TOKENS = 200   # the -steps configurations: 120 of them with memory (window 64 + sinks 16)
if sys.argv[2] == "norope":
    # without RoPE the memory position changes nothing: positions="infllm" must match too
    CONFIGS["infllm"] = pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64, positions="infllm")

def model(n_ubatch=64, **kw):
    # swa_full=False: the SWA cache size the InfLLM cache uses by default, for both (no effect
    # on models without sliding-window layers)
    return pi.Model(path, n_ctx=1024, n_threads=1, n_ubatch=n_ubatch, flash_attn=True, swa_full=False, **kw)

def stage(what):
    print("STAGE " + what, flush=True)

stage("stock")
with model() as m:
    stock = m.logits(ids)
out = {"stock_finite": bool(np.isfinite(stock).all())}
for name, cfg in CONFIGS.items():
    stage(name + ": Model(kv='infllm')")
    steps = name.endswith("-steps")
    try:
        m = model(kv="infllm", infllm=cfg, n_ubatch=1 if steps else 64)
    except pi.UnsupportedError as e:
        out[name] = {"refused": str(e)}
        continue
    stage(name + ": logits")
    ref = stock[:STEP_TOKENS] if steps else stock
    with m:
        lg = m.logits(ids[:len(ref)])
        s = m.kv_stats().infllm
    finite = bool(np.isfinite(lg).all())
    out[name] = {
        "top1": float((lg.argmax(1) == ref.argmax(1)).mean()),
        "nmse": float(((lg - ref) ** 2).mean() / (ref ** 2).mean()) if finite else None,
        "finite": finite,
        "n_blocks": int(s.n_blocks),
        "selections": int(s.selections),
    }
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="session")
def family_files(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("families"))


def _tail(text, n=1500):
    return text[-n:] if text else "(empty)"


_PY_FRAME = re.compile(r"(Objects|Python|Modules|Include|sysdeps|csu|nptl)/|_Py|Py_|pymain|_start|\?\? \(\)")


def _crash_report(stdout, stderr):
    """What the child got to, the assertion or error lines, the native frames of a ggml
    backtrace (Python's own left out) and the end of stderr."""
    stages = [ln[len("STAGE "):] for ln in stdout.splitlines() if ln.startswith("STAGE ")]
    lines = stderr.splitlines()
    both = lines + stdout.splitlines()   # gdb, run by ggml's abort handler, prints the frames on stdout
    errors = [ln for ln in lines if re.search(r"GGML_ASSERT|GGML_ABORT|error|Error|terminate called", ln)
              and not ln.startswith("#")]
    frames = [re.sub(r"^(#\d+)\s+0x[0-9a-f]+ in ", r"\1 ", ln).split(" from ")[0]
              for ln in both if re.match(r"#\d+ ", ln) and not _PY_FRAME.search(ln)]
    if "Traceback (most recent call last):" in stderr:
        tail = stderr[stderr.rindex("Traceback (most recent call last):"):]
    else:   # without the source lines gdb cannot find
        tail = _tail("\n".join(ln for ln in lines if not re.match(r"\d+\t.*No such file or directory", ln)))
    return (f"last stage reached: {stages[-1] if stages else '(none)'}\n"
            f"error lines:\n  " + "\n  ".join(errors[:10] or ["(none)"]) + "\n"
            f"native frames:\n  " + "\n  ".join(frames[:14] or ["(none)"]) + "\n"
            f"stderr tail:\n{tail[-1500:]}")


def _describe(r):
    if "refused" in r:
        return f"UnsupportedError: {r['refused']}"
    nmse = "nan" if r["nmse"] is None else f"{r['nmse']:.2e}"
    return (f"top1={r['top1']:.4f} nmse={nmse} finite={r['finite']} "
            f"blocks={r['n_blocks']} selections={r['selections']}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_infllm_matches_stock_or_refuses(family, family_files, capsys):
    path = family_files[family]
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), "norope" if family in NO_ROPE else "rope"],
                              capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail(f"{family}: the child ran past {CHILD_TIMEOUT_S} s\n{_crash_report(*text)}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{family} ({FAMILIES[family].arch}): the child exited with status "
                    f"{proc.returncode} without a result\n{_crash_report(proc.stdout, proc.stderr)}")
    res = json.loads(lines[-1][len("RESULT "):])

    with capsys.disabled():
        print(f"\n[{family}] stock finite={res['stock_finite']}; " +
              "; ".join(f"{name}: {_describe(res[name])}" for name in NAMES if name in res))

    assert res["stock_finite"], f"{family}: stock logits are not finite"
    problems = []
    for name in NAMES:
        if name not in res:
            continue
        r = res[name]
        if "refused" in r:
            if family not in REFUSED or REFUSED[family] not in r["refused"]:
                problems.append(f"{name}: refused unexpectedly: {r['refused']}")
            continue
        if family in REFUSED:
            problems.append(f"{name}: ran, but is expected to be refused ({REFUSED[family]})")
        if not r["finite"] or r["top1"] < MIN_TOP1 or r["nmse"] > MAX_NMSE[name]:
            problems.append(f"{name}: {_describe(r)}")
    assert not problems, f"{family} ({FAMILIES[family].arch}): " + "; ".join(problems)


@pytest.mark.parametrize("family", ["llama-rope-freqs", "phi3"])
def test_frequency_factors_reposition_like_linear_scaling(family, tmp_path):
    """Frequency factors all equal to c rotate exactly like linear scaling by c (angle
    p * base^(-2i/d) / c either way). So with positions="infllm", where memory
    keys are rotated back to 0 and on to the memory position, a model with factors c and
    the same model with factors 1 and ``rope.scaling.type = linear``, factor c, must give the
    same logits: re-positioning that dropped or misapplied the factors would not."""
    import numpy as np

    import pyllama_inf as pi
    from families import write_random_family

    arch = FAMILIES[family].arch
    c, n = 4.0, FAMILIES[family].rot // 2
    factors = write_random_family(tmp_path / "factors.gguf", family, rope_factors=np.full(n, c, np.float32))
    linear = write_random_family(tmp_path / "linear.gguf", family, rope_factors=np.ones(n, np.float32),
                                 extra_kv={f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": c})
    plain = write_random_family(tmp_path / "plain.gguf", family, rope_factors=np.ones(n, np.float32))
    ids = tiny_ids(400)
    cfg = pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=4, positions="infllm")

    def logits(path, **kw):
        with pi.Model(str(path), n_ctx=1024, n_threads=1, n_ubatch=64, flash_attn=True, **kw) as m:
            out = m.logits(ids)
            return out, (m.kv_stats().infllm.selections if kw else None)

    def nmse(a, b):
        return float(((a - b) ** 2).mean() / (b ** 2).mean())

    stock_f, _ = logits(factors)
    stock_l, _ = logits(linear)
    stock_p, _ = logits(plain)
    assert nmse(stock_f, stock_l) < 1e-8            # the two models are the same function
    assert nmse(stock_f, stock_p) > 1e-4            # and the factors matter
    inf_f, sel = logits(factors, kv="infllm", infllm=cfg)
    inf_l, _ = logits(linear, kv="infllm", infllm=cfg)
    assert sel > 0
    assert (inf_f.argmax(1) == inf_l.argmax(1)).all() and nmse(inf_f, inf_l) < 1e-8, nmse(inf_f, inf_l)


def test_soft_capped_decode_steps(tmp_path):
    """Gemma 2's soft-cap on one-token steps: the CPU one-query kernel does not apply it, so
    decoding goes through ggml's flash attention, which does (the cap changes these logits
    by an NMSE of about 1e-2, so leaving it out would show)."""
    import pyllama_inf as pi
    from families import write_random_family

    path = str(write_random_family(tmp_path / "gemma2.gguf", "gemma2"))
    ids = tiny_ids(120)

    def logits(**kw):
        with pi.Model(path, n_ctx=256, n_threads=1, n_ubatch=1, flash_attn=True, swa_full=False, **kw) as m:
            return m.logits(ids)

    stock = logits()
    ours = logits(kv="infllm", infllm=pi.InfLLMConfig(n_local=128, n_init=16, block_size=16))
    nmse = float(((ours - stock) ** 2).mean() / (stock ** 2).mean())
    assert (ours.argmax(1) == stock.argmax(1)).all() and nmse < 1e-6, nmse
