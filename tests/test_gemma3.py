"""kv="infllm" on a real sliding-window model: Gemma 3 270M (Q4_K_M, 32K trained context).

Its 18 layers alternate five sliding-window layers (512 tokens) with one global layer. The
sliding-window layers keep llama.cpp's own SWA cache, the global ones the InfLLM cache, so:

- with a window that covers the prompt, the logits equal the stock cache's with the same
  SWA cache size (swa_full), bit for bit in practice;
- the InfLLM half holds the global layers only (device bytes from the GGUF's metadata);
- blocks fetched from the host store (offload) give the resident cache's answer;
- a passkey outside the local window is found through the memory blocks.
"""

import numpy as np
import pytest

import pyllama_inf as pi
from pyllama_inf import passkey

N_LAYER, SWA_PERIOD, HEAD_DIM, N_KV_HEAD = 18, 6, 256, 1   # the GGUF's gemma3.* keys, checked below
N_GLOBAL = N_LAYER // SWA_PERIOD                            # layers 5, 11, 17
# 128-token ubatches: the window-size SWA cache holds 512 + 128 -> 768 cells and starts
# reusing cells before the end of the prompt
UBATCH, N_PROMPT, LAST_N = 128, 1200, 432


@pytest.fixture(scope="module")
def gemma3():
    from pyllama_inf.testing import gemma3_270m_path
    path = str(gemma3_270m_path())
    info = pi.inspect(path)
    assert (info.architecture, info.n_layer, info.head_dim, info.n_head_kv, info.sliding_window) == \
        ("gemma3", N_LAYER, HEAD_DIM, N_KV_HEAD, 512)
    return path


@pytest.fixture(scope="module")
def prompt(gemma3):
    with pi.Model(gemma3, n_ctx=512, n_threads=2) as m:
        ids = m.tokenize(passkey.make_task(N_PROMPT + 200, 0.5, seed=5, count_tokens=lambda t: len(m.tokenize(t))).prompt)
    return ids[:N_PROMPT]


def _logits(path, ids, **kw):
    with pi.Model(path, n_ctx=2048, n_threads=2, n_ubatch=UBATCH, flash_attn=True, **kw) as m:
        out = m.logits(ids, last_n=LAST_N)
        stats = m.kv_stats().infllm
    return out, stats


def _compare(a, b):
    top1 = float((a.argmax(1) == b.argmax(1)).mean())
    nmse = float(((a - b) ** 2).mean() / (b ** 2).mean())
    return top1, nmse


@pytest.mark.parametrize("swa_full", [False, True])
def test_window_covering_equals_stock(gemma3, prompt, swa_full):
    stock, _ = _logits(gemma3, prompt, swa_full=swa_full)
    ours, stats = _logits(gemma3, prompt, swa_full=swa_full, kv="infllm", infllm=pi.InfLLMConfig(n_local=2000))
    assert stats.n_blocks == 0 and np.isfinite(ours).all()
    top1, nmse = _compare(ours, stock)
    assert top1 >= 0.99 and nmse < 1e-6, (top1, nmse)


def test_infllm_holds_the_global_layers_only(gemma3):
    cfg = pi.InfLLMConfig(n_local=256, n_init=64, block_size=64, topk=4)
    with pi.Model(gemma3, n_ctx=2048, n_threads=2, kv="infllm", infllm=cfg) as m:
        s = m.kv_stats().infllm
    # every block of 64 tokens of K and V, f16, for the global layers only
    assert s.pool_bytes == s.n_pool * 64 * N_GLOBAL * 2 * (N_KV_HEAD * HEAD_DIM * 2)
    assert s.repr_bytes == s.n_blocks_max * N_GLOBAL * (N_KV_HEAD * HEAD_DIM * 4)


def test_offload_equals_resident(gemma3, prompt):
    cfg = dict(n_local=256, n_init=64, block_size=64, topk=4)
    resident, rs = _logits(gemma3, prompt, kv="infllm", infllm=pi.InfLLMConfig(**cfg))
    offload, os_ = _logits(gemma3, prompt, kv="infllm", infllm=pi.InfLLMConfig(cache_blocks=4, **cfg))
    assert rs.resident and not os_.resident and os_.misses > 0
    # one selection per global layer and ubatch with memory
    assert rs.selections == os_.selections > 0 and rs.selections % N_GLOBAL == 0
    top1, nmse = _compare(offload, resident)
    assert top1 == 1.0 and nmse < 1e-10, (top1, nmse)


def test_passkey_from_memory_blocks(gemma3):
    cfg = pi.InfLLMConfig(n_local=512)
    with pi.Model(gemma3, n_ctx=2300, n_threads=2, kv="infllm", infllm=cfg) as m:
        results = passkey.run(m, 2000, [0.1, 0.4], trials=1)
        assert m.kv_stats().infllm.n_blocks > 0
    # the needle is more than 1000 tokens before the end: outside the window
    assert all(r.correct for r in results), [r.output for r in results]
