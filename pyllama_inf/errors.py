"""The exceptions pyllama-inf raises.

Bad arguments raise ``ValueError`` or ``TypeError``, a missing model file
``FileNotFoundError``; everything else derives from :class:`PyllamaError`.
"""

from __future__ import annotations

from ._core import ContextFullError, DecodeError, ModelLoadError, PyllamaError


class ModelClosedError(PyllamaError):
    """The model was used after ``close()``."""


class UnsupportedError(PyllamaError):
    """The model or the requested configuration is not supported (yet)."""


__all__ = ["PyllamaError", "ModelLoadError", "ContextFullError", "DecodeError",
           "ModelClosedError", "UnsupportedError"]
