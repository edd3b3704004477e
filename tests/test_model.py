"""Model: greedy equality with upstream, streaming, logits, tokens, stats, errors, lifetime."""

import logging
import re

import numpy as np
import pytest

import pyllama_inf as pi
from conftest import run_upstream_completion

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smol_fa(smollm2):
    with pi.Model(smollm2, n_ctx=512, n_threads=2, flash_attn=True) as m:
        yield m


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa-on", "fa-off"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["plain", "chat"])
def test_greedy_equals_upstream_completion(smollm2, prompt, flash_attn):
    n = 40
    expected = run_upstream_completion(smollm2, prompt, n=n, flash_attn=flash_attn)
    with pi.Model(smollm2, n_ctx=512, n_threads=2, flash_attn=flash_attn) as m:
        r = m.generate(prompt, max_tokens=n, temperature=0)
    if r.finish_reason == "stop":   # upstream marks the end-of-generation token
        expected = expected.replace(" [end of text]", "")
    assert r.text.strip("\n") == expected.strip("\n")
    assert len(r.text) > 10


@pytest.mark.parametrize("fa, said", [(True, "enabled"), (False, "disabled"), (None, "auto")])
def test_flash_attn_setting_reaches_llama(tiny_model, caplog, fa, said):
    # what llama.cpp's context reports it was given (its log line at creation)
    with caplog.at_level(logging.DEBUG, logger="pyllama_inf"):
        with pi.Model(tiny_model, n_ctx=256, n_threads=1, flash_attn=fa):
            pass
    lines = [r.getMessage() for r in caplog.records if "flash_attn  " in r.getMessage()]
    assert len(lines) == 1 and re.search(r"flash_attn\s+= " + said + r"$", lines[0].strip()), lines


