"""Kill targets: the processes of ``ccci serve``'s tree, found through /proc, and SIGKILL for one of them.

    python -m ccci serve              master   the gunicorn arbiter (the serve process itself)
    ├── gunicorn web worker           web      forked by the arbiter
    └── python -m ccci worker         worker   spawned by serve's supervisor thread
        └── python -m ccci run …      harness  one per running run (setpriv execs into it)
            └── bwrap … /bin/sh -c    step     the step's shell, recognised by the drill's token
                                               in its command (reapers' steps count too)

A child belongs to the thread that forked it, so children are read from every thread's
``/proc/<pid>/task/<tid>/children``. A target is named by its pid *and* start time, and killed
through a pidfd opened after that start time was checked again: a pid reused between finding
and killing is never hit.

A harness whose worker died is no longer in the tree (it was reparented): it tears its run down
on its own, and the next worker adopts it. Such strays — a harness of this drill's forge that is
not below the current worker — are targets too, so that a kill can also land in a teardown
nobody supervises any more.
"""

from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

from ccci.pids import process_start_time

KINDS = ("master", "web", "worker", "harness", "step")


@dataclass(frozen=True)
class Target:
    """One process of the serve tree: what it is, and for a harness or step, which run."""

    kind: str
    pid: int
    start: int
    run: str = ""  # the run id, for a harness and the steps below it
    stray: bool = False  # a harness (or its step) outside the tree: its worker died


def children(pid: int) -> list[int]:
    """Return the children of every thread of ``pid`` (empty when it is gone)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def argv(pid: int) -> list[str]:
    """Return the command line of ``pid`` (empty when it is gone or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def serve_tree(master: int, token: str, forge_url: str = "") -> list[Target]:
    """Return the live, classified processes of the serve tree rooted at ``master``.

    With ``forge_url``, stray harnesses of runs of that forge (and their steps) are added.
    """
    start = process_start_time(master)
    if start is None:
        return []
    found = [Target("master", master, start)]
    for pid in children(master):
        args = argv(pid)
        started = process_start_time(pid)
        if started is None:
            continue
        if _is_ccci(args, "worker"):
            found.append(Target("worker", pid, started))
            found += _below(pid, token, run="", stray=False)
        else:
            found.append(Target("web", pid, started))
    if forge_url:
        known = {t.pid for t in found}
        for pid in _pids():
            args = argv(pid)
            started = process_start_time(pid)
            mine = _option(args, "--clone-url").startswith(forge_url.rstrip("/") + "/")
            if pid in known or started is None or not _is_ccci(args, "run") or not mine:
                continue
            run = _option(args, "--run-id")
            found += [Target("harness", pid, started, run, stray=True), *_below(pid, token, run, stray=True)]
    return found


def _below(parent: int, token: str, run: str, stray: bool) -> list[Target]:
    """Return the harnesses and step shells among the descendants of ``parent``."""
    found: list[Target] = []
    for pid in children(parent):
        args = argv(pid)
        started = process_start_time(pid)
        if started is None:
            continue
        own_run = run
        if _is_ccci(args, "run"):
            own_run = _option(args, "--run-id")
            found.append(Target("harness", pid, started, own_run, stray))
        elif len(args) >= 3 and args[0] == "/bin/sh" and args[1] == "-c" and token in args[2]:
            found.append(Target("step", pid, started, own_run, stray))
        found += _below(pid, token, own_run, stray)
    return found


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _is_ccci(args: list[str], command: str) -> bool:
    """Tell whether ``args`` is ``python -m ccci <command> …``."""
    for i in range(len(args) - 2):
        if args[i] == "-m" and args[i + 1] == "ccci":
            return args[i + 2] == command
    return False


def _option(args: list[str], name: str) -> str:
    try:
        return args[args.index(name) + 1]
    except (ValueError, IndexError):
        return ""


def sigkill(target: Target) -> bool:
    """Send SIGKILL to ``target`` if it is still that very process; return whether it was sent."""
    try:
        fd = os.pidfd_open(target.pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if process_start_time(target.pid) != target.start:
            return False  # exited, or the pid now names another process: the pidfd holds that one
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(target: Target, timeout: float) -> bool:
    """Wait until ``target`` has exited (its pidfd turns readable); return False on timeout."""
    try:
        fd = os.pidfd_open(target.pid)
    except (ProcessLookupError, OSError):
        return True
    try:
        if process_start_time(target.pid) != target.start:
            return True
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or process_start_time(target.pid) != target.start
    finally:
        os.close(fd)


def processes_mentioning(needles: list[str], under: Path, exclude: set[int]) -> list[tuple[int, str]]:
    """Return (pid, command line) of every process whose command line holds a needle or whose cwd is under ``under``."""
    found = []
    for pid in _pids():
        entry = Path(f"/proc/{pid}")
        if pid in exclude or process_start_time(pid) is None:
            continue  # gone, or a zombie its parent has yet to collect
        line = " ".join(argv(pid))
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if any(n in line for n in needles) or cwd == str(under) or cwd.startswith(str(under) + "/"):
            found.append((pid, line[:300]))
    return found
