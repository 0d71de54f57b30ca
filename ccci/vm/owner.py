"""Owner tags: every fork file carries the pid of the process that owns it, and entropy.

A tag looks like ``fork-4242-9f3a0c1e``: the kind, the owner's pid, 8 hex digits of per-instance
entropy, so two machines of one process, or of two processes, never share a name. The owner's
start time is written next to the files, so a recycled pid does not pass for the old owner.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from ..pids import process_start_time

TAG = re.compile(r"^(?P<kind>[a-z]+)-(?P<pid>\d+)-(?P<entropy>[0-9a-f]{8})$")
OWNER_FILE = "owner"


def new_tag(kind: str) -> str:
    """Return a fresh name for a resource owned by this process."""
    return f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def claim(directory: Path) -> None:
    """Record this process as the owner of ``directory``."""
    (directory / OWNER_FILE).write_text(f"{os.getpid()} {process_start_time(os.getpid())}\n")


def owner_pid(name: str) -> int | None:
    """Return the owner pid a tagged name carries, or None if the name is not a tag."""
    m = TAG.match(name)
    return int(m.group("pid")) if m else None


def owner_alive(path: Path) -> bool:
    """Whether the process that owns ``path`` (a tagged name) still runs."""
    pid = owner_pid(path.name)
    if pid is None:
        return True  # not ours to judge
    started = process_start_time(pid)
    if started is None:
        return False
    try:
        recorded = (path / OWNER_FILE).read_text().split()
    except (OSError, NotADirectoryError):
        return True  # being created right now, or a plain file: the pid alone decides
    return len(recorded) < 2 or recorded[1] == str(started)
