"""The context kept between calls: prefix reuse, reset, n_batch, save and load.

Every reuse result is compared with a fresh evaluation of the same tokens on the same model
(reset() first): the logits must be bit-identical, for the stock cache and for the InfLLM
cache with blocks evicted, selected and (offload) fetched from the host store.
"""

import dataclasses
import logging
import os
import struct

import numpy as np
import pytest

import pyllama_inf as pi
from pyllama_inf.testing import write_random_llama

from test_bad_inputs import run_case

# small blocks and window: 1500 tokens move the window ~40 times and evict ~40 blocks
SMALL = pi.InfLLMConfig(block_size=32, n_init=32, n_local=256, topk=4, rewind=256)
CACHES = {
    "full": dict(),
    "infllm": dict(kv="infllm", infllm=SMALL),
    "infllm-offload": dict(kv="infllm", infllm=dataclasses.replace(SMALL, cache_blocks=6)),
}
UBATCH = 128


def _ids(m, n, seed=0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, m.n_vocab - 10, size=n)]


def _model(path, cache, **kw):
    kw = {**CACHES[cache], **kw}
    kw.setdefault("n_ctx", 2048)
    return pi.Model(path, n_threads=2, n_ubatch=UBATCH, **kw)


def _fresh(m, ids, last_n):
    m.reset()
    return m.logits(ids, last_n=last_n)


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_longer_prompt_evaluates_only_its_new_tokens(smollm2, cache):
    with _model(smollm2, cache) as m:
        ids = _ids(m, 1500)
        m.logits(ids[:1001], last_n=1)
        before = m.kv_stats().reused_tokens
        got = m.logits(ids, last_n=300)
        reused = m.kv_stats().reused_tokens - before
        # the tokens before the last ubatch boundary: the rest is evaluated in the ubatches of
        # a fresh evaluation (a token's result depends on its ubatch: the InfLLM cache selects
        # per ubatch, ggml's kernels and summation orders follow the batch size)
        assert reused == 1001 // UBATCH * UBATCH
        assert m.context_tokens == ids
        if cache != "full":
            s = m.kv_stats().infllm
            assert s.n_blocks > 30 and s.selections > 0
            if cache == "infllm-offload":
                assert s.misses > 0 and not s.resident
        want = _fresh(m, ids, 300)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_prompt_that_diverges_takes_back_the_tail(smollm2, cache):
    with _model(smollm2, cache) as m:
        a, x, y = _ids(m, 1200, 1), _ids(m, 200, 2), _ids(m, 150, 3)
        m.logits(a + x, last_n=1)
        before = m.kv_stats()
        got = m.logits(a + y, last_n=150)
        after = m.kv_stats()
        assert after.reuse_fallbacks == before.reuse_fallbacks
        assert after.reused_tokens - before.reused_tokens == 1200 // UBATCH * UBATCH
        assert m.kv_stats().n_tokens == 1350
        want = _fresh(m, a + y, 150)
    assert np.array_equal(got, want)


def test_going_back_past_the_ring_starts_afresh_and_says_so(smollm2, caplog):
    cfg = dataclasses.replace(SMALL, rewind=0)
    with pi.Model(smollm2, n_ctx=2048, n_threads=2, n_ubatch=UBATCH, kv="infllm", infllm=cfg) as m:
        ring = m.kv_stats().infllm.n_ring
        a, x = _ids(m, 1024, 4), _ids(m, 600, 5)
        m.logits(a + x, last_n=1)
        assert 600 > ring - cfg.n_local   # the window at 1024 was overwritten
        with caplog.at_level(logging.WARNING, logger="pyllama_inf"):
            got = m.logits(a + [11, 12, 13], last_n=3)
        st = m.kv_stats()
        assert st.reuse_fallbacks == 1 and st.reused_tokens == 0
        assert any("evaluated from the start" in r.getMessage() for r in caplog.records)
        want = _fresh(m, a + [11, 12, 13], 3)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("cache", ["full", "infllm"])
