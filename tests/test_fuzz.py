"""Property tests: random generate() and InfLLMConfig parameters, random token lists and
corrupted GGUF files end in a result or a clear exception, never in a crash."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyllama_inf as pi

ALLOWED = (ValueError, TypeError, pi.PyllamaError)


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny(tiny_model):
    with pi.Model(tiny_model, n_ctx=256, n_threads=1) as m:
        yield m


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                    st.sampled_from([0.0, 1.0, 0.5, 1e-9]), st.none(), st.text(max_size=2))


@fuzz(120)
@given(max_tokens=st.one_of(st.integers(-5, 24), st.sampled_from([2**31, -2**40, 1.0, "3", None])),
       temperature=numbers, top_k=st.one_of(st.integers(-3, 2**33), numbers), top_p=numbers, min_p=numbers,
       seed=st.one_of(st.none(), st.integers(-3, 2**34)),
       stop=st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), st.integers()))
def test_generate_parameters(tiny, max_tokens, temperature, top_k, top_p, min_p, seed, stop):
    try:
        r = tiny.generate("Hello there", max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, seed=seed, stop=stop)
    except ALLOWED:
        return
    # accepted: the values were in range
    assert isinstance(max_tokens, int) and 0 <= max_tokens
    assert isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)
    assert 0 < top_p <= 1 and 0 <= min_p <= 1
    # "length": the budget ran out (the context is far larger); "stop": an end-of-generation
    # token (before the budget) or a stop string
    if r.finish_reason == "length":
        assert len(r.tokens) == max_tokens
    else:
        assert r.finish_reason == "stop" and (len(r.tokens) < max_tokens or bool(stop))
    assert all(0 <= t < tiny.n_vocab for t in r.tokens)


@fuzz(60)
@given(block_size=st.integers(-2, 300), n_init=st.integers(-2, 300), n_local=st.integers(-2, 1200),
       topk=st.integers(-2, 40), rewind=st.integers(-1, 600), positions=st.sampled_from(["infllm", "absolute", "auto", "packed", "x"]),
       cache_blocks=st.one_of(st.none(), st.integers(-1, 50)), n_ctx=st.integers(16, 1024),
       budget=st.one_of(st.none(), st.integers(-1, 2**26), st.sampled_from(["1MiB", "junk", "0"])))
def test_infllm_configs(tiny_model, block_size, n_init, n_local, topk, rewind, positions, cache_blocks,
                        n_ctx, budget):
    try:
        cfg = pi.InfLLMConfig(block_size=block_size, n_init=n_init, n_local=n_local, topk=topk,
                              rewind=rewind, positions=positions, cache_blocks=cache_blocks)
        m = pi.Model(tiny_model, n_ctx=n_ctx, n_threads=1, kv="infllm", infllm=cfg, kv_budget=budget)
    except ALLOWED:
        return
    with m:
        ids = [(7 * i + 3) % m.n_vocab for i in range(min(m.n_ctx, 300))]   # blocks leave the window
        assert np.isfinite(m.logits(ids, last_n=2)).all()
        r = m.generate("a b c", max_tokens=4, temperature=0)
        assert len(r.tokens) <= 4
        s = m.kv_stats()
        if s.budget_bytes:
            assert s.device_bytes <= s.budget_bytes
        assert np.isfinite(m.logits(m.tokenize("a b c"), last_n=1)).all()


@fuzz(120)
@given(data=st.data())
def test_random_token_lists(tiny, data):
    nv = tiny.n_vocab
    ids = data.draw(st.lists(st.one_of(st.integers(0, nv - 1), st.integers(-5, nv + 5)), max_size=300))
    bad = not ids or any(not 0 <= t < nv for t in ids)
    try:
        out = tiny.logits(ids, last_n=1)
    except ValueError:
        assert bad
        return
    except pi.ContextFullError:
        assert len(ids) > tiny.n_ctx
        return
    assert not bad and out.shape == (1, nv) and np.isfinite(out).all()


CORRUPT = textwrap.dedent("""
    import json, os, random, sys
    import gguf
    import pyllama_inf as pi
    src, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(src, "rb") as f:
        good = f.read()
    meta_end = gguf.GGUFReader(src).data_offset   # header, metadata and tensor infos
    rng = random.Random(20261126)
    seen = {}
    for case in range(n):
        data = bytearray(good)
        if case % 3 == 0:                       # truncation anywhere
            data = data[:rng.randrange(len(good))]
        else:                                   # 1-16 random bytes changed: anywhere / in the metadata
            end = len(data) if case % 3 == 1 else meta_end
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(end)] = rng.randrange(256)
        path = os.path.join(work, "c.gguf")
        with open(path, "wb") as f:
            f.write(data)
        print(f"case {case}", flush=True)       # the last line printed names a crashing case
        try:
            with pi.Model(path, n_ctx=64, n_threads=1) as m:
                m.generate("hi", max_tokens=3, temperature=0)
            outcome = "loaded"
        except (ValueError, TypeError, OSError, pi.PyllamaError) as e:
            outcome = type(e).__name__
        seen[outcome] = seen.get(outcome, 0) + 1
    print(json.dumps(seen), flush=True)
""")


def test_corrupted_gguf_files_end_in_exceptions(tiny_model, tmp_path):
    """150 corruptions of the synthetic model (a third truncated at a random offset, a third
    with 1-16 random bytes changed anywhere, a third with them changed in the header,
    metadata or tensor infos), loaded and run one after another in a child process: each
    ends in a load + generation or an exception; the child never dies."""
    res = subprocess.run([sys.executable, "-c", CORRUPT, tiny_model, str(tmp_path), "150"],
                         capture_output=True, text=True, timeout=900)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, f"died at {lines[-1] if lines else '?'}:\n{res.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    print(f"corrupted GGUF outcomes: {seen}")
    assert sum(seen.values()) == 150
    assert seen.get("ValueError", 0) > 0   # the truncations at least
