"""Progress without a progress bar: one line every N images, for logs and `--no-progress` runs that
would otherwise print nothing for minutes."""

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class PeriodicReport:
    """`update(n)` as images are done; a line each time the count passes a multiple of `every`
    ("interactive: 50 of 200 images, 1m12s, 1.44 s/image"), and `close()` a last one. every=0: silent."""

    def __init__(self, label: str, every: int, *, total: int | None = None, stream: TextIO | None = None) -> None:
        if every < 0:
            raise ValueError(f"report every must be at least 0 images, got {every}")
        self.label, self.every, self.total = label, every, total
        self.stream = stream or sys.stderr
        self.count = self.reported = 0
        self.began = time.perf_counter()

    def _line(self, final: bool) -> None:
        seconds = time.perf_counter() - self.began
        of = f" of {self.total}" if self.total is not None else ""
        rate = f", {seconds / self.count:.2f} s/image" if self.count else ""
        print(f"{self.label}: {self.count}{of} images{' (done)' if final else ''}, {_duration(seconds)}{rate}", file=self.stream, flush=True)
        self.reported = self.count

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.every and self.count // self.every > self.reported // self.every:
            self._line(final=False)

    def close(self) -> None:
        if self.every:
            self._line(final=True)
