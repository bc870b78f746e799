"""The byte progress bar: bytes done of the total, rate and ETA, a line per 10% off a TTY, thread-safe."""

from __future__ import annotations

import io
import threading

from reflora.cli.progress import ByteProgress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bytes_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = ByteProgress(4 * 2**30, stream=out, clock=clock)
    clock.t += 10.0
    bar.advance(2**30, "merged a")  # 1 GiB in 10 s: 102.4 MiB/s, 3 GiB left: 30 s
    line = out.getvalue().strip().splitlines()[-1]
    assert "1.00 GiB / 4.00 GiB" in line and "102.40 MiB/s" in line and "ETA 0:30" in line and line.endswith("merged a")
    assert line.startswith("[#######.......................]")
    clock.t += 3600.0
    bar.advance(2**30 // 4, "b")
    assert "ETA 2:" in out.getvalue().splitlines()[-1]  # hours shown as h:mm:ss


def test_one_line_per_tenth_off_a_tty_and_threads_add_up():
    out = io.StringIO()
    bar = ByteProgress(1000, stream=out)
    threads = [threading.Thread(target=lambda: [bar.advance(1) for _ in range(250)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert bar.done == 1000 and len(lines) == 11 and "1000 B / 1000 B" in lines[-1]  # the start, then each 10%
