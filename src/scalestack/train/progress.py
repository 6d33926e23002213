"""What rank 0 shows while training: on a terminal a bar redrawn in place (loss, tokens/s, memory, MFU, ETA);
into a file or a pipe one line every ``log_every`` steps, so logs stay readable."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, start: int, log_every: int, stream: TextIO | None = None, width: int = 20):
        self.total, self.start, self.log_every, self.width = total, start, log_every, width
        self.stream = stream if stream is not None else sys.stdout
        self.redraw = self.stream.isatty()
        self.line_open = False  # a redrawn bar waits for its newline
        self.t0 = time.perf_counter()

    def update(self, done: int, loss: float, tokens_per_s: float, peak_mib: float, mfu: float) -> None:
        """``done`` steps are complete (``start`` of them before this run)."""
        elapsed = time.perf_counter() - self.t0
        eta = (self.total - done) * elapsed / max(1, done - self.start)
        filled = self.width * done // self.total
        text = (f"step {done:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | {peak_mib:,.0f} MiB"
                f" | MFU {mfu:.1%} | {_duration(elapsed)} < {_duration(eta)}")  # fmt: skip
        if self.redraw:  # within the terminal's width: a wrapped line would not be redrawn in place
            text = text[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self.line_open = True
        elif done % self.log_every == 0 or done in (self.start + 1, self.total):
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End a redrawn bar's line, so what follows starts on its own line."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False
