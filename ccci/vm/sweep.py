"""The orphan sweep: remove forks, checkpoints, overlays and QEMU processes of dead owners.

Every machine frees itself when closed; this is the safety net for owners killed with SIGKILL
(their QEMU dies with them through PDEATHSIG, but their files stay). Only resources whose tag
names a dead owner pid are touched, so a live peer's forks are never disturbed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import time
from pathlib import Path

from ..pids import process_start_time
from .image import images_dir
from .owner import TAG, owner_alive, owner_pid
from .snapshot import logs_dir, vm_dir

LOG_AGE = 7 * 86400  # machine logs of dead owners are kept this long, for post-mortems
_BUILD_TMP = re.compile(r"^\.build-(?P<pid>\d+)-")


def sweep_vms(state_dir: Path, prune_bases_after: float | None = None) -> list[str]:
    """Remove VM leftovers of dead owners; return what was removed (paths, and killed pids).

    With ``prune_bases_after`` (seconds), also remove warm bases unused for that long that no
    live fork holds.
    """
    removed: list[str] = []
    root = vm_dir(state_dir)
    if root.is_dir():
        dead = [p for p in root.iterdir() if TAG.match(p.name) and not owner_alive(p)]
        bases = root / "bases"
        if bases.is_dir():
            dead += [p for p in bases.iterdir() if TAG.match(p.name) and not owner_alive(p)]
        for path in dead:
            for pid in processes_using(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                    removed.append(f"pid {pid}")
                except ProcessLookupError:
                    pass
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
        if bases.is_dir() and prune_bases_after is not None:
            removed += _prune_bases(bases, prune_bases_after)
        logs = logs_dir(state_dir)
        if logs.is_dir():
            for log in logs.iterdir():
                owner = owner_pid(log.name.split(".")[0].removesuffix("-helper"))
                old = time.time() - log.stat().st_mtime > LOG_AGE
                if old and (owner is None or process_start_time(owner) is None):
                    log.unlink(missing_ok=True)
                    removed.append(str(log))
    images = images_dir(state_dir)
    if images.is_dir():
        for tmp in images.iterdir():
            m = _BUILD_TMP.match(tmp.name)
            if m and process_start_time(int(m.group("pid"))) is None:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(str(tmp))
    return removed


def processes_using(path: Path) -> list[int]:
    """Return the pids whose command line names ``path`` (QEMU names its RAM and disk files)."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


def _prune_bases(bases: Path, older_than: float) -> list[str]:
    removed = []
    for base in bases.iterdir():
        pin = base / "pin"
        if not pin.exists() or time.time() - pin.stat().st_mtime < older_than:
            continue
        fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # A live fork holds a shared lock on its base's pin: then this fails and it stays.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(base, ignore_errors=True)
            removed.append(str(base))
        finally:
            os.close(fd)
    return removed
