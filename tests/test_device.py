"""The InfLLM cache on devices whose memory is not host memory.

- RPC: upstream's rpc-server in another process, on loopback (always, when it was built);
- GPU: the first GPU device of the build — Vulkan on Mesa's lavapipe, with ggml-vulkan's
  graph optimisation (node reordering) on (``make test-vulkan``: a Vulkan build,
  GGML_VK_VISIBLE_DEVICES=0), or CUDA (``benchmarks/gpu_check.sh``).

A tiny random model, small blocks and a few hundred tokens exercise evictions, misses and
window moves; stock attention on the same device is the reference.
"""

import dataclasses
import os
import socket
import threading

import numpy as np
import pytest

import pyllama_inf as pi
from pyllama_inf.testing import rpc_server

from conftest import ROOT, tiny_ids as ids

SMALL = pi.InfLLMConfig(n_local=64, n_init=16, block_size=16, topk=4)
N_TOKENS = 400


def _vulkan_device():
    for name, desc in pi.gpu_devices():
        if name.startswith("Vulkan"):
            return name, desc
    return None


@pytest.fixture(scope="module")
def tiny_model(tiny_model, tmp_path_factory):
    """conftest's tiny model (head dim 16), or with $PYLLAMA_INF_DEVICE_HEAD_DIM=D one of head
    dim D (4 heads, 2 KV heads), for a device whose flash attention lacks head dim 16."""
    head_dim = int(os.environ.get("PYLLAMA_INF_DEVICE_HEAD_DIM", "16"))
    if head_dim == 16:
        return tiny_model
    from pyllama_inf.testing import write_random_llama
    path = tmp_path_factory.mktemp("models") / f"tiny-hd{head_dim}.gguf"
    return str(write_random_llama(path, n_embd=4 * head_dim, n_head=4, n_head_kv=2, n_ff=8 * head_dim, seed=1))


@pytest.fixture(scope="module", params=["rpc", "gpu"])
def device(request):
    """Model keyword arguments that put every layer, and the cache, on the device."""
    if request.param == "rpc":
        binary = ROOT / "build" / "bin" / "ggml-rpc-server"
        if not binary.is_file():
            pytest.skip("upstream's rpc-server is not built (make upstream-tools)")
        with rpc_server(binary, threads=2) as endpoint:
            yield {"rpc_servers": endpoint, "n_gpu_layers": -1}
    else:
        if not pi.gpu_devices():
            pytest.skip("no GPU device in this build (make test-vulkan builds one that shows lavapipe)")
        yield {"n_gpu_layers": -1, "main_gpu": 0}


def logits(path, device, n_ubatch=64, tokens=N_TOKENS, **kw):
    with pi.Model(path, n_ctx=1024, n_threads=2, n_ubatch=n_ubatch, flash_attn=True, **device, **kw) as m:
        return m.logits(ids(tokens)), m.kv_stats()


def agreement(a, b):
    top1 = float((a.argmax(1) == b.argmax(1)).mean())
    nmse = float(((a - b) ** 2).mean() / (a ** 2).mean())
    return top1, nmse


@pytest.fixture(scope="module")
def stock(tiny_model, device):
    return logits(tiny_model, device)


def test_cache_lives_on_the_device(tiny_model, device, stock):
    _, s = logits(tiny_model, device, kv="infllm", infllm=SMALL)
    # one buffer, the device's (llama.cpp names a buffer type after its device)
    assert list(s.buffers) != ["CPU"] and len(s.buffers) == 1, s.buffers
    assert sum(s.buffers.values()) == s.device_bytes
    assert s.infllm.n_blocks > 10 and s.infllm.resident
    # the stock cache on the device too: the reference below ran there
    assert list(stock[1].buffers) == list(s.buffers)


def test_window_covering_context_equals_stock(tiny_model, device, stock):
    ours, s = logits(tiny_model, device, kv="infllm", infllm=pi.InfLLMConfig(n_local=1024))
    top1, nmse = agreement(stock[0], ours)
    assert top1 >= 0.99 and nmse < 1e-4, (top1, nmse)
    assert s.infllm.n_blocks == 0


@pytest.mark.parametrize("positions", ["absolute", "auto", "packed"])   # auto: inside the model's 8192 tokens
def test_blocks_covering_context_with_absolute_positions_equal_stock(tiny_model, device, stock, positions):
    cfg = dataclasses.replace(SMALL, topk=64, positions=positions)
    ours, s = logits(tiny_model, device, kv="infllm", infllm=cfg)
    top1, nmse = agreement(stock[0], ours)
    assert top1 >= 0.99 and nmse < 5e-3, (top1, nmse)
    assert s.infllm.n_blocks > 15 and s.infllm.selections > 0


@pytest.mark.parametrize("positions", ["infllm", "absolute", "auto", "packed"])
def test_offload_is_bit_identical_and_really_moves_blocks(tiny_model, device, positions):
    cfg = dataclasses.replace(SMALL, positions=positions)
    resident, sr = logits(tiny_model, device, kv="infllm", infllm=cfg)
    offload, so = logits(tiny_model, device, kv="infllm", infllm=dataclasses.replace(cfg, cache_blocks=cfg.topk))
    assert np.array_equal(resident, offload)
    r, o = sr.infllm, so.infllm
    assert r.resident and r.callbacks == r.bytes_h2d == r.bytes_d2h == r.misses == 0 and sr.host_bytes == 0
    assert not o.resident and o.n_pool == cfg.topk
    # every evicted block went to the host store once, and picks that were not resident came back
    row = pi.inspect(tiny_model).kv_bytes_per_token()
    assert o.bytes_d2h == o.n_blocks * cfg.block_size * row and so.host_bytes >= o.bytes_d2h
    assert o.misses > 0 and o.bytes_h2d >= o.misses * cfg.block_size * row // 2   # per layer: half of a row
    assert o.callbacks > 0 and 0 < o.hits + o.misses <= r.selections * cfg.topk


