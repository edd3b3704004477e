"""Saved contexts: the head of a state file and the checks made before one is loaded.

A state file (written by the native ``llama_infllm_state_save``) is

    "PYLINFST" | u32 version | u32 0 | u64 head_len | head | payload | u64 payload_len | u64 checksum

The head is UTF-8 JSON written here: the model's fingerprint (sha256 of the GGUF's metadata
and tensor layout, everything before the tensor data), the context settings that decide
the memory's layout, and the tokens the context holds. The payload is the memory's own
state (either cache, the InfLLM host store included); the checksum covers everything
before it and is checked natively before the memory is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Dict, List

from .errors import StateError
from .gguf_info import ModelInfo

MAGIC = b"PYLINFST"
VERSION = 1
_FIXED = struct.Struct("<8sIIQ")     # magic, version, reserved, head_len
_TRAILER = 16                        # payload_len, checksum
_FORMAT = "pyllama-inf state"


def fingerprint(info: ModelInfo) -> str:
    """sha256 of the GGUF's bytes before its tensor data (metadata and tensor layout)."""
    digest = hashlib.sha256()
    left = info.header_bytes
    with open(info.path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def make_head(model: Dict[str, Any], config: Dict[str, Any], tokens: List[int]) -> bytes:
    """The head bytes of a state file."""
    head = {"format": _FORMAT, "version": VERSION, "model": model, "config": config,
            "n_tokens": len(tokens), "tokens": tokens}
    return json.dumps(head, separators=(",", ":")).encode("utf-8")


def read_head(path: str) -> Dict[str, Any]:
    """The head of the state file at ``path`` (not its payload, not its checksum).

    Raises FileNotFoundError, IsADirectoryError, or StateError when the file is not a state
    file of this format.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a saved state")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fixed = f.read(_FIXED.size)
        if len(fixed) < _FIXED.size:
            raise StateError(f"{path}: not a saved state (the file is too short)")
        magic, version, _, head_len = _FIXED.unpack(fixed)
        if magic != MAGIC:
            raise StateError(f"{path}: not a saved state of pyllama-inf (wrong magic)")
        if version != VERSION:
            raise StateError(f"{path}: state format version {version} is not supported "
                             f"(this version reads {VERSION})")
        if head_len > size - _FIXED.size - _TRAILER:
            raise StateError(f"{path}: the saved state is truncated or corrupted (header length)")
        raw = f.read(head_len)
    try:
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"{path}: the saved state is corrupted (its header is not valid JSON: {e})") from None
    if not isinstance(head, dict) or head.get("format") != _FORMAT or not isinstance(head.get("tokens"), list) \
            or not isinstance(head.get("model"), dict) or not isinstance(head.get("config"), dict):
        raise StateError(f"{path}: the saved state is corrupted (its header lacks the expected fields)")
    tokens = head["tokens"]
    if head.get("n_tokens") != len(tokens) or not all(type(t) is int for t in tokens):
        raise StateError(f"{path}: the saved state is corrupted (its token list)")
    return head


def check_head(path: str, head: Dict[str, Any], model: Dict[str, Any], config: Dict[str, Any]) -> None:
    """Raise StateError unless the state was saved by this model with these settings."""
    saved = head["model"]
    if saved.get("fingerprint") != model["fingerprint"]:
        raise StateError(f"{path} was saved with another model ({saved.get('file')!r}, "
                         f"{saved.get('architecture')!r}), not {model['file']!r}: the GGUF metadata or "
                         f"tensor layout differ")
    diffs = [f"{k}: saved {head['config'].get(k)!r}, this model {v!r}"
             for k, v in config.items() if head["config"].get(k) != v]
    if diffs:
        raise StateError(f"{path} was saved with other context settings (" + "; ".join(diffs) +
                         "); create the Model with the saved ones to load it")

