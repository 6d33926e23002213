"""Generated token ids to text deltas: whole characters only, and nothing that may yet turn out to be the
start of a stop string (it is held back until it cannot). Decoding is incremental (a window of the last
tokens, as Hugging Face's streamers do), so a long output costs O(1) per token."""

from __future__ import annotations

MAX_STOP_CHARS = 256


class TextStream:
    def __init__(self, decode, stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (whole characters), cut at a stop string
        self.sent = 0  # characters of ``text`` already returned
        self.stopped_by: str | None = None  # the stop string that ended the text
        self._prefix = 0  # ids[_prefix:_read] decode to ``_settled``, the text's last settled piece
        self._read = 0
        self._settled = ""

    def push(self, token: int) -> str:
        """Add a token; the text now safe to show (nothing once a stop string has ended the text)."""
        self.ids.append(token)
        if self.stopped_by is not None:
            return ""
        window = self.decode(self.ids[self._prefix :])
        if len(window) <= len(self._settled) or window.endswith("\ufffd"):  # a character cut between tokens
            return ""
        self.text += window[len(self._settled) :]
        self._settled = self.decode(self.ids[self._read :])
        self._prefix, self._read = self._read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped_by = self.text[:at], s
                return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stop))

    def finish(self) -> str:
        """The held-back rest, once no more tokens come (a character cut at the end decodes as U+FFFD)."""
        if self.stopped_by is None:
            self.text += self.decode(self.ids[self._prefix :])[len(self._settled) :]
            self._prefix = self._read = len(self.ids)
            self._settled = ""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


def held_back(text: str, markers: list[str]) -> int:
    """The length of ``text``'s longest end that one of ``markers`` starts with (it may yet become one)."""
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), hold, -1):
            if text.endswith(marker[:k]):
                hold = k
                break
    return hold
