"""A dependency-free progress line for long jobs: count, rate and ETA, redrawn at most 5 times a second."""

from __future__ import annotations

import math
import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None, unit: str = "images", log_lines: int = 10):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.done = self.drawn = 0
        self.started = self.last_draw = time.perf_counter()
        # In a log file (not a terminal) redrawing in place makes one endless line: write
        # `log_lines` separate lines instead (0: none, when the caller logs its own summary).
        self.interactive = self.stream.isatty()
        self.log_step = 1 / log_lines if log_lines else math.inf
        self.next_line = self.log_step

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.interactive and (now - self.last_draw >= 0.2 or self.done >= self.total):
            self.last_draw = now
            self.draw(now)
        elif not self.interactive and self.total and self.done / self.total >= self.next_line:
            self.next_line = (math.floor(self.done / self.total / self.log_step) + 1) * self.log_step
            self.draw(now)

    def draw(self, now: float) -> None:
        self.drawn = self.done
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        eta_text = f"{eta:4.0f}s" if eta != float("inf") else "   ?"
        line = f"{self.label} [{bar}] {self.done}/{self.total} {self.unit}  {rate:6.1f}/s  ETA {eta_text}"
        self.stream.write(f"\r{line}" if self.interactive else f"{line}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line, for work that prints its own summary in its place."""
        if self.interactive:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def close(self) -> float:
        """Finish the line; returns the elapsed seconds."""
        elapsed = time.perf_counter() - self.started
        if (self.drawn != self.done or not self.total) and (self.interactive or self.log_step != math.inf):
            self.draw(time.perf_counter())
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()
        return elapsed
