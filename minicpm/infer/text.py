"""From generated token ids to text: printable pieces as tokens arrive, cut at the first stop string."""

from __future__ import annotations

from typing import Callable, Sequence


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def open_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string (a proper prefix of one): text
    that must not be shown yet."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Turns token ids into printable pieces of text as they arrive.

    It holds back the bytes of an unfinished UTF-8 character (a byte-level tokenizer splits one character over
    several tokens) and, given stop strings, any end of the text that could be the start of one; when a stop
    string appears the text is cut where it begins and `stopped` turns true.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cut = first_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._advance(cut)
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        return self._advance(len(text) - open_stop_length(text, self.stops))

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        if not self.stopped:
            self.text = self.decode(self.ids)
        return self._advance(len(self.text))

    def _advance(self, upto: int) -> str:
        piece = self.text[self.printed:upto]
        self.printed = max(self.printed, upto)
        return piece
