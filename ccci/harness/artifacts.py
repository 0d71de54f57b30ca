"""Artifacts: the files a run's steps leave in ``.ccci/artifacts``, kept with the run — safely.

A step is untrusted code, and the directory it leaves is its to shape: a symlink to
``/proc/self/environ`` or to a host file, a FIFO, a device, a hard link, a million files. The
harness reads them with more rights than the step had, so it keeps only what the step could
have written itself:

* regular files only, each opened with ``O_NOFOLLOW`` relative to its directory's descriptor,
  from the checkout down (``.ccci`` and ``artifacts`` included): no path component is ever a
  symlink, so nothing outside the step's own directory is resolved — the checkout as the
  sandbox saw it, not the harness' view of the host;
* no file with a second hard link (it could name a file the step did not write);
* at most ``MAX_FILES`` files, ``MAX_FILE_BYTES`` each, ``MAX_TOTAL_BYTES`` in all, ``MAX_DEPTH``
  directories deep, names of printable characters only;
* every byte redacted like every other sink: a secret a step was given never leaves in clear.

What is left out is listed, one reason each, and the report says so. The web serves the kept
files as downloads in a sandbox (``web/runs.py``), never as pages of ccci's own origin.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline.executor import ARTIFACTS
from ..pipeline.redact import Redactor

MAX_FILES = 200
MAX_FILE_BYTES = 20 << 20
MAX_TOTAL_BYTES = 100 << 20
MAX_DEPTH = 8
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never hangs us


@dataclass
class Collected:
    """What one collection kept (relative paths) and what it left out, with why."""

    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    bytes: int = 0

    def notes(self) -> list[str]:
        """Return the report notes that say what was left out, if anything."""
        if not self.dropped:
            return []
        shown = "; ".join(self.dropped[:10])
        more = f" (and {len(self.dropped) - 10} more)" if len(self.dropped) > 10 else ""
        return [f"artifacts left out: {shown}{more}"]


def collect(
    dest: Path, redact: Redactor, *, checkout: Path | None = None, brought_out: Sequence[Path] = ()
) -> Collected:
    """Copy the artifacts of a run into ``dest``, safely; return what was kept and left out.

    ``checkout``: the workspace steps ran in on this host (its ``.ccci/artifacts`` is read);
    ``brought_out``: directories machines copied their artifacts out into (read as they are).
    A file an earlier source had is not overwritten by a later one.
    """
    result = Collected()
    sources = [(checkout, ARTIFACTS.parts)] if checkout is not None else []
    sources += [(directory, ()) for directory in brought_out]
    for source, parts in sources:
        fd = _open_path(source, parts, result)
        if fd is None:
            continue
        try:
            _copy_dir(fd, Path(), dest, redact, result, depth=0)
        finally:
            os.close(fd)
    result.kept.sort()
    return result


def _open_path(root: Path, parts: tuple[str, ...], result: Collected) -> int | None:
    """Open ``root/parts…`` as a directory, refusing a symlink anywhere below ``root``."""
    try:
        fd = os.open(root, _OPEN_DIR)
    except OSError:
        return None
    for part in parts:
        try:
            child = os.open(part, _OPEN_DIR, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                result.dropped.append(f"{'/'.join(parts)} is not a directory (a symlink?)")
            return None
        os.close(fd)
        fd = child
    return fd


def _copy_dir(fd: int, rel: Path, dest: Path, redact: Redactor, result: Collected, depth: int) -> None:
    with os.scandir(fd) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        path = rel / name
        if not name.isprintable() or "\\" in name:
            result.dropped.append(f"{ascii(str(path))}: a name that is not plain text")
            continue
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue  # gone since it was listed
        if stat.S_ISDIR(info.st_mode):
            if depth + 1 >= MAX_DEPTH:
                result.dropped.append(f"{path}/: deeper than {MAX_DEPTH} directories")
                continue
            try:
                child = os.open(name, _OPEN_DIR, dir_fd=fd)
            except OSError:
                result.dropped.append(f"{path}/: cannot be opened as a plain directory")
                continue
            try:
                _copy_dir(child, path, dest, redact, result, depth + 1)
            finally:
                os.close(child)
        elif stat.S_ISREG(info.st_mode):
            _copy_file(fd, name, path, dest, redact, result)
        else:
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            result.dropped.append(f"{path}: {kind}")


def _copy_file(fd: int, name: str, path: Path, dest: Path, redact: Redactor, result: Collected) -> None:
    if len(result.kept) >= MAX_FILES:
        result.dropped.append(f"{path}: more than {MAX_FILES} files")
        return
    try:
        file_fd = os.open(name, _OPEN_FILE, dir_fd=fd)
    except OSError:
        result.dropped.append(f"{path}: cannot be opened as a regular file")
        return
    with os.fdopen(file_fd, "rb") as f:
        info = os.fstat(f.fileno())  # the file opened, which is what counts (not what was listed)
        if not stat.S_ISREG(info.st_mode):
            result.dropped.append(f"{path}: not a regular file")
            return
        if info.st_nlink > 1:
            result.dropped.append(f"{path}: a hard link")
            return
        if info.st_size > MAX_FILE_BYTES:
            result.dropped.append(f"{path}: {info.st_size} bytes, more than {MAX_FILE_BYTES}")
            return
        if result.bytes + info.st_size > MAX_TOTAL_BYTES:
            result.dropped.append(f"{path}: over the {MAX_TOTAL_BYTES} bytes kept per run")
            return
        data = f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
    target = dest / path
    if str(path) in result.kept or target.exists():
        return  # an earlier source had it
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(redact.redact_bytes(data))
    result.kept.append(str(path))
    result.bytes += len(data)