def test_the_same_prompt_again_gives_the_same_answer(smollm2, cache):
    prompt = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
    with _model(smollm2, cache) as m:
        first = m.generate(prompt, max_tokens=24, temperature=0)
        again = m.generate(prompt, max_tokens=24, temperature=0)
        assert first.n_reused_tokens == 0
        n = first.n_prompt_tokens
        assert again.n_reused_tokens == (n - 1) // UBATCH * UBATCH
        assert again.timings.prompt_tokens == n - again.n_reused_tokens
        assert again.tokens == first.tokens
        # the context holds the prompt and the answer but its last token (sampled, not evaluated)
        assert m.context_tokens == m.tokenize(prompt) + first.tokens[:-1]


def test_reset_drops_the_context(tiny_model):
    with pi.Model(tiny_model, n_ctx=512, n_threads=1) as m:
        ids = _ids(m, 100)
        m.logits(ids, last_n=1)
        assert m.kv_stats().n_tokens == 100 and m.context_tokens == ids
        m.reset()
        assert m.kv_stats().n_tokens == 0 and m.context_tokens == []
        m.logits(ids, last_n=1)
        assert m.kv_stats().reused_tokens == 0


def test_a_custom_chunk_evaluation_is_not_reused(tiny_model):
    with pi.Model(tiny_model, n_ctx=512, n_threads=1) as m:
        ids = _ids(m, 60)
        m._s().eval(ids, last_n=1, chunk=7)
        assert m.context_tokens == []
        m.logits(ids, last_n=1)
        assert m.kv_stats().reused_tokens == 0


