"""llama.cpp's log lines go to ``logging.getLogger("pyllama_inf")``."""

from __future__ import annotations

import atexit
import logging

from . import _core

logger = logging.getLogger("pyllama_inf")

# ggml log levels -> logging levels
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _handle(level: int, message: str) -> None:
    py_level = _LEVELS.get(level, logging.DEBUG)
    # llama.cpp is chatty at INFO while loading; keep its INFO lines at DEBUG so that
    # logging.basicConfig(level=INFO) shows our own messages, not hundreds of its lines
    if py_level == logging.INFO:
        py_level = logging.DEBUG
    if message and logger.isEnabledFor(py_level):
        logger.log(py_level, "%s", message)


def install() -> None:
    """Route llama.cpp's log callback into Python logging (done at import)."""
    _core.set_log_handler(_handle)
    # after interpreter shutdown begins, a log line from a native thread must not call Python
    atexit.register(_core.set_log_handler, None)
