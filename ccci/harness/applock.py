"""App locks: at most one run per app domain, and a dead holder's app reaped exactly once.

One file per app domain, ``LOCK_DIR/<app-domain>.lock``, locked with ``flock(LOCK_EX)`` by the run
process for as long as the run may touch the app. The kernel drops the lock when that process
dies however it dies, so the file's state says everything::

    absent                            the app is free
    present, flock held               a live run holds it; the JSON inside says which
    present, flock free, JSON inside  its holder died without releasing: the app must be reaped
    present, flock free, empty        a holder died before writing its JSON (it had not started
                                      anything yet), or a waiter has just created the file

Two rules close the unlink/recreate race on both sides. Only a process that holds the flock
removes the file, and only after checking that the path still names the inode it holds (fstat
of the fd against stat of the path). Whoever wins a flock checks the same identity before
believing it: a waiter that wakes holding a removed inode retries on the fresh file, and a
reaper that wakes on one leaves it alone, because whoever removed it has reaped it already.
A clean release removes the file too, so a file without a live holder always means leftovers.

Waiting polls ``flock(LOCK_NB)`` with a backoff from 20 ms to 250 ms rather than blocking in
``flock``: a blocking flock cannot be given a time limit without a second timer signal (SIGALRM
is the run's deadline), and the waiter rereads the holder anyway to report changes. The sleep
between polls is a wait on the run's stop switch, so a canceled run stops waiting at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import logs
from ..errors import CcciError
from ..names import is_app_domain
from ..pids import process_alive, process_start_time
from ..pipeline.stop import Stop

log = logging.getLogger(__name__)

POLL_FIRST, POLL_MAX = 0.02, 0.25  # seconds between LOCK_NB attempts while waiting
SUFFIX = ".lock"

Reap = Callable[["LockHolder"], None]


@dataclass(frozen=True)
class LockHolder:
    """Who holds, or held, an app lock: a run, the process running it, and since when."""

    app_domain: str
    run_id: str = ""
    recipe: str = ""
    pid: int = 0
    pid_start: int | None = None  # with pid, names the process for good (pids are reused)
    started_at: float = 0.0  # epoch seconds when the lock was taken

    @classmethod
    def for_this_process(cls, *, run_id: str, recipe: str, app_domain: str) -> LockHolder:
        """Describe this process as the holder of ``app_domain`` for run ``run_id``."""
        pid = os.getpid()
        return cls(app_domain, str(run_id), recipe, pid, process_start_time(pid), time.time())

    def alive(self) -> bool:
        """Return True if the holder's process still exists."""
        return self.pid > 0 and process_alive(self.pid, self.pid_start)

    def since(self) -> str:
        """Return when the lock was taken, for people (UTC)."""
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))


class AppBusy(CcciError):
    """Another run held the app for longer than this run was willing to wait."""

    def __init__(self, app_domain: str, holder: LockHolder | None, waited: float, trigger: str = "!testme"):
        if holder is not None and holder.run_id:
            who = f"run {holder.run_id} ({holder.recipe}) has held it since {holder.since()}"
            then = f"once run {holder.run_id} has finished"
        else:
            who, then = "another run holds it", "once that run has finished"
        super().__init__(
            f"{app_domain} is busy: {who}, and this run gave up after waiting {_duration(waited)}. "
            f"Comment {trigger} again {then}."
        )
        self.app_domain = app_domain
        self.holder = holder
        self.waited = waited


@dataclass(frozen=True)
class LockInfo:
    """What one lock file says right now, for /admin and the janitor."""

    path: Path
    app_domain: str
    held: bool  # a live process holds the flock
    holder: LockHolder | None  # None: no readable holder JSON
    age: float | None  # seconds since the holder took it
    possible_leak: bool
    reason: str = ""  # why it is flagged; empty when it is not

    def to_dict(self) -> dict:
        """Return the lock as JSON-ready data, for /admin/runs."""
        return {
            "path": str(self.path),
            "app_domain": self.app_domain,
            "held": self.held,
            "holder": asdict(self.holder) if self.holder is not None else None,
            "age": self.age,
            "possible_leak": self.possible_leak,
            "reason": self.reason,
        }