@pytest.mark.parametrize("cache", ["full", "infllm"])
def test_n_batch_groups_ubatches_without_changing_results(tiny_model, cache):
    kw = CACHES[cache]
    calls = {}
    out = {}
    for n_batch in (UBATCH, 4 * UBATCH):
        with pi.Model(tiny_model, n_ctx=2048, n_threads=1, n_ubatch=UBATCH, n_batch=n_batch, **kw) as m:
            seen = []
            prompt = m.detokenize(_ids(m, 701, 8))
            r = m.generate(prompt, max_tokens=4, temperature=0, progress=lambda d, t: seen.append(d))
            calls[n_batch] = seen
            out[n_batch] = (r.tokens, m.logits(_ids(m, 900), last_n=5))
    n = len(calls[UBATCH]) and calls[UBATCH][-1]
    assert calls[UBATCH] == [min(n, UBATCH * (i + 1)) for i in range(-(-n // UBATCH))]
    assert calls[4 * UBATCH] == [min(n, 4 * UBATCH * (i + 1)) for i in range(-(-n // (4 * UBATCH)))]
    assert out[UBATCH][0] == out[4 * UBATCH][0]
    assert np.array_equal(out[UBATCH][1], out[4 * UBATCH][1])


#
# save and load
#

@pytest.mark.parametrize("cache", list(CACHES))
def test_a_loaded_state_continues_exactly(smollm2, cache, tmp_path):
    path = tmp_path / "ctx.state"
    with _model(smollm2, cache) as m:
        ids = _ids(m, 1400, 6)
        m.logits(ids[:1300], last_n=1)
        m.save_state(path)
        want_next = m.logits(ids, last_n=100)
        want_text = m.generate(m.detokenize(ids[:1300]) + " and", max_tokens=8, temperature=0).text
    with _model(smollm2, cache) as m:
        m.load_state(path)
        assert m.context_tokens == ids[:1300]
        assert m.kv_stats().n_tokens == 1300
        got_next = m.logits(ids, last_n=100)
        assert m.kv_stats().reused_tokens > 0
        got_text = m.generate(m.detokenize(ids[:1300]) + " and", max_tokens=8, temperature=0).text
    assert np.array_equal(got_next, want_next)
    assert got_text == want_text


def test_a_state_moves_between_resident_and_offload(smollm2, tmp_path):
    path = tmp_path / "ctx.state"
    with _model(smollm2, "infllm") as m:
        ids = _ids(m, 1300, 7)
        m.logits(ids[:1200], last_n=1)
        m.save_state(path)
        want = m.logits(ids, last_n=100)
    with _model(smollm2, "infllm-offload") as m:
        m.load_state(path)
        got = m.logits(ids, last_n=100)
        assert m.kv_stats().infllm.misses > 0
    assert np.array_equal(got, want)


def test_a_state_of_another_model_or_config_is_refused(tiny_model, tmp_path):
    # the fingerprint covers metadata and tensor layout (not the weights): another layer count
    other = write_random_llama(tmp_path / "other.gguf", seed=1, n_layer=3)
    path = tmp_path / "ctx.state"
    with pi.Model(tiny_model, n_ctx=512, n_threads=1) as m:
        ids = _ids(m, 50)
        m.logits(ids, last_n=1)
        m.save_state(path)
    with pi.Model(str(other), n_ctx=512, n_threads=1) as m:
        with pytest.raises(pi.StateError, match="another model"):
            m.load_state(path)
    with pi.Model(tiny_model, n_ctx=1024, n_threads=1) as m:
        with pytest.raises(pi.StateError, match="n_ctx: saved 512"):
            m.load_state(path)
    with pi.Model(tiny_model, n_ctx=512, n_threads=1, kv="infllm") as m:
        with pytest.raises(pi.StateError, match="kv: saved 'full'"):
            m.load_state(path)
        with pytest.raises(FileNotFoundError):
            m.load_state(tmp_path / "missing.state")


def _fnv_words(data: bytes) -> int:
    """The format's checksum, written from its description in llama-infllm-state.cpp."""
    prime, h, mask = 0x100000001b3, 0xcbf29ce484222325, (1 << 64) - 1
    padded = data + b"\0" * (-len(data) % 8)
    for (w,) in struct.iter_unpack("<Q", padded):
        h = ((h ^ w) * prime) & mask
    return ((h ^ len(data)) * prime) & mask


def _broken_states(good: bytes):
    head_len = struct.unpack_from("<Q", good, 16)[0]
    payload = 24 + head_len
    mid = (payload + len(good) - 16) // 2
    flip = bytearray(good)
    flip[mid] ^= 0x40
    # a payload that passes the checksum but claims another ring size: the cache refuses it
    forged = bytearray(good)
    at = forged.index(struct.pack("<I", 0x4C464E49), payload)    # the InfLLM section's magic
    struct.pack_into("<I", forged, at + 16, struct.unpack_from("<I", forged, at + 16)[0] + 1)   # ring cells
    body = bytes(forged[:-8])
    forged[-8:] = struct.pack("<Q", _fnv_words(body))
    head = bytearray(good)
    head[24 + 2] = ord("#")
    return {"empty": b"", "random": os.urandom(4096), "magic": b"XXXXXXXX" + good[8:],
            "truncated-head": good[:24 + head_len // 2], "truncated-payload": good[:mid],
            "last-byte": good[:-1], "flipped-bit": bytes(flip), "head-json": bytes(head),
            "forged-payload": bytes(forged)}


BROKEN = ["empty", "random", "magic", "truncated-head", "truncated-payload", "last-byte", "flipped-bit",
          "head-json", "forged-payload"]


@pytest.fixture(scope="module")
def state_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("states")
    model = write_random_llama(d / "tiny.gguf", seed=3)
    good = d / "good.state"
    cfg = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=32)
    with pi.Model(str(model), n_ctx=256, n_threads=1, n_ubatch=32, kv="infllm", infllm=cfg) as m:
        m.logits([(5 * i + 7) % m.n_vocab for i in range(200)], last_n=1)
        m.save_state(good)
    files = {name: d / f"{name}.state" for name in BROKEN}
    for name, data in _broken_states(good.read_bytes()).items():
        files[name].write_bytes(data)
    return str(model), files


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_state_file_raises_in_a_child(state_files, name):
    model, files = state_files
    code = f"""
    cfg = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=32)
    m = pi.Model(MODEL, n_ctx=256, n_threads=1, n_ubatch=32, kv="infllm", infllm=cfg)
    ids = [(3 * i + 1) % m.n_vocab for i in range(40)]
    m.logits(ids, last_n=1)
    m.load_state({str(files[name])!r})
    """
    r = run_case(code, model)
    assert r.get("type") == "StateError", r
    if name == "forged-payload":
        assert "ring cells" in r["message"] and "now empty" in r["message"]
    else:
        assert "unchanged" in r["message"] or name in ("empty", "random", "magic", "truncated-head", "head-json")


def test_a_refused_state_leaves_the_context_as_it_was(state_files):
    model, files = state_files
    cfg = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=32)
    with pi.Model(model, n_ctx=256, n_threads=1, n_ubatch=32, kv="infllm", infllm=cfg) as m:
        ids = [(3 * i + 1) % m.n_vocab for i in range(40)]
        want = m.logits(ids, last_n=1)
        for name in ("flipped-bit", "truncated-payload", "head-json"):
            with pytest.raises(pi.StateError):
                m.load_state(files[name])
            assert m.context_tokens == ids and m.kv_stats().n_tokens == 40
        with pytest.raises(pi.StateError, match="now empty"):
            m.load_state(files["forged-payload"])
        assert m.context_tokens == [] and m.kv_stats().n_tokens == 0
        assert np.array_equal(m.logits(ids, last_n=1), want)


#
# models with sliding-window layers: llama.cpp's SWA cache beside either cache
#

@pytest.fixture(scope="module")
def gemma3_tiny(tmp_path_factory):
    from families import write_random_family
    return str(write_random_family(tmp_path_factory.mktemp("g3") / "gemma3.gguf", "gemma3", seed=0))


@pytest.mark.parametrize("kv", ["full", "infllm"])
@pytest.mark.parametrize("swa_full", [True, False])
def test_sliding_window_models_reuse_save_and_load(gemma3_tiny, kv, swa_full, tmp_path):
    def model():
        return _model(gemma3_tiny, kv, swa_full=swa_full)

    path = tmp_path / "g3.state"
    with model() as m:
        ids, y = _ids(m, 1500, 9), _ids(m, 100, 10)
        m.logits(ids[:1200] + y, last_n=1)
        reused = m.logits(ids, last_n=300)
        assert m.kv_stats().reused_tokens == 1152 and m.kv_stats().reuse_fallbacks == 0
        m.logits(ids[:1300], last_n=1)
        m.save_state(path)
        after_save = m.logits(ids, last_n=100)
        fresh = _fresh(m, ids, 300)
        # going back 700 tokens: a window-size SWA cache (64-token window, 256 cells) has
        # reused the cells of the window at 600 by then; the full-size one still holds them
        m.logits(ids[:600] + y * 7, last_n=1)
        before = m.kv_stats().reuse_fallbacks
        m.logits(ids[:600] + [5, 6, 7], last_n=1)
        fell_back = m.kv_stats().reuse_fallbacks - before
    with model() as m:
        m.load_state(path)
        after_load = m.logits(ids, last_n=100)
    # where llama.cpp's SWA cache puts a token's cell follows its history (cells are reused
    # in the window-size cache; a loaded full-size cache is compacted), and flash attention
    # sums in cell order: the same f16 rounding differences as between its own two sizes
    for got, want, exact in ((reused, fresh, swa_full), (after_load, after_save, not swa_full)):
        if exact:
            assert np.array_equal(got, want)
        else:
            assert np.abs(got - want).max() < 1e-2
    assert fell_back == (0 if kv == "full" and swa_full else 1)
