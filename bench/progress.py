"""A plain-text progress bar on stderr (no dependency).  On a terminal it redraws
one line; into a file or pipe it writes a line at most every few seconds."""

import sys
import time


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total, enabled=True, stream=None, width=28, interval=5.0):
        self.total, self.done = max(0, total), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width, self.interval = width, interval
        self.start = self.last = time.perf_counter()
        self.label = ""

    def add(self, n):
        self.total += n

    def line(self):
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {100 * frac:3.0f}% {self.done}/{self.total} "
                f"{_clock(elapsed)} elapsed, ~{_clock(eta)} left  {self.label}")

    def _draw(self, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            cols = 118
            self.stream.write("\r" + self.line()[:cols].ljust(cols))
            self.stream.flush()
        elif force or now - self.last >= self.interval or self.done == self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last = now

    def step(self, label="", n=1):
        self.done = min(self.total, self.done + n)
        self.label = label
        self._draw()

    def note(self, message):
        """A message on its own line, the bar redrawn under it."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 118 + "\r")
        self.stream.write(message + "\n")
        self.stream.flush()
        self._draw(force=self.tty)

    def close(self):
        if self.enabled:
            self._draw(force=self.tty or self.done != self.total)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
