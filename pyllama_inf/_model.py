"""The public ``Model``: load a GGUF model, generate text, evaluate logits, read KV stats."""

from __future__ import annotations

import logging
import operator
import os
import queue
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _core
from ._devices import check_rpc_servers, parse_rpc_servers
from ._memory import check_host_kv
from .config import InfLLMConfig, parse_bytes
from . import _state
from .errors import ModelClosedError, PyllamaError, StateError
from .gguf_info import _row_bytes, check_gguf
from ._text import TextAssembler

logger = logging.getLogger("pyllama_inf")

KV_MODES = ("full", "infllm")
_MAX_SEED = 2**32 - 2          # 2**32 - 1 is llama.cpp's "random seed" marker
_MAX_CTX = 1 << 30


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one generation.

    prefill_s covers the prompt evaluation (up to the first logits); decode_s covers
    sampling and the single-token evaluations after it; decode_tokens is the number of
    those evaluations.
    """

    prompt_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens evaluated per second."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens decoded per second (NaN when nothing was decoded)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else float("nan")


@dataclass(frozen=True)
class GenerationResult:
    """What ``Model.generate`` returns.

    text: the generated text (cut before a stop string when one was hit).
    tokens: the generated token ids (end-of-generation tokens excluded).
    n_prompt_tokens: tokens in the evaluated prompt.
    finish_reason: ``"stop"`` (end-of-generation token or stop string) or ``"length"``
        (max_tokens reached or the context is full).
    timings: see :class:`Timings` (its prompt_tokens are the ones evaluated).
    n_reused_tokens: prompt tokens the context already held from an earlier call and that
        were not evaluated again (prefix reuse).
    """

    text: str
    tokens: List[int]
    n_prompt_tokens: int
    finish_reason: str
    timings: Timings
    n_reused_tokens: int = 0


@dataclass(frozen=True)
class InfLLMStats:
    """Counters of the InfLLM cache.

    n_blocks: complete blocks that left the local window (the memory);
    n_blocks_max: block capacity: the blocks that can ever leave the window of an n_ctx
        context, (n_ctx - 1 - n_local - n_init) // block_size;
    selections: (ubatch, layer) top-k selections made over at least one memory block;
    n_ring: cells of the local window ring per layer;
    n_pool: device block slots per layer: every block when ``resident``, else what
        ``kv_budget`` (or ``InfLLMConfig.cache_blocks``) buys;
    resident: every block has a device slot: no host store, no transfers, and the cache never
        interrupts a graph (``callbacks`` stays 0);
    work_bytes / pool_bytes / repr_bytes: device bytes of the attention working sets (local
        ring, sinks, rows of the selected blocks, eviction buffers), of the block pool and of
        the representative keys;
    device_bytes: their sum (never above budget_bytes when a budget is set);
    budget_bytes: the device byte budget (0: none);
    host_bytes: bytes of the host block store (offload; grows in chunks, kept across sequences);
    blocks_resident: (layer, block) pairs in the device pool;
    hits / misses: (layer, picked block) pairs found in the pool / fetched from the host
        store (offload); hit_rate = hits / (hits + misses), 1.0 when resident;
    ubatches: ubatches computed;
    callbacks: times the cache took over during a graph compute (offload: the eviction and
        the selection of each layer); each one synchronises the device;
    bytes_h2d / bytes_d2h: bytes moved host -> device (missing blocks, their slots) and
        device -> host (evicted blocks; not the few bytes of block ids each selection reads);
    transfer_wait_s: time spent waiting for those transfers;
    host_work_s: time the cache spent in its callbacks while graphs ran (includes
        transfer_wait_s).
    """

    n_blocks: int
    n_blocks_max: int
    selections: int
    n_ring: int
    n_pool: int
    resident: bool
    work_bytes: int
    pool_bytes: int
    repr_bytes: int
    device_bytes: int
    budget_bytes: int
    host_bytes: int
    blocks_resident: int
    hits: int
    misses: int
    ubatches: int
    callbacks: int
    bytes_h2d: int
    bytes_d2h: int
    transfer_wait_s: float
    host_work_s: float

    @property
    def hit_rate(self) -> float:
        """Share of picked blocks found on the device: 1.0 when resident (every block is)."""
        if self.resident:
            return 1.0
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class KVStats:
    """State of the KV cache.

    kv: the cache type (``"full"`` is llama.cpp's stock cache).
    n_tokens: tokens currently held.
    n_ctx: context size in tokens.
    device_bytes: KV bytes in the compute backend's buffers (for a CPU-only build that
        backend is the CPU and the bytes are in system RAM). The stock cache allocates
        all of n_ctx up front.
    host_bytes: KV bytes in the host store tier (0 for the stock cache, which has none).
    budget_bytes: the device byte budget, None when unbounded.
    buffers: bytes per llama.cpp buffer type name.
    graphs_reused: llama.cpp compute graphs reused (not rebuilt) since the model was loaded.
    infllm: :class:`InfLLMStats` for kv="infllm", else None.
    reused_tokens: prompt tokens taken from the context instead of evaluated, over all calls.
    reuse_fallbacks: calls whose prompt shared a prefix with the context that the cache could
        not go back to (the InfLLM ring, or a window-size sliding-window cache, had already
        overwritten what the next token attends to), so the prompt was evaluated from the
        start; each one is also logged as a warning.
    """

    kv: str
    n_tokens: int
    n_ctx: int
    device_bytes: int
    host_bytes: int
    budget_bytes: Optional[int]
    buffers: Dict[str, int] = field(default_factory=dict)
    graphs_reused: int = 0
    infllm: Optional[InfLLMStats] = None
    reused_tokens: int = 0
    reuse_fallbacks: int = 0


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_float(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"model path is a directory, not a GGUF file: {path}")
    return path


def _check_stop(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a str or a list of str")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return tuple(stop)


def _encode(text, name: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason} at index {e.start}") from None


#: K/V cache types, by their ggml names (llama.cpp's ``--cache-type-k`` / ``--cache-type-v``)
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
_UNQUANTIZED = ("f32", "f16", "bf16")


def _check_cache_type(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {CACHE_TYPES}")
    if value.lower() not in CACHE_TYPES:
        raise ValueError(f"{name} must be one of {CACHE_TYPES}, got {value!r}")
    return value.lower()


def _warn_past_training(cfg: InfLLMConfig, n_ctx: int, n_ubatch: int, n_ctx_train: int) -> None:
    """Warn when the InfLLM cache makes the model see distances it was not trained on.

    With positions="infllm" a query sees keys at most n_local + block_size + n_ubatch
    positions away (the window, the block being filled, the chunk); with "absolute" it
    sees the true distances, up to n_ctx; with "auto" the true distances while they are
    trained ones, then as "infllm"; with "packed" up to n_init + topk*block_size more than
    with "infllm" (the memory laid out before the window).
    """
    if n_ctx_train <= 0:
        return
    if cfg.positions == "absolute":
        span, what = n_ctx, "n_ctx"
    elif cfg.positions == "packed":
        span = cfg.n_local + cfg.block_size + n_ubatch + cfg.n_init + cfg.topk * cfg.block_size
        what = "n_local + block_size + n_ubatch + n_init + topk*block_size"
    else:
        span, what = cfg.n_local + cfg.block_size + n_ubatch, "n_local + block_size + n_ubatch"
    if span > n_ctx_train:
        warnings.warn(f"InfLLM cache: {what} = {span} is more than the model's trained context "
                      f"({n_ctx_train} tokens): it will see distances it was not trained on",
                      RuntimeWarning, stacklevel=3)


class Model:
    """A GGUF model loaded with llama.cpp, with one context of ``n_ctx`` tokens.

    Arguments follow llama.cpp / llama-cpp-python where they overlap:

    path: the GGUF file.
    n_ctx: context size in tokens.
    n_threads: CPU threads (default: all CPUs this process may use).
    n_gpu_layers: layers offloaded to the device (-1: all): a GPU of a GPU build (CUDA,
        Vulkan, ...) or the RPC servers' devices.
    main_gpu: the device (index into :func:`gpu_devices`, or into the RPC servers' devices)
        that holds the model when it is not split.
    rpc_servers: ``"host:port[,host:port...]"``: run the offloaded layers on llama.cpp RPC
        servers (upstream's ``rpc-server``) instead of local GPUs. Each server is checked
        before loading: unreachable or not an RPC server of this llama.cpp version ->
        ``ConnectionError``. A server that dies while a model uses it ends this process
        (llama.cpp's RPC client aborts).
    n_batch: most prompt tokens handed to llama.cpp in one call (it computes them in
        n_ubatch steps; fewer calls mean fewer progress callbacks and, on several GPUs,
        pipelined steps); n_ubatch: tokens per compute step. Steps start at multiples of
        n_ubatch, whatever the calls.
    flash_attn: True / False, or None to let llama.cpp decide.
    swa_full: models with sliding-window layers (Gemma 2/3, Cohere 2, ...): True keeps all
        n_ctx positions of those layers, False only their window (plus one ubatch), as
        llama.cpp's ``swa_full``. None: llama.cpp's default (True) for kv="full", False for
        kv="infllm" (the window is all those layers attend to). The two differ in rounding:
        the window-size cache reuses cells, which changes the order flash attention sums in.
        No effect on other models.
    offload_kqv: False keeps the stock cache's K/V (and the attention) in host memory when
        layers run on a GPU (llama.cpp's ``offload_kqv``); no effect on a CPU-only run.
    kv: ``"full"`` is llama.cpp's stock KV cache; ``"infllm"`` is the block-retrieval cache:
        each query attends to the first n_init tokens, the top-k most relevant past blocks
        and the local window (see :class:`InfLLMConfig`). It serves one sequence of plain
        RoPE attention (no MLA, recurrent layers; README, "Model families") and ignores
        ``flash_attn``. Sliding-window layers keep llama.cpp's own SWA cache (see ``swa_full``),
        the global layers get the InfLLM cache.
    kv_budget: device byte budget of the InfLLM cache (int or "256MiB"; kv="infllm" only).
        A budget that holds every block of n_ctx keeps them all on the device ("resident":
        no host store, no transfers). A smaller one must hold the local window, the sinks,
        the blocks of one selection, eviction buffers and the representative keys
        (``ValueError`` names the minimum); the rest buys device block slots, and blocks
        that do not fit come from a host store ("offload"). None: no byte bound; every block
        on the device unless ``InfLLMConfig.cache_blocks`` limits the slots.
    host_budget: bytes the host block store may reach at n_ctx (kv="infllm", offload only);
        ``ValueError`` at load when n_ctx would need more. None: unbounded.
    infllm: an :class:`InfLLMConfig` (default: ``InfLLMConfig()``); only with kv="infllm".
    seed: default sampling seed (None: a random one per generation).
    type_k / type_v: K and V cache types, by ggml name (one of :data:`CACHE_TYPES`, as
        llama.cpp's ``--cache-type-k`` / ``--cache-type-v``). ``"q8_0"`` halves the cache's
        memory (34 bytes per 32 values); a quantized V cache needs flash attention (not
        flash_attn=False). The InfLLM cache stores f16, f32, q8_0 and q4_0 (other types raise
        ``UnsupportedError``); its CPU decode kernel reads f16 and q8_0 rows (q4_0 decodes
        with ggml's flash attention). Heads must hold whole blocks of 32 values
        (``ValueError`` otherwise).

    A context whose KV cache cannot fit in host memory (the stock cache when its K/V live in
    host memory; the InfLLM host store at a full context) raises ``ValueError`` before
    anything is allocated.

    The context is kept between calls: a prompt that starts with tokens the context already
    holds (the same document with another question, the conversation so far) evaluates only
    the rest (``GenerationResult.n_reused_tokens``). The results are those of evaluating the
    whole prompt afresh: bit-identical where the kept tokens were evaluated as a prompt
    (tokens generated one at a time are kept as they were computed). The InfLLM cache keeps
    a prefix that ends on the n_ubatch grid and can go back at most about n_ubatch +
    ``InfLLMConfig.rewind`` tokens; further back, and where a window-size sliding-window cache
    lost what the next token attends to, the prompt is evaluated from the start, with a
    warning in the log and ``KVStats.reuse_fallbacks`` counting it. :meth:`reset` drops the
    context; :meth:`save_state` / :meth:`load_state` keep it in a file.

    Use as a context manager or call :meth:`close`; using the model after close raises
    ``ModelClosedError``. Calls from several threads are serialised.
    """

    def __init__(self, path, *, n_ctx: int = 4096, n_threads: Optional[int] = None,
                 n_gpu_layers: int = 0, main_gpu: int = 0, rpc_servers: Optional[str] = None,
                 n_batch: int = 2048, n_ubatch: int = 512,
                 flash_attn: Optional[bool] = None, swa_full: Optional[bool] = None,
                 offload_kqv: bool = True, kv: str = "full",
                 kv_budget: Union[int, str, None] = None, infllm: Optional[InfLLMConfig] = None,
                 host_budget: Union[int, str, None] = None, seed: Optional[int] = None,
                 type_k: str = "f16", type_v: str = "f16") -> None:
        self._session = None
        self._lock = threading.RLock()
        path = _check_path(path)
        params = _core.SessionParams()
        params.path = path
        params.n_ctx = _check_int("n_ctx", n_ctx, 1, _MAX_CTX)
        params.n_batch = _check_int("n_batch", n_batch, 1, _MAX_CTX)
        params.n_ubatch = _check_int("n_ubatch", n_ubatch, 1, params.n_batch)
        params.n_threads = _check_int("n_threads", _default_threads() if n_threads is None else n_threads, 1, 1024)
        params.n_gpu_layers = _check_int("n_gpu_layers", n_gpu_layers, -1, 1 << 16)
        params.main_gpu = _check_int("main_gpu", main_gpu, 0, 1 << 16)
        if flash_attn is not None and not isinstance(flash_attn, bool):
            raise TypeError("flash_attn must be True, False or None")
        params.flash_attn = -1 if flash_attn is None else int(flash_attn)
        if swa_full is not None and not isinstance(swa_full, bool):
            raise TypeError("swa_full must be True, False or None")
        params.swa_full = -1 if swa_full is None else int(swa_full)
        if not isinstance(offload_kqv, bool):
            raise TypeError("offload_kqv must be True or False")
        params.offload_kqv = offload_kqv
        params.type_k = _check_cache_type("type_k", type_k)
        params.type_v = _check_cache_type("type_v", type_v)
        if params.type_v not in _UNQUANTIZED and flash_attn is False:
            raise ValueError(f"type_v = {type_v!r} (a quantized V cache) needs flash attention: "
                             "flash_attn=False cannot be used with it")
        if kv not in KV_MODES:
            raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
        budget = parse_bytes(kv_budget, name="kv_budget")
        host = parse_bytes(host_budget, name="host_budget")
        if infllm is not None and not isinstance(infllm, InfLLMConfig):
            raise TypeError(f"infllm must be an InfLLMConfig, not {type(infllm).__name__}")
        if kv == "full" and (budget is not None or host is not None or infllm is not None):
            raise ValueError("kv_budget, host_budget and infllm apply to kv='infllm' only; the stock "
                             "cache (kv='full') keeps the whole context")
        for name, value in (("kv_budget", budget), ("host_budget", host)):
            if value == 0:
                raise ValueError(f"{name} must be more than 0 bytes (None: no budget)")
        if kv == "infllm":
            params.budget_bytes = budget or 0
            params.host_budget = host or 0
            infllm = InfLLMConfig() if infllm is None else infllm
            params.infllm = True
            params.block_size = infllm.block_size
            params.n_init = infllm.n_init
            params.n_local = infllm.n_local
            params.topk = infllm.topk
            params.rewind = infllm.rewind
            params.repr_keys = infllm.repr_keys
            params.absolute = infllm.positions == "absolute"
            params.packed = infllm.positions == "packed"
            if infllm.cache_blocks is not None:
                if budget is not None:
                    raise ValueError("InfLLMConfig.cache_blocks and kv_budget both size the device block "
                                     "cache; give one of them")
                params.cache_blocks = infllm.cache_blocks
        self.infllm = infllm
        self._seed = None if seed is None else _check_int("seed", seed, 0, _MAX_SEED)
        self.kv = kv
        self.kv_budget = budget
        self.host_budget = host
        self.path = path
        info = check_gguf(path)
        if kv == "infllm":
            # "auto": memory at true positions while every distance a query sees is one the model
            # was trained on (the whole ubatch below n_ctx_train), at InfLLM's position beyond
            params.true_below = min(max(info.n_ctx_train, 0), 2**32 - 1) if infllm.positions == "auto" else 0
        # a quantized type packs 32 values per block: each head's row must hold whole blocks
        # (llama.cpp would abort on a view of part of a block)
        _row_bytes(params.type_k, info.head_dim, "type_k")
        _row_bytes(params.type_v, info.head_dim_v, "type_v")
        params.rpc_servers = check_rpc_servers(rpc_servers)
        n_devices = len(parse_rpc_servers(rpc_servers)) if rpc_servers else _core.n_gpu_devices()
        kv_on_host = n_gpu_layers == 0 or not offload_kqv or n_devices == 0
        check_host_kv(info, params.n_ctx, kv=kv, kv_on_host=kv_on_host, type_k=params.type_k, type_v=params.type_v)
        self.rpc_servers = params.rpc_servers or None
        self.type_k, self.type_v = params.type_k, params.type_v
        self._info = info
        self._fingerprint: Optional[str] = None
        # what decides the memory's layout: a saved state loads only where these are equal
        self._state_config = {
            "kv": kv, "n_ctx": params.n_ctx, "n_ubatch": params.n_ubatch, "type_k": params.type_k,
            "type_v": params.type_v,
            "swa_full": (kv == "full") if swa_full is None else bool(swa_full),
            "infllm": None if kv != "infllm" else {
                "block_size": infllm.block_size, "n_init": infllm.n_init, "n_local": infllm.n_local,
                "topk": infllm.topk, "positions": infllm.positions, "rewind": infllm.rewind,
                "repr_keys": infllm.repr_keys},
        }
        self._session = _core.Session(params)
        if kv == "infllm":
            _warn_past_training(infllm, params.n_ctx, params.n_ubatch, self._session.n_ctx_train)

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and its context. Safe to call more than once."""
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                session.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._session is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # a safety net only: close() or the context manager is the way to free a model
        if getattr(self, "_session", None) is not None:
            self.close()

    def _s(self):
        session = self._session
        if session is None:
            raise ModelClosedError("the model is closed")
        return session

    # -- properties --------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Context size in tokens."""
        return self._s().n_ctx

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self._s().n_vocab

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained with."""
        return self._s().n_ctx_train

    # -- tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Text -> token ids. add_special adds BOS/EOS as the model asks; parse_special
        turns special-token text (e.g. ``<|im_start|>``) into those tokens."""
        data = _encode(text, "text")
        with self._lock:
            return self._s().tokenize(data, add_special=bool(add_special), parse_special=bool(parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids -> text (BOS/EOS removed; invalid UTF-8 replaced)."""
        ids = self._token_list(tokens, allow_empty=True)
        with self._lock:
            return self._s().detokenize(ids, remove_special=True).decode("utf-8", errors="replace")

    @staticmethod
    def _token_list(tokens, *, allow_empty: bool = False) -> List[int]:
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise TypeError("tokens must be a sequence of ints")
        ids = []
        for i, t in enumerate(tokens):
            if isinstance(t, bool):
                raise TypeError(f"token {i} is a bool, not an int")
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise TypeError(f"token {i} must be an int, not {type(t).__name__}") from None
            if not -2**31 <= ids[-1] < 2**31:
                raise ValueError(f"token {i} has id {ids[-1]}, outside the vocabulary")
        if not ids and not allow_empty:
            raise ValueError("tokens must not be empty")
        return ids

    # -- evaluation --------------------------------------------------------------------

    def logits(self, tokens: Sequence[int], *, last_n: Optional[int] = None) -> np.ndarray:
        """Logits of the last ``last_n`` positions (all when None) as float32 ``[n, n_vocab]``.

        Teacher forcing: row i holds the distribution over the token that follows position
        ``len(tokens) - last_n + i``. Tokens the context already holds are not evaluated
        again (see the class docstring); afterwards the context holds ``tokens``.
        """
        ids = self._token_list(tokens)
        n = len(ids) if last_n is None else _check_int("last_n", last_n, 1, len(ids))
        with self._lock:
            s = self._s()
            with _reuse_log(s):
                return s.eval(ids, last_n=n, chunk=0)

    def generate(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                 stream: bool = False,
                 progress: Union[bool, Callable[[int, int], None]] = False
                 ) -> Union[GenerationResult, "TextStream"]:
        """Generate text after ``prompt``.

        temperature 0 is greedy decoding; otherwise top_k (0 = off), top_p and min_p filter
        the distribution before sampling with ``seed`` (default: the model's seed, else
        random). Generation ends at an end-of-generation token, after ``max_tokens``, when
        the context is full, or where a ``stop`` string appears (the text is cut before it).

        With ``stream=True`` the result is an iterator of text pieces (about one per token);
        its ``result`` attribute holds the :class:`GenerationResult` once it is exhausted.
        ``progress`` shows a progress bar over the prompt evaluation (True) or is called as
        ``progress(done_tokens, total_tokens)`` after each chunk.

        The prompt's tokens that the context already holds are not evaluated again (see the
        class docstring); afterwards the context holds the prompt and the generated tokens
        (all but the last one, which was sampled but not evaluated).

        Raises ContextFullError when the prompt does not fit into n_ctx.
        """
        data = _encode(prompt, "prompt")
        sp = _core.SamplingParams()
        sp.max_tokens = _check_int("max_tokens", max_tokens, 0, _MAX_CTX)
        sp.temperature = _check_float("temperature", temperature, 0.0, 1e6)
        sp.top_k = _check_int("top_k", top_k, 0, 1 << 30)
        sp.top_p = _check_float("top_p", top_p, 0.0, 1.0, lo_open=True)
        sp.min_p = _check_float("min_p", min_p, 0.0, 1.0)
        seed = self._seed if seed is None else _check_int("seed", seed, 0, _MAX_SEED)
        sp.seed = 0xFFFFFFFF if seed is None else seed
        stops = _check_stop(stop)
        if not isinstance(stream, bool):
            raise TypeError("stream must be a bool")
        run = _Generation(self, data, sp, stops, progress)
        if stream:
            return TextStream(run)
        return run.run(on_piece=None)

    # -- the kept context --------------------------------------------------------------

    @property
    def context_tokens(self) -> List[int]:
        """The tokens the context holds (positions 0..), in order."""
        with self._lock:
            return list(self._s().held)

    def reset(self) -> None:
        """Drop the context: the next call evaluates its prompt from the start."""
        with self._lock:
            self._s().reset()

    def save_state(self, path: Union[str, os.PathLike]) -> None:
        """Write the context (the tokens it holds and the KV cache, the InfLLM host store
        included) to ``path``, replacing the file atomically.

        The file records the model (a hash of the GGUF's metadata and tensor layout) and the
        settings that decide the cache's layout (kv, n_ctx, n_ubatch, type_k/type_v, swa_full,
        the InfLLM config; not kv_budget, host_budget or cache_blocks, so a state saved with
        every block on the device loads into an offloading cache and back). Raises
        StateError when it cannot be written.
        """
        path = _state_path(path)
        with self._lock:
            s = self._s()
            head = _state.make_head(self._model_id(), self._state_config, list(s.held))
            s.save_state(path, head)

    def load_state(self, path: Union[str, os.PathLike]) -> None:
        """Make the context what :meth:`save_state` wrote to ``path``.

        The next call continues from it as from the context that was saved (prefix reuse
        included): the logits of the next token are bit-identical. Raises StateError when the
        file is not a saved state, is truncated or corrupted (the context is unchanged), was
        saved with another model or other context settings (unchanged; the message names
        them), or when the cache refuses its contents (the context is then empty).
        """
        path = _state_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"saved state not found: {path}")
        head = _state.read_head(path)
        with self._lock:
            s = self._s()
            _state.check_head(path, head, self._model_id(), self._state_config)
            s.load_state(path)
            try:
                s.set_held(head["tokens"])
            except (ValueError, TypeError) as e:
                s.reset()
                raise StateError(f"{path}: the saved tokens do not match the saved cache ({e}); "
                                 "the context is now empty") from None

    def _model_id(self) -> Dict[str, str]:
        if self._fingerprint is None:
            self._fingerprint = _state.fingerprint(self._info)
        return {"fingerprint": self._fingerprint, "file": os.path.basename(self.path),
                "architecture": self._info.architecture}

    # -- chat --------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Dict[str, str]], *, add_generation_prompt: bool = True,
                            template: Optional[str] = None) -> str:
        """Format ``messages`` (dicts with "role" and "content") as the model's prompt.

        Uses the GGUF's own template (``tokenizer.chat_template``) through llama.cpp's
        built-in template support, which recognises the common families (ChatML, Llama 2/3,
        Gemma, Mistral, Phi-3, ...). ``template`` overrides it with a template text or a name
        llama.cpp knows (e.g. ``"chatml"``). add_generation_prompt ends the text where the
        assistant's answer starts. Raises UnsupportedError for a template llama.cpp does not
        know and ValueError when the model has none.
        """
        msgs = _check_messages(messages)
        if template is not None and not isinstance(template, str):
            raise TypeError("template must be a str or None")
        with self._lock:
            return self._s().apply_chat_template(msgs, add_assistant=bool(add_generation_prompt),
                                                 template=template or "")

    def chat(self, messages: Sequence[Dict[str, str]], *, template: Optional[str] = None,
             **kwargs) -> Union[GenerationResult, "TextStream"]:
        """The assistant's answer to ``messages``: :meth:`generate` on the formatted
        conversation (``kwargs`` are generate's). Called turn after turn with the growing
        list of messages, each call evaluates only what is new since the context's common
        prefix with it (the document, the earlier turns).
        """
        return self.generate(self.apply_chat_template(messages, template=template), **kwargs)

    def create_chat_completion(self, messages: Sequence[Dict[str, str]], *, max_tokens: Optional[int] = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, seed: Optional[int] = None,
                               stop: Union[str, Sequence[str], None] = None, stream: bool = False,
                               template: Optional[str] = None):
        """llama-cpp-python's ``create_chat_completion``: an OpenAI-style
        ``chat.completion`` dict, or with ``stream=True`` an iterator of
        ``chat.completion.chunk`` dicts (the first carries the role, the last the
        finish_reason). max_tokens None: until the end of the turn or a full context.
        """
        budget = self.n_ctx if max_tokens is None else max_tokens
        out = self.chat(messages, template=template, max_tokens=budget, temperature=temperature, top_p=top_p,
                        top_k=top_k, min_p=min_p, seed=seed, stop=stop, stream=stream)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.path}
        if stream:
            return _chat_chunks(out, meta)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": {"prompt_tokens": out.n_prompt_tokens, "completion_tokens": len(out.tokens),
                          "total_tokens": out.n_prompt_tokens + len(out.tokens)}}

    # -- stats -------------------------------------------------------------------------

    def kv_stats(self) -> KVStats:
        """A snapshot of the KV cache (see :class:`KVStats`)."""
        with self._lock:
            s = self._s()
            info = s.kv()
            buffers = {b.name: b.bytes for b in info.buffers}
            inf = info.infllm
            extra = None if inf is None else InfLLMStats(
                **{f.name: getattr(inf, f.name) for f in fields(InfLLMStats)})
            return KVStats(kv=self.kv, n_tokens=info.n_tokens, n_ctx=s.n_ctx,
                           device_bytes=sum(buffers.values()) if inf is None else inf.device_bytes,
                           host_bytes=0 if inf is None else inf.host_bytes,
                           budget_bytes=self.kv_budget, buffers=buffers, graphs_reused=info.graphs_reused,
                           infllm=extra, reused_tokens=info.reused_total, reuse_fallbacks=info.reuse_fallbacks)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}, kv={self.kv!r}"
        return f"Model({self.path!r}, {state})"


class _Generation:
    """One generate() call: runs the native loop and assembles the text."""

    def __init__(self, model: Model, prompt: bytes, sp, stops: tuple, progress) -> None:
        self.model, self.prompt, self.sp, self.progress = model, prompt, sp, progress
        self.text = TextAssembler(stops)
        self.cancel = threading.Event()
        self.session = None   # set while the native generation runs

    def run(self, on_piece: Optional[Callable[[str], None]]) -> GenerationResult:
        text = self.text

        def on_token(token: int, piece: bytes) -> bool:
            released = text.feed(piece)
            if released and on_piece is not None:
                on_piece(released)
            return not (text.stopped or self.cancel.is_set())

        with self.model._lock:
            s = self.model._s()
            tokens = s.tokenize(self.prompt, add_special=True, parse_special=True)
            with _progress_callback(self.progress, len(tokens), s.n_ubatch) as on_progress:
                self.session = s
                try:
                    if self.cancel.is_set():
                        raise PyllamaError("the generation was cancelled before it started")
                    with _reuse_log(s):
                        out = s.generate(tokens, sampling=self.sp, on_token=on_token, on_progress=on_progress)
                finally:
                    self.session = None
        tail = text.finish()
        if tail and on_piece is not None:
            on_piece(tail)
        timings = Timings(prompt_tokens=out.n_prompt_tokens - out.n_reused, prefill_s=out.t_prefill_s,
                          decode_tokens=out.n_decoded, decode_s=out.t_decode_s)
        return GenerationResult(text=text.text, tokens=list(out.tokens), n_prompt_tokens=out.n_prompt_tokens,
                                finish_reason=out.finish_reason, timings=timings, n_reused_tokens=out.n_reused)


class _progress_callback:
    """Context manager giving the on_progress callable for a prompt of n tokens."""

    def __init__(self, progress, n_tokens: int, chunk: int) -> None:
        self.bar = None
        self.fn = None
        if callable(progress):
            self.fn = progress
        elif progress and n_tokens > chunk:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=n_tokens, unit="tok", desc="prompt", leave=False)
            self.fn = lambda done, total: self.bar.update(done - self.bar.n)
        elif not isinstance(progress, bool):
            raise TypeError("progress must be a bool or a callable(done, total)")

    def __enter__(self):
        return self.fn

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


class TextStream:
    """Iterator over the text pieces of a streaming generation, as a Python generator is:
    ``iter(stream)`` is the stream itself, so ``next(stream)`` and later loops continue where
    the last one stopped, and an exhausted stream stays exhausted.

    The generation runs in a worker thread; pieces arrive through a queue. Errors raised
    by the generation are re-raised from the iterator. ``result`` is the
    :class:`GenerationResult` once the stream is exhausted. Leaving a loop early does not
    stop the generation; :meth:`close` does (at the next token), as does an exception or
    Ctrl-C while waiting for a piece, leaving a ``with`` block, or dropping the stream.
    """

    _DONE = object()

    def __init__(self, run: _Generation) -> None:
        self._run = run
        self._queue: "queue.Queue" = queue.Queue()
        self._finished = False
        self.result: Optional[GenerationResult] = None
        # the worker holds the queue and the run, not the stream: dropping the stream closes it
        self._thread = threading.Thread(target=_stream_worker, args=(run, self._queue, self._DONE),
                                        name="pyllama-inf-generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        try:
            item = self._queue.get()
        except BaseException:   # Ctrl-C while waiting: stop the generation too
            self.close()
            raise
        if isinstance(item, tuple) and item and item[0] is self._DONE:
            self._finished = True
            self._thread.join()
            if isinstance(item[1], BaseException):
                raise item[1]
            self.result = item[1]
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the generation (if still running) and wait for the worker; the stream is
        exhausted afterwards."""
        self._run.cancel.set()
        session = self._run.session
        if session is not None:
            session.cancel()   # stops a prompt evaluation between two graph nodes
        self._thread.join()
        self._finished = True

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.close()


def _stream_worker(run: _Generation, out: "queue.Queue", done: object) -> None:
    try:
        result = run.run(on_piece=out.put)
        out.put((done, result))
    except BaseException as e:  # handed to the consumer
        out.put((done, e))


class _reuse_log:
    """Logs a warning when a call could not reuse the context it shared a prefix with."""

    def __init__(self, session) -> None:
        self.session = session

    def __enter__(self) -> None:
        self.before = self.session.reuse_fallbacks

    def __exit__(self, *exc) -> None:
        if self.session.reuse_fallbacks > self.before:
            logger.warning("the prompt shares a prefix with the context, but the cache cannot go back to it "
                           "(the InfLLM ring or a window-size sliding-window cache already overwrote what the "
                           "next token attends to); it was evaluated from the start")


def _state_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return os.fspath(path)


def _check_messages(messages) -> List[tuple]:
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise TypeError("messages must be a list of dicts with 'role' and 'content'")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TypeError(f"message {i} must be a dict with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        content = "" if content is None else content
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"message {i}: role and content must be str")
        for name, text in (("role", role), ("content", content)):
            if "\0" in text:
                raise ValueError(f"message {i}: {name} contains a NUL character")
            _encode(text, f"message {i} {name}")
        out.append((role, content))
    if not out:
        raise ValueError("messages must not be empty")
    return out


def _chat_chunks(stream: "TextStream", meta: dict) -> Iterator[dict]:
    def chunk(delta: dict, finish: Optional[str]) -> dict:
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    with stream:
        yield chunk({"role": "assistant"}, None)
        for piece in stream:
            yield chunk({"content": piece}, None)
        yield chunk({}, stream.result.finish_reason)
