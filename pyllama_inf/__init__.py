"""pyllama-inf: GGUF models on contexts longer than device memory allows.

Quick start::

    import pyllama_inf as pi
    with pi.Model("model.gguf", n_ctx=8192) as m:
        print(m.generate("The capital of France is", max_tokens=16, temperature=0).text)
"""

from . import _core, _log
from ._model import CACHE_TYPES, GenerationResult, InfLLMStats, KVStats, Model, TextStream, Timings
from .config import POSITIONS, InfLLMConfig, parse_bytes
from .errors import (ContextFullError, DecodeError, ModelClosedError, ModelLoadError, PyllamaError,
                     StateError, UnsupportedError)
from .gguf_info import ModelInfo, inspect


def gpu_devices():
    """(name, description) of each GPU device of this build (CUDA, Vulkan, ...), in ``main_gpu``
    order; empty on a CPU-only build. RPC servers are not listed: see ``Model(rpc_servers=)``."""
    return list(_core.gpu_devices())


__version__ = "0.1.0"
UPSTREAM_COMMIT = _core.upstream_commit

_log.install()

__all__ = [
    "Model", "GenerationResult", "KVStats", "InfLLMStats", "TextStream", "Timings", "InfLLMConfig", "parse_bytes",
    "inspect", "ModelInfo", "PyllamaError", "ModelLoadError", "ContextFullError", "DecodeError",
    "ModelClosedError", "StateError", "UnsupportedError", "UPSTREAM_COMMIT", "gpu_devices", "CACHE_TYPES", "POSITIONS",
]
