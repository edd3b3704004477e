"""Turning generated token pieces (bytes) into text, with stop strings."""

from __future__ import annotations

import codecs
from typing import Sequence


class TextAssembler:
    """Accumulates token pieces and releases text that is final.

    Pieces are UTF-8 bytes that may split a character; they are decoded incrementally.
    With stop strings, text that could still become the start of a stop string is held
    back until it is decided, and the text is cut where the first stop string begins.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self.stopped = False
        self._released = 0

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that became final."""
        self.text += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """No more pieces: return whatever text is still held back."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            cut = min((i for i in (self.text.find(s, self._released) for s in self._stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self._released, len(self.text) - self._hold)
        out = self.text[self._released:end]
        self._released = end
        return out
