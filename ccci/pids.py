"""A process named for good: its pid together with its start time.

Pids are reused; the start time of a reused pid differs. Lock holders, ABRA_DIR owners and VM
fork owners all record both, so a janitor never mistakes a new process for a dead owner.
"""

from __future__ import annotations

from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """Return when ``pid`` started (clock ticks since boot), or None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its parent has not collected it yet
        return None
    return int(fields[19])  # field 22 of proc(5), counted from field 3


def process_alive(pid: int, start_time: int | None) -> bool:
    """Return True if the process ``pid`` that started at ``start_time`` still exists."""
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)