def test_stream_equals_non_stream(smol_fa):
    prompt = PROMPTS[1]
    full = smol_fa.generate(prompt, max_tokens=32, temperature=0)
    stream = smol_fa.generate(prompt, max_tokens=32, temperature=0, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert len(pieces) >= len(full.tokens) // 2  # about one piece per token
    assert stream.result.tokens == full.tokens


def test_stream_can_be_abandoned_and_model_stays_usable(smol_fa):
    stream = smol_fa.generate(PROMPTS[0], max_tokens=64, temperature=0, stream=True)
    for _ in stream:
        break
    stream.close()
    r = smol_fa.generate(PROMPTS[0], max_tokens=4, temperature=0)
    assert len(r.tokens) == 4


def test_stop_string_cuts_text(smol_fa):
    r = smol_fa.generate(PROMPTS[0], max_tokens=40, temperature=0)
    assert "\n\n" in r.text
    cut = smol_fa.generate(PROMPTS[0], max_tokens=40, temperature=0, stop=["\n\n"])
    assert cut.finish_reason == "stop"
    assert cut.text == r.text[: r.text.index("\n\n")]
    assert len(cut.tokens) < len(r.tokens)


def test_sampling_is_reproducible_with_seed(smol_fa):
    a = smol_fa.generate(PROMPTS[0], max_tokens=16, temperature=1.0, seed=123)
    b = smol_fa.generate(PROMPTS[0], max_tokens=16, temperature=1.0, seed=123)
    assert a.tokens == b.tokens
    others = {tuple(smol_fa.generate(PROMPTS[0], max_tokens=16, temperature=1.0, seed=s).tokens)
              for s in range(4)}
    assert len(others) > 1


def test_result_fields(smol_fa):
    r = smol_fa.generate(PROMPTS[0], max_tokens=8, temperature=0)
    assert r.finish_reason == "length" and len(r.tokens) == 8
    assert r.n_prompt_tokens == len(smol_fa.tokenize(PROMPTS[0]))
    t = r.timings
    assert t.prompt_tokens == r.n_prompt_tokens and t.decode_tokens == 7
    assert t.prefill_s > 0 and t.decode_s > 0 and t.prefill_tok_s > 0 and t.decode_tok_s > 0
    assert smol_fa.detokenize(r.tokens) == r.text


def test_max_tokens_zero_evaluates_prompt_only(smol_fa):
    r = smol_fa.generate(PROMPTS[0], max_tokens=0, temperature=0)
    assert r.tokens == [] and r.text == "" and r.finish_reason == "length"
    assert smol_fa.kv_stats().n_tokens == r.n_prompt_tokens


def test_logits_shape_dtype_and_greedy_agreement(smol_fa):
    r = smol_fa.generate(PROMPTS[1], max_tokens=12, temperature=0)
    prompt = smol_fa.tokenize(PROMPTS[1])
    seq = prompt + r.tokens
    lg = smol_fa.logits(seq[:-1], last_n=len(r.tokens))
    assert lg.dtype == np.float32 and lg.shape == (len(r.tokens), smol_fa.n_vocab)
    # teacher-forced logits pick the same tokens as the token-by-token generation loop
    assert lg.argmax(axis=1).tolist() == r.tokens
    assert smol_fa.logits(seq).shape == (len(seq), smol_fa.n_vocab)


@pytest.mark.parametrize("model", ["tiny_model", "smollm2"])
def test_logits_chunked_equal_token_by_token(model, request):
    path = request.getfixturevalue(model)
    with pi.Model(path, n_ctx=256, n_threads=2, n_ubatch=64, flash_attn=False) as m:
        ids = m.tokenize("Once upon a time, in a land far away, there lived a small dragon " * 3)[:150]
        chunked = m.logits(ids)
        one_by_one = m._s().eval(ids, last_n=len(ids), chunk=1)
    assert chunked.shape == one_by_one.shape == (len(ids), m_vocab(path))
    assert np.array_equal(chunked.argmax(1), one_by_one.argmax(1))
    err = np.mean((chunked - one_by_one) ** 2) / np.mean(one_by_one ** 2)
    assert err < 5e-3, err  # Q4_1 batched and single-token kernels round activations differently


def m_vocab(path):
    return pi.inspect(path).n_vocab


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café – 東京 🚀", "  leading spaces\nand\ttabs"])
def test_tokenize_detokenize_round_trip(smol_fa, text):
    ids = smol_fa.tokenize(text)
    assert all(isinstance(i, int) for i in ids)
    assert smol_fa.detokenize(ids) == text


def test_special_tokens_are_parsed(smol_fa):
    assert len(smol_fa.tokenize("<|im_start|>", add_special=False)) == 1
    assert len(smol_fa.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1


def test_kv_stats_full_cache(smollm2):
    info = pi.inspect(smollm2)
    with pi.Model(smollm2, n_ctx=1024, n_threads=2) as m:
        s0 = m.kv_stats()
        r = m.generate(PROMPTS[0], max_tokens=5, temperature=0)
        s1 = m.kv_stats()
    assert s0.kv == "full" and s0.n_tokens == 0 and s0.budget_bytes is None and s0.host_bytes == 0
    assert s0.device_bytes == info.kv_bytes_per_token() * 1024 == s1.device_bytes
    assert s1.n_tokens == r.n_prompt_tokens + len(r.tokens) - 1  # the last sampled token is not evaluated


def test_close_twice_and_use_after_close(tiny_model):
    m = pi.Model(tiny_model, n_ctx=64, n_threads=1)
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(pi.ModelClosedError):
        m.generate("hi")
    with pytest.raises(pi.ModelClosedError):
        m.kv_stats()
    with pytest.raises(pi.ModelClosedError):
        m.tokenize("hi")


def test_context_manager_closes(tiny_model):
    with pi.Model(tiny_model, n_ctx=64, n_threads=1) as m:
        assert not m.closed
    assert m.closed


@pytest.mark.parametrize("kwargs, exc", [
    (dict(n_ctx=0), ValueError),
    (dict(n_ctx=-5), ValueError),
    (dict(n_ctx="big"), TypeError),
    (dict(n_batch=0), ValueError),
    (dict(n_ubatch=4096, n_batch=2048), ValueError),
    (dict(n_threads=0), ValueError),
    (dict(kv="paged"), ValueError),
    (dict(kv_budget="1GiB"), ValueError),
    (dict(flash_attn="yes"), TypeError),
    (dict(seed=-1), ValueError),
])
def test_bad_model_arguments(tiny_model, kwargs, exc):
    with pytest.raises(exc):
        pi.Model(tiny_model, **kwargs)


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        pi.Model(tmp_path / "nope.gguf")
    with pytest.raises(IsADirectoryError):
        pi.Model(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ValueError, match="GGUF"):
        pi.Model(junk)


def test_prompt_longer_than_context(tiny_model):
    with pi.Model(tiny_model, n_ctx=32, n_threads=1) as m:
        with pytest.raises(pi.ContextFullError, match="n_ctx"):
            m.generate("word " * (m.n_ctx + 10), max_tokens=1)
        with pytest.raises(pi.ContextFullError):
            m.logits(list(range(5, 5 + m.n_ctx + 1)))
        assert len(m.generate("hi", max_tokens=2, temperature=0).tokens) <= 2  # still usable


def test_generation_stops_when_context_is_full(tiny_model):
    # a prompt one cell short of a full context: the first sampled token fills the last cell,
    # the second is sampled from it and nothing more fits (max_tokens is far from reached)
    with pi.Model(tiny_model, n_ctx=32, n_threads=1) as m:
        prompt = m.detokenize(m.tokenize("hello world " * m.n_ctx)[1:m.n_ctx - 1])   # + BOS = n_ctx - 1 tokens
        r = m.generate(prompt, max_tokens=10 * m.n_ctx, temperature=0)
        assert r.n_prompt_tokens == m.n_ctx - 1
        assert r.finish_reason == "length" and len(r.tokens) == 2


@pytest.mark.parametrize("kwargs, exc", [
    (dict(max_tokens=-1), ValueError),
    (dict(temperature=-0.1), ValueError),
    (dict(top_p=0.0), ValueError),
    (dict(top_p=1.5), ValueError),
    (dict(top_k=-1), ValueError),
    (dict(stop=[""]), ValueError),
    (dict(stop=[1]), TypeError),
    (dict(max_tokens="3"), TypeError),
])
def test_bad_generate_arguments(tiny_model, kwargs, exc):
    with pi.Model(tiny_model, n_ctx=64, n_threads=1) as m:
        with pytest.raises(exc):
            m.generate("hi", **kwargs)


def test_bad_prompts_and_tokens(tiny_model):
    with pi.Model(tiny_model, n_ctx=64, n_threads=1) as m:
        with pytest.raises(TypeError):
            m.generate(b"bytes")
        with pytest.raises(ValueError, match="Unicode"):
            m.generate("lone \ud800 surrogate")
        with pytest.raises(ValueError, match="vocabulary"):
            m.logits([1, 2, m.n_vocab])
        with pytest.raises(ValueError, match="vocabulary"):
            m.logits([-1])
        with pytest.raises(ValueError):
            m.logits([])
        with pytest.raises(TypeError):
            m.logits([1.5])
        with pytest.raises(ValueError):
            m.logits([1, 2, 3], last_n=4)
        with pytest.raises(ValueError, match="vocabulary"):
            m.detokenize([10**9])
