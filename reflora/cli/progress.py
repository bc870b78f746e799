"""A dependency-free progress bar on stderr (stdlib only, so any layer may use it)."""

from __future__ import annotations

import sys

__all__ = ["ProgressBar"]


class ProgressBar:
    """A dependency-free progress bar on stderr (a line every 10% when not a TTY)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.width = max(total, 1), width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def update(self, i: int, text: str) -> None:
        done = (i + 1) / self.total
        bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
        line = f"[{bar}] {i + 1:>5}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line)
            if i + 1 == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif int(done * 10) > self._last_decile or i == 0:
            self._last_decile = int(done * 10)
            print(line, file=self.stream, flush=True)