@pytest.fixture(scope="module")
def gemma3_tiny(tmp_path_factory):
    """A tiny random Gemma 3 (tests/families.py): sliding-window layers 0, 1, 3, 4, global 2, 5."""
    from families import write_random_family
    return str(write_random_family(tmp_path_factory.mktemp("swa") / "gemma3.gguf", "gemma3"))


def test_sliding_window_model(gemma3_tiny, device):
    """The sliding-window layers in llama.cpp's SWA cache, the global ones in the InfLLM cache,
    both on the device: with the window covering, stock's answer (same SWA cache size); with
    blocks, offload changes no bit."""
    stock, ss = logits(gemma3_tiny, device, swa_full=False)
    ours, s = logits(gemma3_tiny, device, swa_full=False, kv="infllm", infllm=pi.InfLLMConfig(n_local=1024))
    top1, nmse = agreement(stock, ours)
    assert top1 >= 0.99 and nmse < 1e-4, (top1, nmse)
    assert list(s.buffers) == list(ss.buffers) != ["CPU"], (s.buffers, ss.buffers)
    resident, sr = logits(gemma3_tiny, device, kv="infllm", infllm=SMALL)
    assert sr.infllm.n_blocks > 10 and sr.infllm.selections > 0
    offload, so = logits(gemma3_tiny, device, kv="infllm", infllm=dataclasses.replace(SMALL, cache_blocks=SMALL.topk))
    assert np.array_equal(resident, offload) and so.infllm.misses > 0


def test_decode_steps_and_window_moves(tiny_model, device, stock):
    """One token per step (the decode path) across window moves: offload equals resident, and
    a pool that holds every block moves nothing once the blocks are there."""
    cfg = SMALL
    a, sa = logits(tiny_model, device, n_ubatch=1, tokens=160, kv="infllm", infllm=cfg)
    b, sb = logits(tiny_model, device, n_ubatch=1, tokens=160, kv="infllm",
                   infllm=dataclasses.replace(cfg, cache_blocks=cfg.topk))
    assert np.array_equal(a, b)
    assert sa.infllm.bytes_h2d == 0 and sb.infllm.misses > 0
    assert sa.infllm.ubatches == 160


@pytest.mark.parametrize("cache", ["full", "infllm", "infllm-offload"])
def test_kept_context_and_saved_state_on_the_device(tiny_model, device, cache, tmp_path):
    """Prefix reuse takes back the tail of a cache that lives on the device and gives a fresh
    evaluation's logits; a state saved from the device loads back into it exactly."""
    kw = {"full": {}, "infllm": dict(kv="infllm", infllm=SMALL),
          "infllm-offload": dict(kv="infllm", infllm=dataclasses.replace(SMALL, cache_blocks=SMALL.topk))}[cache]
    path = tmp_path / "ctx.state"

    def model():
        return pi.Model(tiny_model, n_ctx=1024, n_threads=2, n_ubatch=64, flash_attn=True, **device, **kw)

    with model() as m:
        m.logits(ids(300) + ids(40), last_n=1)     # then diverges at 300: the tail is taken back
        m.save_state(path)
        got = m.logits(ids(N_TOKENS), last_n=100)
        assert m.kv_stats().reused_tokens == 256 and m.kv_stats().reuse_fallbacks == 0
        m.reset()
        want = m.logits(ids(N_TOKENS), last_n=100)
    with model() as m:
        m.load_state(path)
        assert m.context_tokens == ids(300) + ids(40)
        loaded = m.logits(ids(N_TOKENS), last_n=100)
    assert np.array_equal(got, want) and np.array_equal(loaded, want)


def test_bad_device_settings_raise(tiny_model, device):
    with pytest.raises(ValueError, match="host:port"):
        pi.Model(tiny_model, rpc_servers="localhost")
    with pytest.raises(ValueError, match="host:port"):
        pi.Model(tiny_model, rpc_servers="127.0.0.1:99999")
    with pytest.raises(TypeError, match="rpc_servers"):
        pi.Model(tiny_model, rpc_servers=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="main_gpu"):
        pi.Model(tiny_model, **{**device, "main_gpu": 7})
    # nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="could not reach"):
        pi.Model(tiny_model, rpc_servers=f"127.0.0.1:{free}", n_gpu_layers=-1)
    # something that is not an RPC server listens there
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def answer_garbage():
            conn, _ = srv.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        with pytest.raises(ConnectionError, match="RPC server"):
            pi.Model(tiny_model, rpc_servers=f"127.0.0.1:{srv.getsockname()[1]}", n_gpu_layers=-1)
        t.join(5)


@pytest.mark.skipif(os.environ.get("PYLLAMA_INF_DEVICE_TESTS") != "vulkan", reason="make test-vulkan only")
def test_vulkan_reorders_nodes_and_results_hold(tiny_model):
    """The Vulkan run must have graph optimisation on: the point is that node reordering
    cannot break the cache (ordering is by explicit edges)."""
    assert "GGML_VK_DISABLE_GRAPH_OPTIMIZE" not in os.environ
    assert _vulkan_device() is not None, "make test-vulkan expects lavapipe (GGML_VK_VISIBLE_DEVICES=0)"
