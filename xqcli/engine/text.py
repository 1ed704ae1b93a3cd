"""One row's generated text: streaming detokenization plus stop strings.

Stop strings are matched on the decoded text; text that could be the start of a stop string is held
back until it is decided, so a stop string is never printed. Detokenization is the tokenizer's
`StreamDecoder` (complete characters only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xqcli.tokenizer import Tokenizer


class RowText:
    """Incremental text of one row: streaming decode plus stop strings, holding back what may start one."""

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]) -> None:
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stop = stop
        self.pending = ""  # decoded but not emitted: could be the start of a stop string

    def feed(self, token: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string was completed)."""
        return self._emit(self.decoder.feed(token) if self.decoder is not None else "")

    def finish(self) -> str:
        """The rest (an unfinished character, held text) at the end of the row."""
        piece, stopped = self._emit(self.decoder.flush() if self.decoder is not None else "")
        if not stopped:
            piece, self.pending = piece + self.pending, ""
        return piece

    def _emit(self, piece: str) -> tuple[str, bool]:
        if not self.stop:
            return piece, False
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        out, self.pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        return out, False

