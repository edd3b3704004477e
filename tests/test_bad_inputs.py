"""Every bad input ends in a clear Python exception, checked in a child process so that an
abort (a GGML_ASSERT, a segfault) shows up as a failed case instead of killing the run.

Each case is a few lines run by a fresh interpreter against the synthetic model; the child
prints the exception's type and message as JSON, the test checks both.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from pyllama_inf.testing import write_random_llama

PRELUDE = """
import json, os, sys
import pyllama_inf as pi
MODEL = os.environ["PYLLAMA_TEST_MODEL"]
def model(**kw):
    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_threads", 1)
    return pi.Model(MODEL, **kw)
"""


def run_case(code: str, model_path: str, timeout: float = 120) -> dict:
    """Run code in a child interpreter; returns {"ok": True} or {"type", "bases", "message"}."""
    script = PRELUDE + textwrap.dedent("""
        try:
        {body}
        except BaseException as e:
            print(json.dumps({{"type": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__],
                              "message": str(e)}}))
        else:
            print(json.dumps({{"ok": True}}))
        """).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    env = dict(os.environ, PYLLAMA_TEST_MODEL=model_path)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, (f"the child died with code {res.returncode} (an abort or crash, not an "
                                 f"exception):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(write_random_llama(tmp_path_factory.mktemp("bad") / "tiny.gguf", seed=3))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_path):
    """Broken model files: name -> path."""
    import gguf
    d = tmp_path_factory.mktemp("files")
    good = pathlib.Path(model_path).read_bytes()
    reader = gguf.GGUFReader(model_path)
    cuts = {"header": 13, "metadata": reader.fields["llama.block_count"].offset + 5,
            "tensor-info": reader.tensors[0].field.offset + 7, "data": reader.data_offset + 100,
            "last-byte": len(good) - 1}
    files = {"empty": b"", "random": os.urandom(5000), "magic": b"GGML" + good[4:]}
    files.update({f"cut-{k}": good[:v] for k, v in cuts.items()})
    out = {}
    for name, data in files.items():
        p = d / f"{name}.gguf"
        p.write_bytes(data)
        out[name] = str(p)
    out["rope-scaling"] = str(write_random_llama(d / "rope-scaling.gguf", **{"llama.rope.scaling.type": "bogus"}))
    out["directory"] = str(d)
    out["missing"] = str(d / "nope.gguf")
    return out


FILE_CASES = [
    ("missing", ("FileNotFoundError",), "not found"),
    ("directory", ("IsADirectoryError",), "directory"),
    ("empty", ("ValueError",), "not a valid GGUF"),
    ("random", ("ValueError",), "not a valid GGUF"),
    ("magic", ("ValueError",), "magic"),
    ("cut-header", ("ValueError",), "truncated"),
    ("cut-metadata", ("ValueError",), "truncated"),
    ("cut-tensor-info", ("ValueError",), "truncated"),
    ("cut-data", ("ValueError",), "truncated"),
    ("cut-last-byte", ("ValueError",), "truncated"),
    ("rope-scaling", ("ValueError",), "rope.scaling.type is 'bogus'"),
]


@pytest.mark.parametrize("name, types, words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_model_file(bad_files, name, types, words):
    r = run_case(f"pi.Model({bad_files[name]!r}, n_threads=1)", bad_files[name])
    assert r.get("type") in types, r
    assert words in r["message"], r


# (id, code, exception type names accepted, words the message must contain)
CASES = [
    # context / threads / batch
    ("n_ctx-0", "model(n_ctx=0)", ("ValueError",), "n_ctx"),
    ("n_ctx-negative", "model(n_ctx=-1)", ("ValueError",), "n_ctx"),
    ("n_ctx-absurd", "model(n_ctx=2**40)", ("ValueError",), "n_ctx"),
    ("n_ctx-beyond-memory", "model(n_ctx=2**30)", ("ValueError",), "host memory"),
    ("n_ctx-float", "model(n_ctx=1.5)", ("TypeError",), "n_ctx"),
    ("n_threads-0", "model(n_threads=0)", ("ValueError",), "n_threads"),
    ("n_threads-absurd", "model(n_threads=10**6)", ("ValueError",), "n_threads"),
    ("n_batch-0", "model(n_batch=0)", ("ValueError",), "n_batch"),
    ("n_batch-negative", "model(n_batch=-8)", ("ValueError",), "n_batch"),
    ("n_ubatch-over-batch", "model(n_batch=64, n_ubatch=128)", ("ValueError",), "n_ubatch"),
    ("n_gpu_layers", "model(n_gpu_layers=-5)", ("ValueError",), "n_gpu_layers"),
    # cache types (the tiny model's heads hold 16 values: no 32-value block fits)
    ("type_k-unknown", "model(type_k='q3_k')", ("ValueError",), "type_k must be one of"),
    ("type_v-not-a-string", "model(type_v=8)", ("TypeError",), "type_v"),
    ("type_k-block-too-big", "model(type_k='q8_0')", ("ValueError",), "does not divide a row of 16"),
    ("type_v-infllm-block-too-big", "model(kv='infllm', type_v='q4_0')", ("ValueError",), "does not divide"),
    # cache modes and budgets
    ("kv-unknown", "model(kv='paged')", ("ValueError",), "kv must be one of"),
    ("kv-none", "model(kv=None)", ("ValueError",), "kv must be one of"),
    ("kv_budget-negative", "model(kv='infllm', kv_budget=-1)", ("ValueError",), "kv_budget"),
    ("kv_budget-garbage", "model(kv='infllm', kv_budget='lots')", ("ValueError",), "kv_budget"),
    ("kv_budget-type", "model(kv='infllm', kv_budget=[1])", ("TypeError",), "kv_budget"),
    ("kv_budget-too-small", "model(kv='infllm', kv_budget='1KiB')", ("ValueError",), "minimum"),
    ("kv_budget-with-full", "model(kv_budget='1GiB')", ("ValueError",), "kv='infllm'"),
    ("host_budget-too-small", "model(kv='infllm', n_ctx=4096, host_budget=1000, "
     "infllm=pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, cache_blocks=2))", ("ValueError",),
     "host_budget"),
    # InfLLMConfig
    ("block_size-0", "pi.InfLLMConfig(block_size=0)", ("ValueError",), "block_size"),
    ("topk-negative", "pi.InfLLMConfig(topk=-1)", ("ValueError",), "topk"),
    ("n_local-0", "pi.InfLLMConfig(n_local=0)", ("ValueError",), "n_local"),
    ("n_init-negative", "pi.InfLLMConfig(n_init=-4)", ("ValueError",), "n_init"),
    ("rewind-negative", "pi.InfLLMConfig(rewind=-1)", ("ValueError",), "rewind"),
    ("positions-unknown", "pi.InfLLMConfig(positions='rope')", ("ValueError",), "positions"),
    ("block_size-huge", "pi.InfLLMConfig(block_size=2**40)", ("ValueError",), "block_size"),
    ("config-type", "model(kv='infllm', infllm={'topk': 4})", ("TypeError",), "InfLLMConfig"),
    ("n_local-huge", "pi.InfLLMConfig(n_local=2**31)", ("ValueError",), "n_local"),
    ("topk-huge", "pi.InfLLMConfig(topk=2**33)", ("ValueError",), "topk"),
    ("cache_blocks-with-budget", "model(kv='infllm', kv_budget='64MiB', infllm=pi.InfLLMConfig(cache_blocks=4))",
     ("ValueError",), "cache_blocks"),
    # prompts and sampling
    ("prompt-bytes", "model().generate(b'hi')", ("TypeError",), "prompt"),
    ("prompt-none", "model().generate(None)", ("TypeError",), "prompt"),
    ("prompt-int", "model().generate(5)", ("TypeError",), "prompt"),
    ("prompt-surrogate", "model().generate('a \\ud800 b')", ("ValueError",), "Unicode"),
    ("prompt-too-long", "model(n_ctx=64).generate('word ' * 500, max_tokens=1)", ("ContextFullError",), "n_ctx"),
    ("max_tokens-negative", "model().generate('hi', max_tokens=-1)", ("ValueError",), "max_tokens"),
    ("temperature-negative", "model().generate('hi', temperature=-0.5)", ("ValueError",), "temperature"),
    ("temperature-nan", "model().generate('hi', temperature=float('nan'))", ("ValueError",), "temperature"),
    ("top_p-0", "model().generate('hi', top_p=0.0)", ("ValueError",), "top_p"),
    ("top_p-over-1", "model().generate('hi', top_p=1.01)", ("ValueError",), "top_p"),
    ("top_k-negative", "model().generate('hi', top_k=-1)", ("ValueError",), "top_k"),
    ("min_p-over-1", "model().generate('hi', min_p=2.0)", ("ValueError",), "min_p"),
    ("seed-negative", "model().generate('hi', seed=-1)", ("ValueError",), "seed"),
    ("stop-empty", "model().generate('hi', stop='')", ("ValueError",), "stop"),
    ("progress-type", "model().generate('hi', progress='yes')", ("TypeError",), "progress"),
    # tokens
    ("logits-over-vocab", "m = model(); m.logits([1, m.n_vocab])", ("ValueError",), "vocabulary"),
    ("logits-negative", "model().logits([3, -1])", ("ValueError",), "vocabulary"),
    ("logits-huge", "model().logits([2**40])", ("ValueError",), "vocabulary"),
    ("logits-empty", "model().logits([])", ("ValueError",), "empty"),
    ("logits-str", "model().logits('hello')", ("TypeError",), "tokens"),
    ("logits-float", "model().logits([1, 2.5])", ("TypeError",), "token 1"),
    ("logits-too-many", "m = model(n_ctx=64); m.logits([1] * (m.n_ctx + 1))", ("ContextFullError",), "n_ctx"),
    ("detokenize-over-vocab", "model().detokenize([10**6])", ("ValueError",), "vocabulary"),
    ("tokenize-bytes", "model().tokenize(b'x')", ("TypeError",), "text"),
]

# every public call after close()
CLOSED = ["generate('hi')", "logits([1, 2])", "tokenize('hi')", "detokenize([1])", "kv_stats()",
          "n_ctx", "n_vocab", "n_ctx_train"]
CASES += [(f"closed-{c.split('(')[0]}", f"m = model(); m.close(); m.{c}", ("ModelClosedError",), "closed")
          for c in CLOSED]


@pytest.mark.parametrize("name, code, types, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(model_path, name, code, types, words):
    r = run_case(code, model_path)
    assert r.get("type") in types, r
    assert words in r["message"], r
    # every accepted type is a ValueError, TypeError, FileNotFoundError or PyllamaError
    assert {"ValueError", "TypeError", "FileNotFoundError", "PyllamaError"} & set(r["bases"]), r
