"""Generated token ids as text a reader may see: decoded without special tokens, released only once final."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string in `text` begins, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found, default=-1)


class ReleasedText:
    """The text of generated ids as a client may see it so far: decoded without special tokens, cut before the
    first stop string, and holding back a trailing incomplete character and any tail that could still grow into a
    stop string (so streamed text never has to be taken back)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.released = 0   # characters handed out

    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        return text if cut < 0 else text[:cut]

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; the newly releasable text."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        if cut >= 0:
            end = cut
        else:
            end = len(text) - len(text.rstrip("\ufffd"))   # an unfinished multi-byte character
            end = len(text) - max([end, *(self._open_stop(text, s) for s in self.stops)])
        return self._release(text[:end])

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        return self._release(self.text())

    def _release(self, text: str) -> str:
        new = text[self.released:]
        self.released = max(self.released, len(text))
        return new

    @staticmethod
    def _open_stop(text: str, stop: str) -> int:
        """Length of the longest end of `text` that begins `stop`."""
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-n:])), 0)
