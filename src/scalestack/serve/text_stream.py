"""Generated token ids to text deltas: whole UTF-8 characters only, and nothing that may yet turn out to be
the start of a stop string (it is held back until it cannot)."""

from __future__ import annotations


class TextStream:
    def __init__(self, decode, stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (whole characters)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped_by: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        """Add a token; the text now safe to show."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for its remaining bytes
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped_by = text[:at], s
                return self._take(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def finish(self) -> str:
        """The held-back rest, once no more tokens come (a character cut at the end decodes as U+FFFD)."""
        if self.stopped_by is None:
            self.text = self.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
