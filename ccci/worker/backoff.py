"""Backoff: when the worker may ask the forge about something again after a transient failure."""

from __future__ import annotations

import time
from collections.abc import Hashable

FIRST, LONGEST = 5.0, 300.0  # seconds: the first pause, and the longest


class Backoff:
    """Per-key pauses that double with each failure, and when each key first failed."""

    def __init__(self, first: float = FIRST, longest: float = LONGEST):
        self.first, self.longest = first, longest
        self._next: dict[Hashable, tuple[float, float]] = {}  # key -> (when it is due, last pause)
        self._since: dict[Hashable, float] = {}  # key -> its first failure

    def due(self, key: Hashable, now: float | None = None) -> bool:
        """Tell whether ``key`` may be tried now."""
        retry = self._next.get(key)
        return retry is None or retry[0] <= (time.time() if now is None else now)

    def failed(self, key: Hashable) -> float:
        """Record a failure of ``key``; return the pause before it is due again."""
        _, pause = self._next.get(key, (0.0, self.first / 2))
        pause = min(pause * 2, self.longest)
        self._next[key] = (time.time() + pause, pause)
        self._since.setdefault(key, time.time())
        return pause

    def failing_for(self, key: Hashable) -> float:
        """Return how long ``key`` has been failing, in seconds (0 when it never failed)."""
        since = self._since.get(key)
        return 0.0 if since is None else time.time() - since

    def clear(self, key: Hashable) -> None:
        """Forget ``key``: it succeeded, or it ended."""
        self._next.pop(key, None)
        self._since.pop(key, None)

    def next_due(self) -> float | None:
        """Return when the earliest key is due again, or None when nothing waits."""
        return min((at for at, _ in self._next.values()), default=None)
