"""Progress display: tqdm when it is installed and stderr is a terminal, else plain lines."""
from __future__ import annotations

import sys
import time


class Progress:
    """Cases done, cases/s and failures so far. Without a terminal, one line every
    `every` seconds (logs stay readable); never required for anything to work."""

    def __init__(self, total=None, label="fuzz", stream=None, every=10.0, enabled=True):
        self.stream = stream or sys.stderr
        self.total, self.label, self.every = total, label, every
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.done = self.failures = 0
        self.bar = None
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=label, unit="case", file=self.stream,
                                dynamic_ncols=True, smoothing=0.1)

    def update(self, done: int, failures: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
            if failures != self.failures:
                self.bar.set_postfix(failures=failures)
        self.done, self.failures = done, failures
        now = time.monotonic()
        if self.bar is None and now - self.last >= (0.2 if self.tty else self.every):
            self.last = now
            self._line("\r" if self.tty else "", "" if self.tty else "\n")

    def _line(self, head, tail):
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed else 0.0
        of = f"/{self.total}" if self.total else ""
        self.stream.write(f"{head}[{self.label}] {self.done}{of} cases, {rate:.1f} cases/s, "
                          f"{self.failures} failures, {elapsed:.0f} s{tail}")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._line("\r" if self.tty else "", "\n")
