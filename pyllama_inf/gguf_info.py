"""Read a GGUF file's metadata without loading its weights.

:func:`inspect` describes a model (shapes, context, quantization, KV-cache cost per
token) from the GGUF header alone; the ``gguf`` package memory-maps the file, and no
tensor data is read. :func:`check_gguf` runs the same parse and also makes sure the
tensor data is all there, so that a broken file fails here with a clear ``ValueError``
instead of inside llama.cpp.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import stat
import time
from typing import Any, Optional, Union

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"
_SETTLE_NS = 2_000_000_000  # files modified more recently than this are never cached
_REQUIRED = object()

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a GGUF file says about its model.

    Attributes:
        path: the file, as given.
        architecture: ``general.architecture``, e.g. ``"llama"``.
        name: ``general.name``, or None.
        n_layer: number of transformer blocks (``{arch}.block_count``).
        n_head: attention (query) heads (``{arch}.attention.head_count``).
        n_head_kv: key/value heads (``{arch}.attention.head_count_kv``; n_head if absent).
            Where a model stores one value per layer, this is the largest.
        head_dim: size of one key head (``{arch}.attention.key_length``, else
            n_embd // n_head).
        head_dim_v: size of one value head (``{arch}.attention.value_length``, else head_dim).
        n_embd: width of the residual stream (``{arch}.embedding_length``).
        n_ctx_train: context length the model was trained with (``{arch}.context_length``).
        n_vocab: number of tokens in ``tokenizer.ggml.tokens``.
        rope_scaling_type: ``{arch}.rope.scaling.type`` (e.g. ``"yarn"``), or None.
        sliding_window: ``{arch}.attention.sliding_window`` in tokens, or None.
        file_type: ``general.file_type`` (a llama.cpp ``LLAMA_FTYPE`` number), or None.
        quantization: file_type as a name such as ``"Q4_1"``, ``"F16"`` or ``"F32"``, or None.
        n_params: total number of weights, summed over all tensors.
        n_tensors: number of tensors.
        file_bytes: size of the file in bytes.
        data_end: offset just past the last byte of tensor data; a complete file is at
            least this long.
        header_bytes: offset of the tensor data: the metadata and the tensor layout come
            before it.
    """

    path: str
    architecture: str
    name: Optional[str]
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_embd: int
    n_ctx_train: int
    n_vocab: int
    rope_scaling_type: Optional[str]
    sliding_window: Optional[int]
    file_type: Optional[int]
    quantization: Optional[str]
    n_params: int
    n_tensors: int
    file_bytes: int
    data_end: int
    header_bytes: int = 0

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """Bytes one token occupies in a full (non-windowed) KV cache, over all layers.

        ``type_k`` and ``type_v`` are ggml type names as llama.cpp's ``--cache-type-k``
        takes them (``"f16"``, ``"f32"``, ``"bf16"``, ``"q8_0"``, ``"q4_0"``, ...). For f16
        this is ``n_layer * n_head_kv * (head_dim + head_dim_v) * 2``.
        """
        row_k = _row_bytes(type_k, self.n_head_kv * self.head_dim, "type_k")
        row_v = _row_bytes(type_v, self.n_head_kv * self.head_dim_v, "type_v")
        return self.n_layer * (row_k + row_v)


