"""ReleasedText: what is streamed is always a prefix of the final text, which ends before the first stop string,
and the pieces add up to it; no piece holds half a character (hypothesis, with a byte-level tokenizer so
characters split across tokens)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ctcspec.text import ReleasedText, first_stop

PIECES = ["a", "b", " ", ",", "€"]  # "€" is three bytes: a token of one byte leaves it unfinished


class ByteTokenizer:
    """Token i is byte i; decoding replaces an unfinished character with U+FFFD, as real byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


texts = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(texts.filter(bool), max_size=3), st.data())
def test_released_pieces_add_up_to_the_answer_before_the_first_stop(text, stops, data):
    ids = list(text.encode())
    tokenizer = ByteTokenizer()
    # generation ends at the first token after which the text holds a stop string (the server's EndCriteria)
    ends = [n for n in range(1, len(ids) + 1) if first_stop(tokenizer.decode(ids[:n]), stops) >= 0]
    ids = ids[: ends[0]] if ends else ids
    full = tokenizer.decode(ids)
    cut = first_stop(full, stops)
    expected = full if cut < 0 else full[:cut]
    released = ReleasedText(tokenizer, stops)
    pieces, start = [], 0
    while start < len(ids):  # the ids in steps of random sizes, as the engine emits them
        size = data.draw(st.integers(1, 4))
        piece = released.add(ids[start:start + size])
        assert "\ufffd" not in piece
        pieces.append(piece)
        start += size
        assert expected.startswith("".join(pieces))  # never a character that has to be taken back
    pieces.append(released.finish())
    assert "".join(pieces) == expected == released.text()
    assert released.stopped == (cut >= 0)
