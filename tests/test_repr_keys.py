"""InfLLMConfig.repr_keys: what a block's representative key holds, read back from a saved state.

The state file holds, per layer, the representative keys (f32) and the stored blocks' keys
(f16, at position 0) — the layout written by the InfLLM cache's state_write, documented in
csrc/engine/llama-kv-cache-infllm.cpp. With repr_keys = 0 a representative is the sum of
its block's keys; with r it is the sum of r of them.
"""

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest

import pyllama_inf as pi

from conftest import tiny_ids as ids

BS, N_INIT, N_LOCAL = 16, 16, 64
HEADER_U32 = 15   # the cache's state header (magic, version, layers, ... V row bytes)


def read_state(path, info):
    """(repr [n_layer][ns, row_k] f32, keys [n_layer][ns, BS, row_k] f32) of a saved InfLLM state."""
    data = Path(path).read_bytes()
    assert data[:8] == b"PYLINFST"
    head_len = struct.unpack_from("<Q", data, 16)[0]
    off = 24 + head_len
    header = struct.unpack_from(f"<{HEADER_U32}I", data, off)
    off += 4 * HEADER_U32
    n_tokens, ns, sinks = struct.unpack_from("<3I", data, off)
    off += 12
    n_layer, n_ring, k_row, v_row = header[2], header[4], header[13], header[14]
    assert n_layer == info.n_layer
    row_k = info.n_head_kv * info.head_dim
    assert k_row == 2 * row_k   # f16 keys
    n_used = min(n_tokens, n_ring)
    reprs, keys = [], []
    for _ in range(n_layer):
        off += n_used * (k_row + v_row)          # ring cells
        if sinks:
            off += N_INIT * (k_row + v_row)      # sinks (f16 here)
        reprs.append(np.frombuffer(data, np.float32, ns * row_k, off).reshape(ns, row_k))
        off += ns * row_k * 4
        keys.append(np.frombuffer(data, np.float16, ns * BS * row_k, off).reshape(ns, BS, row_k).astype(np.float32))
        off += ns * BS * (k_row + v_row)         # K then V of the stored blocks
    return reprs, keys


@pytest.fixture(scope="module")
def states(tiny_model, tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("repr")
    for r in (0, 1, 2, BS):
        cfg = pi.InfLLMConfig(block_size=BS, n_init=N_INIT, n_local=N_LOCAL, topk=2, rewind=0, repr_keys=r)
        with pi.Model(tiny_model, n_ctx=512, n_threads=2, n_ubatch=64, kv="infllm", infllm=cfg) as m:
            m.logits(ids(300), last_n=1)
            assert m.kv_stats().infllm.n_blocks >= 8
            m.save_state(d / f"r{r}.state")
            out[r] = read_state(d / f"r{r}.state", pi.inspect(tiny_model))
    return out


def test_default_is_the_sum_of_the_block_keys(states):
    reprs, keys = states[0]
    for rep, k in zip(reprs, keys):
        np.testing.assert_allclose(rep, k.sum(axis=1), rtol=0, atol=2e-2 * np.abs(k).max() * BS ** 0.5)


def test_one_key_is_one_of_the_block_keys(states):
    reprs, keys = states[1]
    for rep, k in zip(reprs, keys):
        for b in range(len(rep)):
            err = np.abs(k[b] - rep[b]).max(axis=1)        # against each of the block's keys
            assert err.min() < 1e-2 * np.abs(k[b]).max(), (b, err.min())


def test_two_keys_are_the_sum_of_two_block_keys(states):
    reprs, keys = states[2]
    for rep, k in zip(reprs[:1], keys[:1]):
        for b in range(len(rep)):
            best = min(np.abs(k[b, i] + k[b, j] - rep[b]).max() for i, j in itertools.combinations(range(BS), 2))
            assert best < 2e-2 * np.abs(k[b]).max(), b


def test_all_keys_is_the_default(states):
    for a, b in zip(states[0][0], states[BS][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_bad_values_are_refused(tiny_model):
    with pytest.raises(ValueError, match="repr_keys"):
        pi.InfLLMConfig(block_size=16, repr_keys=17)
    with pytest.raises(ValueError, match="repr_keys"):
        pi.InfLLMConfig(repr_keys=-1)
    # past the Python check, llama.cpp's side refuses it too
    from pyllama_inf import _core
    p = _core.SessionParams()
    p.path, p.n_ctx, p.infllm, p.block_size, p.n_local, p.repr_keys = tiny_model, 256, True, 16, 64, 17
    with pytest.raises(pi.PyllamaError, match="repr_keys"):
        _core.Session(p)


def test_a_state_needs_the_same_repr_keys(tiny_model, tmp_path):
    cfg = dict(block_size=BS, n_init=N_INIT, n_local=N_LOCAL, topk=2, rewind=0)
    with pi.Model(tiny_model, n_ctx=512, n_threads=2, kv="infllm", infllm=pi.InfLLMConfig(**cfg, repr_keys=2)) as m:
        m.logits(ids(190), last_n=1)
        m.save_state(tmp_path / "s")
    with pi.Model(tiny_model, n_ctx=512, n_threads=2, kv="infllm", infllm=pi.InfLLMConfig(**cfg)) as m:
        with pytest.raises(pi.StateError, match="repr_keys"):
            m.load_state(tmp_path / "s")
