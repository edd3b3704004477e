"""Host memory checks made before a context is allocated."""

from __future__ import annotations

from typing import Optional

from .gguf_info import ModelInfo


def available_memory() -> Optional[int]:
    """Bytes of memory a new allocation can get without swapping (Linux ``MemAvailable``),
    else None (then no check is made)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_host_kv(info: ModelInfo, n_ctx: int, *, kv: str, kv_on_host: bool,
                  type_k: str = "f16", type_v: str = "f16") -> None:
    """Raise ``ValueError`` when the KV cache of ``n_ctx`` tokens cannot fit in host memory.

    kv="full": the stock cache allocates all of n_ctx up front; it is checked when its K/V
    live in host memory (kv_on_host). kv="infllm": the host block store grows with the
    context up to about n_ctx tokens of K/V; that is checked always. The bound is what the
    OS reports as available now: a context that needs more would end in swapping or the
    OOM killer instead of an error.
    """
    if kv == "full" and not kv_on_host:
        return
    avail = available_memory()
    if avail is None:
        return
    need = info.kv_bytes_per_token(type_k, type_v) * n_ctx
    if need <= avail:
        return
    what = ("the stock KV cache (allocated up front)" if kv == "full"
            else "the InfLLM host block store at a full context")
    raise ValueError(
        f"n_ctx = {n_ctx} does not fit in host memory: {what} needs {_gib(need)} "
        f"({info.kv_bytes_per_token()} bytes per token), only {_gib(avail)} is available; "
        f"lower n_ctx to at most {avail // info.kv_bytes_per_token()} tokens")
