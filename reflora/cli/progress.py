"""Dependency-free progress bars on stderr (stdlib only, so any layer may use them)."""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["ByteProgress", "ProgressBar"]


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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ByteProgress:
    """Bytes done of a known total, with the rate and an ETA; thread-safe ``advance``.

    On a TTY the line is redrawn at most every ``interval`` seconds; otherwise a
    line is printed at each 10% and at the end, e.g.
    ``[###...] 0.98 GiB / 1.97 GiB  412.3 MiB/s  ETA 0:02  merged model.layers.9.mlp.up_proj.weight``.
    """

    def __init__(self, total: int, stream=None, width: int = 30, interval: float = 0.2, clock=time.monotonic):
        self.total, self.width, self.interval = max(int(total), 1), width, interval
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.t0 = clock()
        self.done = 0
        self._lock = threading.Lock()
        self._last_draw = -1.0
        self._last_decile = -1

    def line(self, text: str = "") -> str:
        frac = min(1.0, self.done / self.total)
        fill = int(frac * self.width)
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = _clock(eta) if eta != float("inf") else "?"
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {_size(self.done)} / {_size(self.total)}  "
                f"{_size(rate)}/s  ETA {eta_s}  {text}").rstrip()

    def advance(self, nbytes: int, text: str = "") -> None:
        with self._lock:
            self.done += int(nbytes)
            now = self.clock()
            end = self.done >= self.total
            if self.tty:
                if end or now - self._last_draw >= self.interval:
                    self._last_draw = now
                    self.stream.write("\r" + self.line(text) + ("\n" if end else ""))
                    self.stream.flush()
            else:
                decile = min(10, self.done * 10 // self.total)
                if decile > self._last_decile:
                    self._last_decile = decile
                    print(self.line(text), file=self.stream, flush=True)
