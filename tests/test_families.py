"""kv="infllm" across model families: equal to the stock cache, or a clean refusal.

Each family of tests/families.py (a tiny random-weight model) runs in a child process,
so that an abort inside llama.cpp or the engine fails one test instead of killing
pytest. The child computes the logits of 400 tokens with the stock cache (flash
attention, the kernel the InfLLM cache uses) and with two InfLLM configurations:

- window: n_local=1024 covers the whole context, no block ever leaves the window;
- absolute: a window of 16 + 64 tokens, the rest in 16-token memory blocks, topk=64
  selecting every block, at true positions.

Both give the stock cache's answer in exact arithmetic. For each configuration the
outcome must be top-1 agreement >= 0.99 with the stock logits (all finite), or, for the
families listed in REFUSED, a ``pyllama_inf.UnsupportedError`` naming the reason, raised
when the model is constructed. Anything else (a crash, another exception, an unexpected
refusal, lower agreement, non-finite logits) fails.

The default positions="infllm" re-rotates memory keys to the memory position and so has
no stock reference, except for models without RoPE (NO_ROPE), where it must match too.
"""

import json
import re
import subprocess
import sys

import pytest

from families import FAMILIES, write_all

MIN_TOP1 = 0.99
# families none of whose layers use RoPE: there the default positions="infllm" has the stock
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
}
if sys.argv[2] == "norope":
    # without RoPE the memory position changes nothing: the default positions must match too
    CONFIGS["infllm"] = pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=64)

def model(**kw):
    return pi.Model(path, n_ctx=1024, n_threads=1, n_ubatch=64, flash_attn=True, **kw)

def stage(what):
    print("STAGE " + what, flush=True)

stage("stock")
with model() as m:
    stock = m.logits(ids)
out = {"stock_finite": bool(np.isfinite(stock).all())}
for name, cfg in CONFIGS.items():
    stage(name + ": Model(kv='infllm')")
    try:
        m = model(kv="infllm", infllm=cfg)
    except pi.UnsupportedError as e:
        out[name] = {"refused": str(e)}
        continue
    stage(name + ": logits")
    with m:
        lg = m.logits(ids)
        s = m.kv_stats().infllm
    finite = bool(np.isfinite(lg).all())
    out[name] = {
        "top1": float((lg.argmax(1) == stock.argmax(1)).mean()),
        "nmse": float(((lg - stock) ** 2).mean() / (stock ** 2).mean()) if finite else None,
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
              "; ".join(f"{name}: {_describe(res[name])}" for name in ("window", "absolute", "infllm") if name in res))

    assert res["stock_finite"], f"{family}: stock logits are not finite"
    problems = []
    for name in ("window", "absolute", "infllm"):
        if name not in res:
            continue
        r = res[name]
        if "refused" in r:
            if family not in REFUSED or REFUSED[family] not in r["refused"]:
                problems.append(f"{name}: refused unexpectedly: {r['refused']}")
            continue
        if family in REFUSED:
            problems.append(f"{name}: ran, but is expected to be refused ({REFUSED[family]})")
        if not r["finite"] or r["top1"] < MIN_TOP1:
            problems.append(f"{name}: {_describe(r)}")
    assert not problems, f"{family} ({FAMILIES[family].arch}): " + "; ".join(problems)
