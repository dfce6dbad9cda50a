"""What long-running commands print on stderr.

`StatusLine`: one progress line for long loops, rewritten in place (carriage return) on a
terminal; in a log file (no terminal) a plain line at most every `every_s` seconds, so logs of
long runs stay readable instead of holding thousands of carriage-return updates.

`say`: one tagged line ("[rlhf] round 1: ...") from a driver that chains stages, so its own
messages stand out among the stages' output."""

from __future__ import annotations

import sys
import time


class StatusLine:
    def __init__(self, every_s: float = 15.0, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.last = float("-inf")
        self.pending = False  # a terminal line was written without its newline

    def update(self, msg: str, force: bool = False) -> None:
        """Show `msg`; `force` writes it to a log file even inside the interval (a last update)."""
        if self.tty:
            print("\r" + msg, end="", file=self.stream, flush=True)
            self.pending = True
            return
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            print(msg, file=self.stream, flush=True)

    def done(self, msg: str | None = None) -> None:
        """Finish the line (and show a last message, always)."""
        if msg is not None:
            self.update(msg, force=True)
        if self.tty and self.pending:
            print(file=self.stream, flush=True)
        self.pending = False


def say(tag: str, msg: str) -> None:
    """Print `msg` on stderr as a line tagged with the driver's name: `[tag] msg`."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)
