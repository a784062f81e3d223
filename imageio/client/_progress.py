# -*- test-case-name: tests.test_client -*-
"""
Progress reports: a bar on a terminal, JSON lines for programs, nothing on
a pipe.

A progress object has upstream's interface (C{ovirt_imageio.client.ProgressBar}):
the C{size} attribute is set once the size is known, C{update(n)} is called
after every request with the bytes it moved, and C{close()} at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import IO

from attrs import define, field

#: Seconds between two redraws of the text bar.
REDRAW_INTERVAL = 0.1


def humanSize(n: float) -> str:
    """
    @return: C{n} bytes in binary units, two decimals.
    """
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("not reached")


@define
class Progress:
    """
    Counts transferred bytes and draws them.

    @ivar description: What is transferred (C{upload}, C{download}, ...).
    @ivar size: Total bytes, once known.
    @ivar now: Monotonic clock, in seconds.
    """

    description: str = ""
    size: int | None = None
    now: Callable[[], float] = time.monotonic
    transferred: int = field(default=0, init=False)
    _start: float = field(default=0.0, init=False)
    _closed: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._start = self.now()

    @property
    def elapsed(self) -> float:
        return self.now() - self._start

    def update(self, n: int) -> None:
        if self._closed:
            return
        self.transferred += n
        self.draw(last=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.draw(last=True)

    def draw(self, last: bool) -> None:
        """
        Show the progress; C{last} for the final report.
        """


@define
class JSONProgress(Progress):
    """
    One JSON line per percent of progress, and a last one:
    C{{"transferred": N, "size": N, "elapsed": seconds, "description": "..."}}.
    """

    output: IO[str] | None = None
    _percent: int = field(default=-1, init=False)

    def draw(self, last: bool) -> None:
        if self.output is None:
            return
        size = self.size or 0
        percent = self.transferred * 100 // size if size else 0
        if not last and percent <= self._percent:
            return
        self._percent = percent
        line = {
            "transferred": self.transferred,
            "size": self.size,
            "elapsed": round(self.elapsed, 3),
            "description": self.description,
        }
        self.output.write(json.dumps(line) + "\n")
        self.output.flush()


@define
class TextProgress(Progress):
    """
    A one-line bar redrawn in place: percent, bytes, rate and time left.
    """

    output: IO[str] | None = None
    width: int = 79
    _lastDraw: float = field(default=-1.0, init=False)

    def draw(self, last: bool) -> None:
        if self.output is None:
            return
        now = self.now()
        if not last and now - self._lastDraw < REDRAW_INTERVAL:
            return
        self._lastDraw = now
        elapsed = now - self._start
        size = self.size or 0
        percent = f"{self.transferred * 100 // size:3d}%" if size else "----"
        rate = self.transferred / elapsed if elapsed > 0 else 0.0
        line = f"[ {percent} ] {humanSize(self.transferred)}, {elapsed:.2f} s, {humanSize(rate)}/s"
        if not last and size and rate > 0:
            line += f", ETA {max(0.0, (size - self.transferred) / rate):.0f} s"
        if self.description:
            line += f" | {self.description}"
        self.output.write(line.ljust(self.width) + ("\n" if last else "\r"))
        self.output.flush()
