"""Generated token ids as text a reader may see: decoded without special tokens, released only once final.

Decoding is done as the tokens spell the text, without transformers' clean-up of spaces (which rewrites text
already released, e.g. " ," into ","), so the text of more tokens always begins with the text of fewer: what
was streamed never has to be taken back, and the streamed pieces add up to the whole answer.
"""

from __future__ import annotations

from collections.abc import Sequence


def decode(tokenizer, ids) -> str:
    """The text of generated ids, as everything ctcspec shows it (generate, chat, the server)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string in `text` begins, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found, default=-1)


def open_stop(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (a stop string that may still complete)."""
    return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-n:])), 0)


class ReleasedText:
    """The text of generated ids as a client may see it so far: cut before the first stop string, and holding
    back a trailing incomplete character and any tail that could still grow into a stop string.

    Invariant: the released text is always a prefix of the final text (`text()` once generation has ended)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.released = 0   # characters handed out

    @property
    def stopped(self) -> bool:
        """Whether the text holds a stop string (and so ends before it)."""
        return first_stop(decode(self.tokenizer, self.ids), self.stops) >= 0

    def text(self) -> str:
        text = decode(self.tokenizer, self.ids)
        cut = first_stop(text, self.stops)
        return text if cut < 0 else text[:cut]

    def add(self, ids: Sequence[int]) -> str:
        """Append ids; the newly releasable text."""
        self.ids.extend(ids)
        text = decode(self.tokenizer, self.ids)
        cut = first_stop(text, self.stops)
        if cut < 0:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
            cut = len(text) - max((open_stop(text, s) for s in self.stops), default=0)
        return self._release(text[:cut])

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        return self._release(self.text())

    def _release(self, text: str) -> str:
        new = text[self.released:]
        self.released = max(self.released, len(text))
        return new