def inspect(path: PathLike) -> ModelInfo:
    """Read the metadata of the GGUF file at ``path`` without loading its weights.

    Results are remembered per process for an unchanged file (same inode, size and
    modification time, last modified over two seconds ago): parsing a 49k-token
    vocabulary takes the gguf reader a second or two.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not a valid GGUF file (wrong magic, truncated anywhere,
            garbage), or a required metadata key is missing; the message names the file
            and, for a missing key, the key.
    """
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError names the path
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a GGUF file", path)
    if time.time_ns() - st.st_mtime_ns < _SETTLE_NS:
        # Just written: a rewrite within the same clock tick would keep this mtime.
        return _model_info(path, st.st_size, _read(path, st.st_size))
    return _inspect_cached(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_gguf(path: PathLike) -> ModelInfo:
    """Validate ``path`` before llama.cpp loads it and return its :class:`ModelInfo`.

    Does everything :func:`inspect` does, raising the same exceptions, and also checks
    that the file is at least as long as the end of the last tensor's data (data
    offset + size), so that a file cut short inside the tensor data is rejected here
    with a ValueError instead of being handed to llama.cpp, and that a RoPE scaling
    type is one llama.cpp knows (it would abort on another).
    """
    info = inspect(path)
    if info.data_end > info.file_bytes:
        raise _invalid(info.path, f"truncated: tensor data ends at byte {info.data_end}, "
                                  f"the file has {info.file_bytes} bytes")
    if info.rope_scaling_type is not None and info.rope_scaling_type not in ROPE_SCALING_TYPES:
        # llama.cpp asserts on an unknown name (src/llama-model.cpp, rope scaling types)
        raise _invalid(info.path, f"{info.architecture}.rope.scaling.type is {info.rope_scaling_type!r}, "
                                  f"not one of {ROPE_SCALING_TYPES}")
    return info


#: the RoPE scaling types llama.cpp knows (``{arch}.rope.scaling.type``)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


#
# reading
#

class _BoundedReader(gguf.GGUFReader):
    """A GGUFReader that treats a read past the end of the file as an error.

    The stock reader slices its memory map, so a read past the end returns a short
    array; a garbage array length then makes it loop for a very long time over empty
    reads. Checking the length of every read turns any truncation into one ValueError.
    """

    def _get(self, offset, dtype, count=1, *args, **kwargs):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise ValueError(f"truncated: needs bytes up to {end}, "
                             f"the file has {len(self.data)}")
        return super()._get(offset, dtype, count, *args, **kwargs)


@functools.lru_cache(maxsize=16)
def _inspect_cached(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> ModelInfo:
    del dev, ino, mtime_ns  # part of the cache key only
    return _model_info(path, size, _read(path, size))


def _read(path: str, file_bytes: int) -> gguf.GGUFReader:
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        what = "the file is empty" if file_bytes == 0 else f"bad magic {magic!r}"
        raise _invalid(path, what)
    try:
        return _BoundedReader(path)
    except OSError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ...
        raise _invalid(path, f"{type(e).__name__}: {e}") from e


def _invalid(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid GGUF file ({why})")


#
# metadata
#

def _model_info(path: str, file_bytes: int, reader: gguf.GGUFReader) -> ModelInfo:
    fields = reader.fields

    def get(key: str, default: Any = _REQUIRED) -> Any:
        field = fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{path}: required GGUF metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # e.g. a string that is not UTF-8
            raise _invalid(path, f"cannot decode key {key!r}: {e}") from e

    def get_str(key: str, default: Any = _REQUIRED) -> Any:
        value = get(key, default)
        if value is not None and not isinstance(value, str):
            raise _invalid(path, f"key {key!r} should be a string, got {value!r}")
        return value

    def get_int(key: str, default: Any = _REQUIRED) -> Any:
        value = get(key, default)
        if isinstance(value, list):  # per-layer values
            value = max(value, default=0)
        if value is not None and isinstance(value, (bool, str, float)):
            raise _invalid(path, f"key {key!r} should be an integer, got {value!r}")
        return value if value is None else int(value)

    def n_vocab() -> int:
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            return get_int(f"{arch}.vocab_size", None) or get_int("tokenizer.ggml.tokens")
        if tokens.types[:1] != [gguf.GGUFValueType.ARRAY]:
            raise _invalid(path, "tokenizer.ggml.tokens should be an array")
        return len(tokens.data)  # one data index per element: no need to decode the strings

    arch = get_str("general.architecture")
    n_embd = get_int(f"{arch}.embedding_length")
    n_head = get_int(f"{arch}.attention.head_count")
    head_dim = get_int(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0)
    file_type = get_int("general.file_type", None)
    data_end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors),
                   default=reader.data_offset)
    return ModelInfo(
        path=path,
        architecture=arch,
        name=get_str("general.name", None),
        n_layer=get_int(f"{arch}.block_count"),
        n_head=n_head,
        n_head_kv=get_int(f"{arch}.attention.head_count_kv", n_head),
        head_dim=head_dim,
        head_dim_v=get_int(f"{arch}.attention.value_length", head_dim),
        n_embd=n_embd,
        n_ctx_train=get_int(f"{arch}.context_length"),
        n_vocab=n_vocab(),
        rope_scaling_type=get_str(f"{arch}.rope.scaling.type", None),
        sliding_window=get_int(f"{arch}.attention.sliding_window", None),
        file_type=file_type,
        quantization=_quantization_name(file_type),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_tensors=len(reader.tensors),
        file_bytes=file_bytes,
        data_end=int(data_end),
        header_bytes=int(reader.data_offset),
    )


def _quantization_name(file_type: Optional[int]) -> Optional[str]:
    if file_type is None:
        return None
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"unknown ({file_type})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _row_bytes(type_name: str, n_elements: int, what: str) -> int:
    try:
        qtype = gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise ValueError(f"{what}: unknown ggml type {type_name!r}") from None
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if n_elements % block:
        raise ValueError(f"{what}: {type_name} packs {block} values per block, "
                         f"which does not divide a row of {n_elements}")
    return n_elements // block * block_bytes
