"""Docker slots: a host-wide cap on how many runs hold Docker machines at once.

Under TCG a Docker machine keeps a host core busy for minutes; more of them than cores only
makes each one slower and all of them late. Runs are separate processes, so the cap is a set
of flock'd files, ``STATE_DIR/vm/slots/<n>``: a run holds one while it has any Docker machine,
and the kernel frees it when the process dies, so a killed run never leaks its slot. A run's
``fork_from`` branches share its slot: a run waiting for a second slot while holding one could
deadlock with another doing the same.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import PermanentInfraError

POLL_FIRST, POLL_MAX = 0.05, 1.0  # seconds between attempts while every slot is taken


def slot_count(configured: int) -> int:
    """Return how many slots there are: ``configured``, or one per CPU core when it is 0."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


def acquire_slot(
    directory: Path,
    count: int,
    *,
    on_wait: Callable[[str], None] | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> Callable[[], None]:
    """Take one of ``count`` slots, waiting (and saying so once) while all are taken; return its release."""
    directory.mkdir(parents=True, exist_ok=True)
    pause, waited, started = POLL_FIRST, False, time.monotonic()
    while True:
        for n in range(count):
            fd = os.open(directory / str(n), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for people looking
            if waited and on_wait is not None:
                on_wait(f"got a Docker slot after {time.monotonic() - started:.0f}s")
            return lambda: os.close(fd)
        if not waited:
            waited = True
            if on_wait is not None:
                holders = ", ".join(_holders(directory, count)) or "other runs"
                on_wait(f"waiting for a Docker slot: all {count} are in use ({holders}; DOCKER_SLOTS={count})")
        if interrupted is not None and interrupted():
            raise PermanentInfraError("the run was stopped while it waited for a Docker slot")
        time.sleep(pause)
        pause = min(pause * 2, POLL_MAX)


def _holders(directory: Path, count: int) -> list[str]:
    found = []
    for n in range(count):
        try:
            pid = (directory / str(n)).read_text().strip()
        except OSError:
            continue
        if pid.isdigit():
            found.append(f"pid {pid}")
    return found


class RunSlot:
    """The one slot of a run: taken for its first Docker machine, given back after its last.

    Counted per executor (one per run); thread-safe. Only taking it can wait, and only while
    the run has no machine, so a machine's close never waits behind it.
    """

    def __init__(
        self,
        directory: Path,
        count: int,
        on_wait: Callable[[str], None] | None = None,
        interrupted: Callable[[], bool] | None = None,
    ):
        self.directory, self.count = directory, count
        self.on_wait, self.interrupted = on_wait, interrupted
        self._lock = threading.Lock()
        self._users = 0
        self._release: Callable[[], None] | None = None

    def hold(self) -> None:
        """Count one more machine; the first one waits for a host-wide slot."""
        with self._lock:
            if self._users == 0:
                self._release = acquire_slot(
                    self.directory, self.count, on_wait=self.on_wait, interrupted=self.interrupted
                )
            self._users += 1

    def drop(self) -> None:
        """Count one machine fewer; the last one gives the slot back."""
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._release is not None:
                self._release()
                self._release = None
