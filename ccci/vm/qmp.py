"""A QMP client: JSON commands to one QEMU process over a pre-connected socket."""

from __future__ import annotations

import json
import socket
import time

from ..errors import TransientInfraError


class QmpError(TransientInfraError):
    """QEMU refused a command, or its monitor went away."""


class Qmp:
    """The monitor of one QEMU process. Not thread-safe: its owner serialises calls."""

    def __init__(self, sock: socket.socket, name: str, timeout: float = 60.0):
        self.sock = sock
        self.name = name
        self.sock.settimeout(timeout)
        self.file = sock.makefile("rwb", buffering=0)

    def handshake(self) -> None:
        """Read the greeting and leave capabilities negotiation mode."""
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"{self.name}: unexpected QMP greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        """Run one command and return its result; raise QmpError if QEMU reports an error."""
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self.file.write(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"{self.name}: QMP {command}: {exc}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"{self.name}: QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_status(self, leave: tuple[str, ...], timeout: float) -> str:
        """Poll query-status until the VM is no longer in one of ``leave``; return the new status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("query-status")["status"]  # type: ignore[index]
            if status not in leave:
                return status
            if time.monotonic() > deadline:
                raise QmpError(f"{self.name}: still {status} after {timeout:.0f}s")
            time.sleep(0.002)  # QEMU offers no event for this without the events capability

    def wait_migration(self, timeout: float) -> None:
        """Poll query-migrate until the outgoing migration has completed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            info = info if isinstance(info, dict) else {}
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"{self.name}: migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise QmpError(f"{self.name}: migration still {status} after {timeout:.0f}s")
            time.sleep(0.002)

    def _read(self) -> dict:
        try:
            line = self.file.readline()
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed under us
            raise QmpError(f"{self.name}: QMP read: {exc}") from None
        if not line:
            raise QmpError(f"{self.name}: QEMU closed its monitor")
        return json.loads(line)

    def close(self) -> None:
        """Close the monitor socket."""
        self.file.close()
        self.sock.close()
