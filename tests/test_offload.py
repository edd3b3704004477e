"""kv="infllm" with a device byte budget: host block store, device block cache, transfers."""

import dataclasses
import math
import re

import pytest

import pyllama_inf as pi
from pyllama_inf import passkey

SMALL = pi.InfLLMConfig(n_local=256, n_init=64, block_size=64, topk=4)


def tiny_ids(n):
    """n token ids inside the synthetic model's vocabulary."""
    return [2 + (i * 7) % 256 for i in range(n)]


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    with pi.Model(smollm2, n_ctx=2048, n_threads=1) as m:
        task = passkey.make_task(1500, 0.4, 11, lambda t: len(m.tokenize(t)))
        return m.tokenize(task.prompt)


def run(path, ids, cfg=SMALL, **kw):
    with pi.Model(path, n_ctx=2048, n_threads=2, n_ubatch=128, kv="infllm", infllm=cfg, **kw) as m:
        return m.logits(ids), m.kv_stats()


def test_budget_below_the_working_set_is_refused_with_the_minimum(tiny_model):
    with pytest.raises(ValueError, match=r"kv_budget of 1000 bytes is below the minimum of \d+ bytes") as e:
        pi.Model(tiny_model, n_ctx=1024, kv="infllm", kv_budget=1000)
    minimum = int(re.search(r"minimum of (\d+) bytes", str(e.value)).group(1))
    with pi.Model(tiny_model, n_ctx=1024, kv="infllm", kv_budget=minimum) as m:
        s = m.kv_stats()
    assert s.device_bytes <= minimum and s.infllm.n_pool == 0
    for bad in (0, "0MiB"):
        with pytest.raises(ValueError, match="more than 0"):
            pi.Model(tiny_model, n_ctx=1024, kv="infllm", kv_budget=bad)


@pytest.mark.parametrize("n_ctx", [1024, 4096, 16384])
def test_device_bytes_stay_within_the_budget(tiny_model, n_ctx):
    cfg = pi.InfLLMConfig(n_local=128, n_init=16, block_size=16, topk=4)
    budget = 4 << 20
    with pi.Model(tiny_model, n_ctx=n_ctx, n_threads=1, kv="infllm", infllm=cfg, kv_budget=budget) as m:
        m.logits(tiny_ids(900), last_n=1)
        s = m.kv_stats()
    inf = s.infllm
    assert s.budget_bytes == budget == inf.budget_bytes
    assert s.device_bytes == inf.device_bytes <= budget
    # the leftover bought block-cache slots (up to every block beyond the working set)
    assert 0 < inf.n_pool <= inf.n_blocks_max - 4
    assert inf.pool_bytes > 0 and inf.device_bytes >= inf.work_bytes + inf.pool_bytes + inf.repr_bytes


@pytest.mark.parametrize("positions", ["infllm", "absolute"])
def test_offload_does_not_change_results(smollm2, prompt_ids, positions):
    """No block cache (every miss fetched from the host store) and a cache holding every
    block give bit-identical logits; the larger cache turns host fetches into device hits.
    (With positions="infllm" the memory position moves with every prefill chunk, so prefill
    re-fetches everything either way; "absolute" keeps blocks valid across chunks.)"""
    cfg = dataclasses.replace(SMALL, positions=positions)
    a, sa = run(smollm2, prompt_ids, dataclasses.replace(cfg, cache_blocks=0))
    b, sb = run(smollm2, prompt_ids, cfg, kv_budget="1GiB")
    assert (a == b).all()
    ia, ib = sa.infllm, sb.infllm
    assert ia.n_pool == 0 and ib.n_pool == ib.n_blocks_max - 4
    assert ia.misses > 0 and ia.bytes_h2d > 0 and ia.pool_hits == 0
    assert ia.hits + ia.misses == ib.hits + ib.misses   # the same selections
    if positions == "absolute":
        assert ib.pool_hits > 0 and ib.misses < ia.misses and ib.bytes_h2d < ia.bytes_h2d


def test_greedy_output_is_the_same_under_offload(smollm2):
    prompt = passkey.make_task(1200, 0.5, 3, lambda t: len(t) // 4).prompt
    out, stats = [], []
    for cfg, budget in ((dataclasses.replace(SMALL, cache_blocks=0), None), (SMALL, "1GiB")):
        with pi.Model(smollm2, n_ctx=2048, n_threads=2, kv="infllm", infllm=cfg, kv_budget=budget) as m:
            out.append(m.generate(prompt, max_tokens=48, temperature=0).text)
            stats.append(m.kv_stats().infllm)
    assert out[0] == out[1] and out[0].strip()
    # while decoding, blocks dropped from the working set come back from the device cache
    assert stats[1].pool_hits > 0 and stats[1].misses < stats[0].misses


def test_host_store_grows_with_the_evicted_tokens(tiny_model):
    cfg = pi.InfLLMConfig(n_local=128, n_init=16, block_size=16, topk=4)
    seen = []
    with pi.Model(tiny_model, n_ctx=4096, n_threads=1, kv="infllm", infllm=cfg) as m:
        for n in (600, 1200, 2200):
            m.logits(tiny_ids(n), last_n=1)
            seen.append(m.kv_stats().infllm)
    # bytes of one token's K and V over all layers, from the working-set layout
    row = seen[0].work_bytes // (4 * 16 + 16 + seen[0].n_ring)
    d2h_before = 0                                           # counters run since load
    for inf in seen:
        stored = 16 + inf.n_blocks * 16                      # sinks + evicted blocks, in tokens
        assert inf.bytes_d2h - d2h_before == stored * row    # each evicted token read once
        d2h_before = inf.bytes_d2h
        chunks = math.ceil(inf.n_blocks / 32)                # the store grows 32 blocks at a time
        assert inf.host_bytes >= (16 + chunks * 32 * 16) * row
        assert inf.host_bytes < (16 + chunks * 32 * 16) * row + 64 * 1024
    assert seen[0].host_bytes < seen[1].host_bytes < seen[2].host_bytes


def test_cache_blocks_sizes_the_block_cache_without_a_budget(tiny_model):
    cfg = pi.InfLLMConfig(n_local=128, n_init=16, block_size=16, topk=4)
    for blocks, want in ((None, 16), (3, 3), (0, 0), (10 ** 6, (1024 - 16 + 15) // 16 - 4)):
        with pi.Model(tiny_model, n_ctx=1024, n_threads=1, kv="infllm",
                      infllm=dataclasses.replace(cfg, cache_blocks=blocks)) as m:
            assert m.kv_stats().infllm.n_pool == want, blocks
    with pytest.raises(ValueError, match="give one of them"):
        pi.Model(tiny_model, n_ctx=1024, kv="infllm", infllm=dataclasses.replace(cfg, cache_blocks=2),
                 kv_budget="64MiB")
    with pytest.raises(ValueError, match="cache_blocks"):
        pi.InfLLMConfig(cache_blocks=-1)
    with pytest.raises(TypeError, match="cache_blocks"):
        pi.InfLLMConfig(cache_blocks=True)
