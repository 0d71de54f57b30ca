"""A run's own ABRA_DIR, so that concurrent runs never share a recipe tree.

abra keeps recipe checkouts under ``$ABRA_DIR/recipes`` and mutates them (checkout, re-clone);
two runs sharing one tree would test each other's code. Each run gets its own ABRA_DIR in which
only the operator's servers (app ``.env`` files) and recipe catalogue are shared, as symlinks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path

from ..errors import CcciError
from ..names import is_recipe
from ..pids import process_alive, process_start_time
from .applock import fd_is_current, try_flock, unlink_if_current

log = logging.getLogger(__name__)

OWNER = "abra-owner.json"
SHARED = ("servers", "catalogue")


class RunAbraDir:
    """One run's ABRA_DIR, a context manager: entering creates it, leaving removes it.

    ::

        STATE_DIR/runs/<id>/               run_dir: the run's log and report stay here
        ├── abra-owner.json             {run, pid, pid_start, created_at, kept}; flock'd
        │                                  by the owner while the ABRA_DIR lives
        └── abra/                          abra_dir: exported as ABRA_DIR to every step
            ├── servers   -> ABRA_HOME/servers     shared app .env files
            ├── catalogue -> ABRA_HOME/catalogue   shared recipe catalogue
            └── recipes/
                └── <recipe>/              recipe_dir: fresh and empty; the checkout goes here

    ABRA_HOME is never written to. A shared entry missing from it is left out of the ABRA_DIR
    rather than linked dangling, and abra creates a per-run one if it needs it (a CI-only host
    with no ABRA_HOME gets an empty per-run ``servers/``; deployments then fail in abra, which
    names the missing server). Removal never follows the symlinks.

    The owner holds ``flock`` on the owner file for the ABRA_DIR's whole life, so the janitor
    (``sweep_abra_dirs``) tells a dead owner's ABRA_DIR from a live one without trusting pids;
    the JSON is for people. Leaving removes ``abra/`` on every path, including a stop request,
    unless ``keep=True``: then the owner file is marked kept and no sweep removes it.
    """

    def __init__(self, run_dir: Path, abra_home: Path, recipe: str, *, keep: bool = False):
        if not is_recipe(recipe):
            raise ValueError(f"{recipe!r} is not a recipe name")
        self.run_dir = run_dir
        self.abra_home = abra_home
        self.recipe = recipe
        self.keep = keep
        self.abra_dir = run_dir / "abra"
        self.recipe_dir = self.abra_dir / "recipes" / recipe
        self.shared: list[str] = []  # the names linked to ABRA_HOME
        self._owner = run_dir / OWNER
        self._fd: int | None = None

    @property
    def run_id(self) -> str:
        """The run this ABRA_DIR belongs to (the name of its run directory)."""
        return self.run_dir.name

    def __enter__(self) -> RunAbraDir:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = self._own()
        try:
            if self.abra_dir.exists() or self.abra_dir.is_symlink():
                # Left by a dead owner of the same run directory (a retried run): never reuse it.
                log.info("removing the previous ABRA_DIR %s", self.abra_dir)
                remove_tree(self.abra_dir)
            self._write_owner(fd, kept=False)
            self.recipe_dir.mkdir(parents=True)
            for name in SHARED:
                target = self.abra_home / name
                if target.is_dir():
                    (self.abra_dir / name).symlink_to(target.absolute(), target_is_directory=True)
                    self.shared.append(name)
                else:
                    log.info("%s has no %s/; the ABRA_DIR gets none", self.abra_home, name)
        except BaseException:
            self._fd = fd
            self._leave(keep=False)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._leave(keep=self.keep)

    def _own(self) -> int:
        while True:
            fd = os.open(self._owner, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if not try_flock(fd):
                os.close(fd)
                raise CcciError(f"the ABRA_DIR in {self.run_dir} belongs to a live process")
            if fd_is_current(fd, self._owner):
                return fd
            os.close(fd)  # a sweep removed the file between our open and flock: take a fresh one

    def _write_owner(self, fd: int, *, kept: bool) -> None:
        pid = os.getpid()
        data = {
            "run": self.run_id,
            "pid": pid,
            "pid_start": process_start_time(pid),
            "created_at": time.time(),
            "recipe": self.recipe,
            "kept": kept,
        }
        raw = json.dumps(data, sort_keys=True).encode()
        os.pwrite(fd, raw, 0)
        os.ftruncate(fd, len(raw))

    def _leave(self, *, keep: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if keep:
                self._write_owner(fd, kept=True)
                log.info("kept the ABRA_DIR %s", self.abra_dir)
                return
            remove_tree(self.abra_dir)
            unlink_if_current(fd, self._owner)
        except Exception:
            # Raising here would hide the run's own error; the owner file stays, so the next
            # sweep finishes the removal.
            log.exception("could not remove the ABRA_DIR %s; the janitor will", self.abra_dir)
        finally:
            os.close(fd)


REAPER = re.compile(r"^reap-[^/]*-(?P<pid>\d+)-(?P<start>\d+)-")


def reaper_prefix(run_id: str | int) -> str:
    """Return the name prefix of the temporary run directory a reaper of run ``run_id`` works in.

    It names the reaping process (pid and start time), so that a sweep can remove the whole
    directory of one that was killed mid-reap, and never that of one still at work.
    """
    pid = os.getpid()
    return f"reap-{run_id}-{pid}-{process_start_time(pid) or 0}-"


def sweep_abra_dirs(runs_dir: Path) -> list[Path]:
    """Remove the ABRA_DIRs of dead owners under ``runs_dir``; return the removed ABRA_DIRs.

    A live owner's ABRA_DIR and a kept one are never touched; the run directories (logs,
    reports) stay — except a dead reaper's temporary run directory, which holds nothing else.
    """
    removed = []
    for owner in sorted(runs_dir.glob("*/" + OWNER)) if runs_dir.is_dir() else []:
        try:
            fd = os.open(owner, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not try_flock(fd, fcntl.LOCK_EX) or not fd_is_current(fd, owner):
                continue  # alive, or another sweep just removed it
            if _read_owner(fd).get("kept"):
                continue
            abra = owner.parent / "abra"
            if abra.exists() or abra.is_symlink():
                remove_tree(abra)
                removed.append(abra)
                log.info("removed the ABRA_DIR %s of a dead run", abra)
            unlink_if_current(fd, owner)
        except OSError:
            log.exception("could not remove the ABRA_DIR under %s", owner.parent)
        finally:
            os.close(fd)
    for reaper in sorted(runs_dir.glob("reap-*")) if runs_dir.is_dir() else []:
        m = REAPER.match(reaper.name)
        if m and not process_alive(int(m["pid"]), int(m["start"]) or None) and not (reaper / OWNER).exists():
            remove_tree(reaper)
            removed.append(reaper)
            log.info("removed the run directory %s of a reaper that was killed", reaper)
    return removed


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it without following symlinks; absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return

    def writable_then_retry(func, name, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return
        # Steps leave read-only directories (git objects, module caches): open the parent up.
        parent = os.path.dirname(name)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(name)

    shutil.rmtree(path, onerror=writable_then_retry)


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
