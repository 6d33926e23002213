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
        self._prefix = 0  # ids[_prefix:_read] decode to the text's last settled piece
        self._read = 0

    def push(self, token: int) -> str:
        """Add a token; the text now safe to show (nothing once a stop string has ended the text)."""
        self.ids.append(token)
        if self.stopped_by is not None:
            return ""
        settled = self.decode(self.ids[self._prefix : self._read])
        window = self.decode(self.ids[self._prefix :])
        if len(window) <= len(settled) or window.endswith("\ufffd"):  # a character cut between tokens: wait
            return ""
        self.text += window[len(settled) :]
        self._prefix, self._read = self._read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped_by = self.text[:at], s
                return self._take(len(self.text))
        return self._take(len(self.text) - self._hold())

    def finish(self) -> str:
        """The held-back rest, once no more tokens come (a character cut at the end decodes as U+FFFD)."""
        if self.stopped_by is None:
            settled = self.decode(self.ids[self._prefix : self._read])
            self.text += self.decode(self.ids[self._prefix :])[len(settled) :]
            self._prefix = self._read = len(self.ids)
        return self._take(len(self.text))

    def _hold(self) -> int:
        """The length of the text's longest end that a stop string starts with."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
