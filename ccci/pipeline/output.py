"""Step output: one stream's bytes, kept bounded as they arrive, with ``::metric`` lines parsed.

A chatty or looping step must not balloon a run's memory, so a stream keeps at most ``limit``
bytes: the first half and the most recent half. What was cut in between is replaced by one
marker line saying how many bytes were dropped. Metrics are parsed line by line as the bytes
arrive, so a metric printed in the cut middle still counts. Secrets are redacted when the text
is finished, not per chunk, because a secret can straddle two chunks.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable

from .redact import Redactor

DEFAULT_LIMIT = 1 << 20
_METRIC = re.compile(rb"^\s*::metric\s+([A-Za-z_][A-Za-z0-9_.:/-]*)=(\S+)\s*$")
_LONGEST_LINE = 64 * 1024  # a partial line longer than this is not a metric; stop buffering it

LineSink = Callable[[str], None]


def parse_metric(line: bytes) -> tuple[str, int | float] | None:
    """Return (key, number) if ``line`` is a ``::metric <key>=<number>`` line."""
    match = _METRIC.match(line)
    if not match:
        return None
    raw = match.group(2).decode("ascii", "replace")
    try:
        value: int | float = int(raw)
    except ValueError:
        try:
            value = float(raw)
        except ValueError:
            return None
        if not math.isfinite(value):  # JSON has no NaN or Infinity
            return None
    return match.group(1).decode(), value


def cut_marker(dropped: int) -> str:
    """Return the line that stands for ``dropped`` bytes cut from the middle of an output."""
    return f"\n[ccci: {dropped} bytes of output cut here]\n"


class StreamBuffer:
    """One output stream (stdout or stderr) of one step: bounded head + tail, metrics, live lines."""

    def __init__(self, limit: int = DEFAULT_LIMIT, *, metrics: bool = False, on_line: LineSink | None = None):
        self.limit = max(limit, 2)
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0
        self._line = bytearray()
        self._parse_metrics = metrics
        self._on_line = on_line
        self.metrics: dict[str, int | float] = {}
        self._lock = threading.Lock()  # chunks may arrive from a reader thread while we finish

    def write(self, chunk: bytes) -> None:
        """Append a chunk of raw output."""
        with self._lock:
            self._keep(chunk)
            if self._parse_metrics or self._on_line:
                self._scan(chunk)

    def _keep(self, chunk: bytes) -> None:
        half = self.limit // 2
        room = half - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self._tail += chunk
        excess = len(self._tail) - (self.limit - half)
        # Trim in batches (when the tail is twice its size) so that a stream of small chunks
        # does not copy the whole tail on every write.
        if excess > 0 and len(self._tail) >= 2 * (self.limit - half):
            del self._tail[:excess]
            self._dropped += excess

    def _scan(self, chunk: bytes) -> None:
        self._line += chunk
        *lines, rest = self._line.split(b"\n")
        for line in lines:
            self._emit(bytes(line))
        self._line = bytearray(rest[-_LONGEST_LINE:])

    def _emit(self, line: bytes) -> None:
        if self._parse_metrics:
            metric = parse_metric(line)
            if metric:
                self.metrics[metric[0]] = metric[1]
        if self._on_line:
            self._on_line(line.decode("utf-8", "replace"))

    def finish(self, redact: Redactor) -> str:
        """Flush the last partial line and return the kept text, redacted, with a cut marker if cut."""
        with self._lock:
            if self._line:
                self._emit(bytes(self._line))
                self._line = bytearray()
            tail_keep = self.limit - self.limit // 2
            if len(self._tail) > tail_keep:
                self._dropped += len(self._tail) - tail_keep
                del self._tail[: len(self._tail) - tail_keep]
            if not self._dropped:  # nothing cut: one text, so a character split between head and tail stays whole
                return redact((self._head + self._tail).decode("utf-8", "replace"))
            head = redact.strip_partial(redact(self._head.decode("utf-8", "replace")), at_end=True)
            tail = redact.strip_partial(redact(self._tail.decode("utf-8", "replace")), at_end=False)
            return head + cut_marker(self._dropped) + tail
