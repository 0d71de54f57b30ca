"""The initramfs: busybox, the boot modules and an ``/init``, packed as a newc cpio in memory.

The tiny image lives entirely in it (its ``/init`` becomes the agent); the docker image's
``/init`` only mounts the root disk and switches into it.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from pathlib import Path

from ..errors import PermanentInfraError

DIRS = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/ccci", "etc/ccci/init.d", "lib",
    "lib/modules", "proc", "sys", "dev", "tmp", "run", "root", "var", "var/lib",
)  # fmt: skip


def write_initramfs(
    target: Path,
    busybox: Path,
    init: bytes,
    modules: list[tuple[str, bytes]],
    files: dict[str, tuple[bytes, int]] | None = None,
) -> None:
    """Write a gzipped newc archive: busybox with its applets, ``init``, modules, extra ``files``.

    ``files`` maps a path in the archive to its content and permissions.

    The module names go to ``/etc/ccci/modules`` in load order, for ``/init`` to ``insmod``.
    """
    cpio = Cpio()
    for d in DIRS:
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    try:
        applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PermanentInfraError(f"{busybox} --list-full failed: {exc}") from None
    for applet in applets.split():
        if applet not in ("bin/busybox", "sbin/init", "linuxrc"):
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", init, 0o755)
    cpio.file("etc/ccci/modules", "".join(f"{m}\n" for m, _ in modules).encode(), 0o644)
    for mod, blob in modules:
        cpio.file(f"lib/modules/{mod}.ko", blob, 0o644)
    for name, (data, perm) in (files or {}).items():
        cpio.file(name, data, perm)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    cpio.file("etc/group", b"root:x:0:\n", 0o644)
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)
    with target.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
        out.write(cpio.finish())


class Cpio:
    """A newc archive written in memory (the kernel's initramfs format), no cpio tool needed."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\0" * (-self.buf.tell() % 4) + data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        """Add a directory."""
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, perm: int) -> None:
        """Add a regular file with permissions ``perm``."""
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link to ``target``."""
        self._entry(name.lstrip("/"), 0o120777, target.encode())

    def finish(self) -> bytes:
        """Return the archive with its trailer."""
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()
