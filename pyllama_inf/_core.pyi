"""Type stub of the native module (see csrc/binding/)."""

from typing import Callable, List, Optional, Tuple

import numpy as np

upstream_commit: str
RPC_AVAILABLE: bool
RPC_PROTO_MAJOR_VERSION: int

def n_gpu_devices() -> int: ...
def gpu_devices() -> List[Tuple[str, str]]: ...

class PyllamaError(RuntimeError): ...
class ModelLoadError(PyllamaError): ...
class ContextFullError(PyllamaError): ...
class DecodeError(PyllamaError): ...
class UnsupportedError(PyllamaError): ...
class StateError(PyllamaError): ...

def set_log_handler(handler: Optional[Callable[[int, str], None]]) -> None: ...

class SessionParams:
    path: str
    n_gpu_layers: int
    main_gpu: int
    rpc_servers: str
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    flash_attn: int
    swa_full: int
    offload_kqv: bool
    infllm: bool
    block_size: int
    n_init: int
    n_local: int
    topk: int
    rewind: int
    repr_keys: int
    absolute: bool
    true_below: int
    packed: bool
    budget_bytes: int
    cache_blocks: int
    host_budget: int
    type_k: str
    type_v: str
    def __init__(self) -> None: ...

class SamplingParams:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    def __init__(self) -> None: ...

class GenerationOutput:
    tokens: List[int]
    finish_reason: str
    n_prompt_tokens: int
    n_decoded: int
    n_reused: int
    t_prefill_s: float
    t_decode_s: float

class KVBuffer:
    name: str
    is_host: bool
    bytes: int

class InfLLMStats:
    n_tokens: int
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

class KVInfo:
    n_tokens: int
    buffers: List[KVBuffer]
    graphs_reused: int
    reused_total: int
    reuse_fallbacks: int
    infllm: Optional[InfLLMStats]

class Session:
    def __init__(self, params: SessionParams) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def tokenize(self, text: bytes, *, add_special: bool, parse_special: bool) -> List[int]: ...
    def token_piece(self, token: int) -> bytes: ...
    def detokenize(self, tokens: List[int], *, remove_special: bool) -> bytes: ...
    def eval(self, tokens: List[int], *, last_n: int, chunk: int) -> np.ndarray: ...
    def generate(self, prompt: List[int], *, sampling: SamplingParams,
                 on_token: Optional[Callable[[int, bytes], bool]] = None,
                 on_progress: Optional[Callable[[int, int], None]] = None) -> GenerationOutput: ...
    def kv(self) -> KVInfo: ...
    def cancel(self) -> None: ...
    def reset(self) -> None: ...
    @property
    def held(self) -> List[int]: ...
    def set_held(self, tokens: List[int]) -> None: ...
    @property
    def reuse_fallbacks(self) -> int: ...
    def save_state(self, path: str, meta: bytes) -> None: ...
    def load_state(self, path: str) -> None: ...
    def apply_chat_template(self, messages: List[Tuple[str, str]], *, add_assistant: bool, template: str) -> str: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_ctx_train(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    @property
    def n_ubatch(self) -> int: ...
    @property
    def desc(self) -> str: ...
