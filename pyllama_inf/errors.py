"""The exceptions pyllama-inf raises.

Bad arguments raise ``ValueError`` or ``TypeError``, a missing model file
``FileNotFoundError``; everything else derives from :class:`PyllamaError`.
"""

from __future__ import annotations

from ._core import ContextFullError, DecodeError, ModelLoadError, PyllamaError, StateError, UnsupportedError


class ModelClosedError(PyllamaError):
    """The model was used after ``close()``."""


__all__ = ["PyllamaError", "ModelLoadError", "ContextFullError", "DecodeError",
           "ModelClosedError", "StateError", "UnsupportedError"]
