"""Configuration values: the InfLLM cache settings and byte sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Union[int, str, None], *, name: str = "size") -> Optional[int]:
    """Turn ``256 * 2**20``, ``"256MiB"``, ``"1.5GiB"`` or ``"512MB"`` into a byte count.

    ``None`` stays ``None``. Raises ``TypeError`` for other types and ``ValueError`` for
    negative numbers and strings that are not a size.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an int number of bytes or a string like '256MiB', "
                        f"not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 bytes, got {value}")
        return value
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{name} {value!r} is not a size; use bytes or a string like '256MiB' or '2GB'")
    return int(float(m.group(1)) * _UNITS[unit])


_MAX_FIELD = 1 << 30   # tokens or blocks; far beyond any context llama.cpp can hold
POSITIONS = ("infllm", "absolute", "auto", "packed")   # InfLLMConfig.positions


@dataclass(frozen=True)
class InfLLMConfig:
    """Settings of the InfLLM KV cache (``Model(kv="infllm", infllm=...)``).

    block_size: tokens per memory block.
    n_init: first tokens that every query attends to (attention sinks).
    n_local: size of the local window, attended at true relative positions.
    topk: memory blocks selected per query chunk.
    rewind: local-ring cells kept beyond the window, so that a later call whose prompt
        shares a prefix with the context can take back up to about n_ubatch + rewind of its
        last tokens (an earlier answer, the previous question) without evaluating everything
        again. Costs rewind K/V rows per layer on the device; 0 keeps the smallest ring.
    repr_keys: how a block is scored for selection. 0: by the sum of its keys (its mean key,
        up to scale). r (1..block_size): by the sum of the r keys that the query of the chunk
        that evicts the block attends to most — InfLLM's representative tokens, so that a
        few salient tokens are not averaged away by the block's filler.
    positions: ``"auto"`` (the default) keeps true positions for queries inside the model's
        trained context (every distance they see is a trained one) and puts memory at
        InfLLM's distance for queries past it; ``"infllm"`` puts memory tokens at one fixed
        distance (``n_local``) from the query everywhere, which lets a model run past its
        trained context; ``"absolute"`` keeps true positions everywhere; ``"packed"`` lays
        the sinks and the picked blocks out, in their order in the context, just before the
        window, every token at its own position (a block keeps the order of its tokens, and a
        query sees memory at most n_init + topk*block_size positions beyond the window); with
        every block picked these are the true positions.
    cache_blocks: device block slots per layer when the model has no ``kv_budget``: None
        keeps every block on the device (resident); a smaller number (at least ``topk``)
        keeps that many there and the rest in a host store, fetched when picked (offload).
        With a ``kv_budget`` the budget decides it, and cache_blocks must stay None.

    A window (n_init + n_local) as long as the context or longer is allowed: no block ever
    leaves it, and the cache attends to every token as the stock cache does.
    """

    block_size: int = 128
    n_init: int = 128
    n_local: int = 4096
    topk: int = 16
    rewind: int = 1024
    repr_keys: int = 0
    positions: str = "auto"
    cache_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        for field in ("block_size", "n_init", "n_local", "topk", "rewind", "repr_keys"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"InfLLMConfig.{field} must be an int, not {type(value).__name__}")
            if value >= _MAX_FIELD:
                raise ValueError(f"InfLLMConfig.{field} must be below {_MAX_FIELD}, got {value}")
        if self.block_size <= 0:
            raise ValueError(f"InfLLMConfig.block_size must be > 0, got {self.block_size}")
        if self.n_init < 0:
            raise ValueError(f"InfLLMConfig.n_init must be >= 0, got {self.n_init}")
        if self.n_local <= 0:
            raise ValueError(f"InfLLMConfig.n_local must be > 0, got {self.n_local}")
        if self.topk < 0:
            raise ValueError(f"InfLLMConfig.topk must be >= 0, got {self.topk}")
        if self.rewind < 0:
            raise ValueError(f"InfLLMConfig.rewind must be >= 0, got {self.rewind}")
        if not 0 <= self.repr_keys <= self.block_size:
            raise ValueError(f"InfLLMConfig.repr_keys must be in [0, block_size={self.block_size}], got {self.repr_keys}")
        if self.cache_blocks is not None:
            if isinstance(self.cache_blocks, bool) or not isinstance(self.cache_blocks, int):
                raise TypeError(f"InfLLMConfig.cache_blocks must be an int or None, not {type(self.cache_blocks).__name__}")
            if not 0 <= self.cache_blocks < _MAX_FIELD:
                raise ValueError(f"InfLLMConfig.cache_blocks must be in [0, {_MAX_FIELD}), got {self.cache_blocks}")
        if self.positions not in POSITIONS:
            raise ValueError(f"InfLLMConfig.positions must be one of {', '.join(map(repr, POSITIONS))}, "
                             f"got {self.positions!r}")
