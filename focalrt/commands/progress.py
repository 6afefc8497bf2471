"""One progress line that suits where stderr goes: redrawn in place on a terminal, whole lines in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """On a TTY, `update` redraws one line with `\\r` at most every `tty_interval_s`; when stderr is a pipe
    or a file, it writes a whole line at most every `log_interval_s`, so a log stays one event per line."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, tty_interval_s: float = 0.5,
                 log_interval_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = tty_interval_s if self.tty else log_interval_s
        self._last = time.monotonic() if not self.tty else 0.0  # a log's first line after one interval
        self._open = False  # a TTY line is drawn and not yet ended

    def update(self, text: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """End a line drawn in place, so what follows starts on its own line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