class HeldLock:
    """A held app lock. Call it (or leave its ``with``) to release: the file is removed, then the flock dropped."""

    def __init__(self, fd: int, path: Path, holder: LockHolder, waited: float):
        self.fd: int | None = fd
        self.path = path
        self.holder = holder
        self.waited = waited  # seconds spent waiting for it

    def __call__(self) -> None:
        """Release the lock; calling it again does nothing."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            unlink_if_current(fd, self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self()


def lock_path(lock_dir: Path, app_domain: str) -> Path:
    """Return the lock file of ``app_domain``; refuse a name that is not a plain DNS name."""
    if not is_app_domain(app_domain):
        raise ValueError(f"{app_domain!r} is not an app domain (lowercase DNS name)")
    return lock_dir / (app_domain + SUFFIX)


def acquire_app_lock(
    lock_dir: Path,
    app_domain: str,
    holder: LockHolder,
    *,
    wait: float,
    reap: Reap,
    on_wait: Callable[[LockHolder | None], None] | None = None,
    trigger: str = "!testme",
    stop: Stop | None = None,
) -> HeldLock:
    """Take the lock of ``app_domain`` for ``holder``, waiting up to ``wait`` seconds; return its release.

    ``on_wait(holder)`` is called when the wait begins (with the current holder, or None if it
    cannot be read yet) and again whenever the holder changes. A lock left by a dead holder is
    reaped first with ``reap(dead_holder)`` while held, then this run takes a fresh file.
    Raises AppBusy when the wait runs out, and ``Stopped`` as soon as ``stop`` is requested.
    """
    if holder.app_domain != app_domain:
        raise ValueError(f"holder is for {holder.app_domain}, not {app_domain}")
    path = lock_path(lock_dir, app_domain)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    delay = POLL_FIRST
    reported: LockHolder | None = None  # the holder on_wait last heard about
    waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if try_flock(fd):
                if not fd_is_current(fd, path):
                    continue  # woke on a removed inode: the fresh file is the lock now
                previous = _read_holder(fd, app_domain)
                if previous is not None:
                    logs.for_run(log, previous.run_id).warning("died holding %s; reaping its app", app_domain)
                    reap(previous)
                    unlink_if_current(fd, path)
                    continue  # take a fresh file, never one that still names the dead run
                mine = replace(holder, started_at=time.time())
                _write_holder(fd, mine)
                lock = HeldLock(fd, path, mine, time.monotonic() - start)
                fd = -1  # handed over to the HeldLock
                return lock
            current = _read_holder(fd, app_domain)
        finally:
            if fd >= 0:
                os.close(fd)
        # Report the start of the wait, then only real changes: a holder whose JSON cannot be
        # read for a moment (being written) is not news.
        if not waiting or (current is not None and not _same(current, reported)):
            waiting = True
            reported = current if current is not None else reported
            if on_wait is not None:
                on_wait(current)
        remaining = wait - (time.monotonic() - start)
        if remaining <= 0:
            raise AppBusy(app_domain, reported, time.monotonic() - start, trigger)
        if stop is None:
            time.sleep(min(delay, remaining))
        elif stop.wait(min(delay, remaining)):
            stop.check()
        delay = min(delay * 2, POLL_MAX)


def probe_and_reap(lock_dir: Path, reap: Reap, *, app_domain: str | None = None) -> list[LockHolder]:
    """Reap the app of every dead holder under ``lock_dir`` exactly once; return those reaped.

    A lock whose flock can be taken has no live holder: ``reap(holder)`` runs while the lock is
    held, then the file is removed. A live holder is never touched. If ``reap`` raises, the file
    stays for the next sweep and the error is logged.
    """
    if app_domain is not None:
        paths = [lock_path(lock_dir, app_domain)]
    else:
        paths = sorted(lock_dir.glob("*" + SUFFIX)) if lock_dir.is_dir() else []
    reaped = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released or reaped since the listing
        try:
            if not try_flock(fd):
                continue  # a live holder
            if not fd_is_current(fd, path):
                continue  # someone else reaped and removed it while we waited for the flock
            holder = _read_holder(fd, _domain_of(path))
            if holder is not None:
                try:
                    reap(holder)
                except Exception:
                    logs.for_run(log, holder.run_id).exception(
                        "reaping %s of this dead run failed; the lock stays", holder.app_domain
                    )
                    continue
                reaped.append(holder)
                logs.for_run(log, holder.run_id).info("reaped %s of this dead run", holder.app_domain)
            unlink_if_current(fd, path)
        finally:
            os.close(fd)
    return reaped


def list_locks(lock_dir: Path, leak_after: float) -> list[LockInfo]:
    """Describe every lock under ``lock_dir``, flagging those that look leaked (never touching them)."""
    infos = []
    for path in sorted(lock_dir.glob("*" + SUFFIX)) if lock_dir.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            # A shared probe conflicts only with a holder's exclusive lock, never with another probe.
            held = not try_flock(fd, fcntl.LOCK_SH)
            holder = _read_holder(fd, _domain_of(path))
        finally:
            os.close(fd)
        age = time.time() - holder.started_at if holder is not None and holder.started_at else None
        reason = ""
        if held and age is not None and age > leak_after:
            reason = f"held for {_duration(age)}, longer than {_duration(leak_after)}"
        elif held and holder is not None and holder.pid and not holder.alive():
            reason = f"held, but its run's process {holder.pid} is gone (a leftover child keeps it?)"
        infos.append(LockInfo(path, _domain_of(path), held, holder, age, bool(reason), reason))
    return infos


def try_flock(fd: int, kind: int = fcntl.LOCK_EX) -> bool:
    """Take ``flock(kind)`` on ``fd`` without blocking; return False if someone else holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def fd_is_current(fd: int, path: Path) -> bool:
    """Return True if ``path`` still names the inode open as ``fd``."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def unlink_if_current(fd: int, path: Path) -> None:
    """Remove ``path`` if it still names the inode of ``fd``, whose flock the caller holds."""
    # Safe from a check-then-act race: only a flock holder unlinks, we hold the flock of the
    # inode the path names, and O_CREAT never replaces an existing file.
    if fd_is_current(fd, path):
        os.unlink(path)


def _read_holder(fd: int, app_domain: str) -> LockHolder | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        fields = json.loads(data)
        return LockHolder(**{**fields, "app_domain": app_domain})
    except (ValueError, TypeError):
        return None  # torn by a concurrent write, or a holder that died writing it


def _write_holder(fd: int, holder: LockHolder) -> None:
    data = json.dumps(asdict(holder), sort_keys=True).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _same(a: LockHolder | None, b: LockHolder | None) -> bool:
    key = lambda h: None if h is None else (h.run_id, h.pid, h.pid_start)  # noqa: E731
    return key(a) == key(b)


def _domain_of(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
