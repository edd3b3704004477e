"""pyllama_inf.gguf_info: metadata, KV cost per token, and rejecting broken files."""

import os
import pathlib

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllama_inf.gguf_info import ModelInfo, check_gguf, inspect
from pyllama_inf.testing import TINY_VOCAB_SIZE, smollm2_path, write_random_llama

SHAPES = dict(n_layer=3, n_embd=96, n_head=6, n_head_kv=2, n_ff=160, n_ctx_train=4096)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return write_random_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", **SHAPES)


@pytest.fixture(scope="module")
def tiny_bytes(tiny) -> bytes:
    return tiny.read_bytes()


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def test_inspect_reports_the_shapes_written(tiny):
    info = inspect(tiny)
    assert isinstance(info, ModelInfo)
    assert info.path == str(tiny)
    assert info.architecture == "llama"
    assert info.name == "random-llama"
    assert (info.n_layer, info.n_head, info.n_head_kv) == (3, 6, 2)
    assert (info.head_dim, info.head_dim_v, info.n_embd) == (16, 16, 96)
    assert info.n_ctx_train == 4096
    assert info.n_vocab == TINY_VOCAB_SIZE
    assert info.rope_scaling_type is None and info.sliding_window is None
    assert (info.file_type, info.quantization) == (0, "F32")
    assert info.file_bytes == tiny.stat().st_size == info.data_end
    n_embd, n_ff, n_kv = 96, 160, 2 * 16
    per_layer = 2 * n_embd + 2 * n_embd * n_embd + 2 * n_embd * n_kv + 3 * n_embd * n_ff
    assert info.n_params == 2 * TINY_VOCAB_SIZE * n_embd + 3 * per_layer + n_embd
    assert info.n_tensors == 2 + 3 * 9 + 1


def test_model_info_is_frozen(tiny):
    with pytest.raises(AttributeError):
        inspect(tiny).n_layer = 1


def test_kv_bytes_per_token_formula(tiny):
    info = inspect(tiny)
    f16 = info.n_layer * info.n_head_kv * (info.head_dim + info.head_dim_v) * 2
    assert info.kv_bytes_per_token() == f16 == 3 * 2 * 32 * 2
    assert info.kv_bytes_per_token("f32", "f32") == 2 * f16
    assert info.kv_bytes_per_token("f16", "F32") == 3 * (64 + 128)
    # q8_0: blocks of 32 values in 34 bytes; a layer's K row is 2 heads x 16 = 32 values
    assert info.kv_bytes_per_token("q8_0", "q8_0") == 3 * 2 * 34


def test_kv_bytes_per_token_rejects_bad_types(tmp_path):
    info = inspect(write_random_llama(tmp_path / "m.gguf", n_embd=64, n_head=4, n_head_kv=1))
    with pytest.raises(ValueError, match="unknown ggml type 'f12'"):
        info.kv_bytes_per_token("f12")
    with pytest.raises(ValueError, match="type_v"):
        info.kv_bytes_per_token("f16", "q8_0")  # a 16-value row is not whole q8_0 blocks


def test_inspect_reads_optional_keys(tmp_path):
    path = write_random_llama(tmp_path / "m.gguf", dtype="f16", **{
        "general.name": "named",
        "llama.attention.key_length": 24,
        "llama.attention.value_length": 8,
        "llama.attention.head_count_kv": None,
        "llama.attention.sliding_window": 512,
        "llama.rope.scaling.type": "yarn",
    })
    info = inspect(path)
    assert info.name == "named"
    assert (info.head_dim, info.head_dim_v, info.n_head_kv) == (24, 8, info.n_head)
    assert info.sliding_window == 512
    assert info.rope_scaling_type == "yarn"
    assert info.quantization == "F16"
    assert info.kv_bytes_per_token() == 2 * 4 * (24 + 8) * 2


def test_inspect_without_name_and_per_layer_heads(tmp_path):
    path = write_random_llama(tmp_path / "m.gguf", **{
        "general.name": None, "llama.attention.head_count_kv": [2, 1]})
    info = inspect(path)
    assert info.name is None
    assert info.n_head_kv == 2


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count",
                                 "llama.embedding_length", "llama.context_length",
                                 "tokenizer.ggml.tokens"])
