"""The doorbell: a datagram the web process sends so the worker wakes at once.

The worker would notice new work on its next look at the store anyway; the doorbell only
saves that wait. Ringing never blocks and never fails the caller.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


class Doorbell:
    """A UNIX datagram socket under STATE_DIR: ``ring`` from anywhere, ``wait`` in the worker."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._bound = 0  # the inode of the socket this doorbell bound

    def ring(self) -> None:
        """Wake the worker, if one is listening."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"!", str(self.path))
        except OSError:
            pass  # no worker listening, or its queue is full: it will look soon anyway

    def listen(self) -> None:
        """Bind the socket; only the worker listens."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._bound = os.stat(self.path).st_ino

    def wait(self, timeout: float) -> bool:
        """Wait until rung or ``timeout`` passes; drain pending rings; True if rung."""
        assert self._sock is not None, "listen() first"
        self._sock.settimeout(max(timeout, 0.0))
        try:
            self._sock.recv(64)
        except (TimeoutError, BlockingIOError):
            return False
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(64)
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            # A worker that stops late must not unlink the socket its successor has bound since.
            try:
                if os.stat(self.path).st_ino == self._bound:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