def test_missing_required_key(tmp_path, key):
    path = write_random_llama(tmp_path / "m.gguf", **{key: None})
    with pytest.raises(ValueError, match=f"'{key}'"):
        inspect(path)


def test_wrongly_typed_key(tmp_path):
    path = write_random_llama(tmp_path / "m.gguf", **{"llama.block_count": "two"})
    with pytest.raises(ValueError, match="llama.block_count"):
        inspect(path)


def test_inspect_smollm2():
    info = inspect(smollm2_path())
    assert info.architecture == "llama"
    assert (info.n_layer, info.n_head, info.n_head_kv, info.head_dim) == (30, 9, 3, 64)
    assert (info.n_embd, info.n_ctx_train, info.n_vocab) == (576, 8192, 49152)
    assert info.quantization == "Q4_1"
    assert info.kv_bytes_per_token() == 30 * 3 * 128 * 2 == 23040
    assert 130e6 < info.n_params < 140e6
    assert check_gguf(smollm2_path()) == info


#
# errors
#

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        inspect(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        check_gguf(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        inspect(tmp_path)
    with pytest.raises(IsADirectoryError):
        check_gguf(tmp_path)


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b"GG", id="short"),
    pytest.param(bytes(range(256)) * 64, id="bytes"),
    pytest.param(os.urandom(4096), id="random"),
    pytest.param(b"GGUF", id="magic-only"),
    pytest.param(b"GGUF" + (99).to_bytes(4, "little") + bytes(16), id="bad-version"),
])
def test_not_a_gguf_file(tmp_path, content):
    path = _write(tmp_path / "bad.gguf", content)
    for fn in (inspect, check_gguf):
        with pytest.raises(ValueError, match="not a valid GGUF file") as e:
            fn(path)
        assert str(path) in str(e.value)


def test_wrong_magic(tmp_path, tiny_bytes):
    path = _write(tmp_path / "m.gguf", b"GGML" + tiny_bytes[4:])
    with pytest.raises(ValueError, match=r"not a valid GGUF file \(bad magic b'GGML'\)"):
        inspect(path)


def _truncation_points(path: pathlib.Path) -> dict:
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first, last = reader.tensors[0], reader.tensors[-1]
    return {
        "header": 13,
        "metadata-key": reader.fields["llama.block_count"].offset + 5,
        "metadata-array": tokens.offset + 300,
        "tensor-info": first.field.offset + 7,
        "data-start": reader.data_offset,
        "tensor-data": first.data_offset + first.n_bytes // 2,
        "last-byte": last.data_offset + last.n_bytes - 1,
    }


@pytest.mark.parametrize("where", ["header", "metadata-key", "metadata-array", "tensor-info",
                                   "data-start", "tensor-data", "last-byte"])
def test_truncated(tmp_path, tiny, tiny_bytes, where):
    cut = _truncation_points(tiny)[where]
    assert 0 < cut < len(tiny_bytes)
    path = _write(tmp_path / "cut.gguf", tiny_bytes[:cut])
    for fn in (inspect, check_gguf):
        with pytest.raises(ValueError, match="not a valid GGUF file.*truncated") as e:
            fn(path)
        assert str(path) in str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_prefix_is_rejected(tmp_path, tiny_bytes, data):
    cut = data.draw(st.integers(0, len(tiny_bytes) - 1))
    path = _write(tmp_path / "cut.gguf", tiny_bytes[:cut])
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        check_gguf(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_metadata_gives_info_or_value_error(tmp_path, tiny, tiny_bytes, data):
    """Overwrite a few bytes of the header, metadata or tensor infos with garbage: the
    result is a ModelInfo or a ValueError, never another exception or a hang."""
    end = gguf.GGUFReader(tiny).data_offset
    corrupt = bytearray(tiny_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(4, end - 1))
        patch = data.draw(st.binary(min_size=1, max_size=8))
        corrupt[at:at + len(patch)] = patch
    path = _write(tmp_path / "corrupt.gguf", bytes(corrupt))
    try:
        info = check_gguf(path)
    except ValueError:
        return
    assert info.file_bytes == len(corrupt)
