"""The host end of the guest agent: framed messages over one socket, any number of commands.

The wire format is defined in ``guest/agent.c``. One reader thread per agent turns incoming
frames into events on per-command queues, so any number of threads can run commands at once;
writes are serialised by a lock. When the socket closes (QEMU died) every waiter learns it.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..pipeline.executor import OutputSink

EXEC, STDIN, KILL, SETUP, PING = 1, 2, 3, 4, 5
READY, OUT, EXIT, FAIL, ACK = 64, 65, 66, 67, 68
_HEADER = struct.Struct("<BII")
_CHUNK = 64 * 1024
_STREAMS = {1: "stdout", 2: "stderr"}
_POLL = 0.05  # how often a waiting command looks at its cancel event


class AgentLost(Exception):
    """The agent stopped answering: QEMU exited, or the guest hung past a deadline."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started  # whether the command had been handed to the guest


class AgentRefused(Exception):
    """The agent could not start the command (the guest could not fork or make pipes)."""


@dataclass
class GuestExit:
    """How a command ended inside the guest."""

    status: int
    timed_out: bool = False
    canceled: bool = False


class Agent:
    """The agent of one guest, reached through a connected socket."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        self._write_lock = threading.Lock()
        self._waiters: dict[int, queue.SimpleQueue] = {}
        self._waiters_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.lost_reason = ""
        self._lost = threading.Event()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"agent-{name}", daemon=True)
        self._reader.start()

    # -- requests ---------------------------------------------------------------------------

    def setup(self, hostname: str, timeout: float) -> None:
        """Give a fresh fork the host's clock, new entropy and its own hostname; wait for it."""
        payload = struct.pack("<Q", time.time_ns()) + hostname.encode() + b"\0" + os.urandom(64)
        self._request(SETUP, payload, timeout)

    def ping(self, timeout: float) -> float:
        """Round-trip one message through the agent; return the seconds it took."""
        started = time.monotonic()
        self._request(PING, b"", timeout)
        return time.monotonic() - started

    def run(
        self,
        command: str,
        cwd: str,
        env: dict[str, str],
        *,
        stdin: bytes | Iterable[bytes] | None = None,
        on_output: OutputSink | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        kill_grace: float = 30.0,
    ) -> GuestExit:
        """Run ``command`` with /bin/sh -c in the guest; stream its output; kill it on timeout or cancel.

        ``kill_grace`` bounds how long a killed command may take to report its exit; past it the
        guest is taken as hung and AgentLost is raised.
        """
        ident = next(self._ids)
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._waiters_lock:
            self._waiters[ident] = events
        try:
            if self._lost.is_set():
                raise AgentLost(f"{self.name}: {self.lost_reason}", started=False)
            parts = [cwd, command] + [f"{k}={v}" for k, v in env.items()]
            if any("\0" in p for p in parts):
                raise ValueError("a command, directory or environment value contains a NUL byte")
            flags = struct.pack("<I", 1 if stdin is not None else 0)
            self._send(EXEC, ident, flags + b"".join(p.encode() + b"\0" for p in parts), started=False)
            if stdin is not None:
                self._send_stdin(ident, [stdin] if isinstance(stdin, bytes) else stdin)
            return self._wait(ident, events, on_output, timeout, cancel, kill_grace)
        finally:
            with self._waiters_lock:
                self._waiters.pop(ident, None)

    def _send_stdin(self, ident: int, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            for i in range(0, len(chunk), _CHUNK):
                self._send(STDIN, ident, chunk[i : i + _CHUNK], started=True)
        self._send(STDIN, ident, b"", started=True)

    def _wait(
        self,
        ident: int,
        events: queue.SimpleQueue,
        on_output: OutputSink | None,
        timeout: float | None,
        cancel: threading.Event | None,
        kill_grace: float,
    ) -> GuestExit:
        deadline = None if timeout is None else time.monotonic() + timeout
        outcome = GuestExit(status=-1)
        kill_deadline = None
        while True:
            now = time.monotonic()
            if kill_deadline is None:
                if deadline is not None and now >= deadline:
                    outcome.timed_out = True
                elif cancel is not None and cancel.is_set():
                    outcome.canceled = True
                if outcome.timed_out or outcome.canceled:
                    self._send(KILL, ident, b"", started=True)
                    kill_deadline = now + kill_grace
            elif now >= kill_deadline:
                raise AgentLost(f"{self.name}: the guest did not stop a killed command", started=True)
            wait = _POLL if deadline is None else max(0.0, min(_POLL, deadline - now))
            if kill_deadline is not None:
                wait = max(0.0, min(_POLL, kill_deadline - now))
            try:
                kind, *rest = events.get(timeout=wait)
            except queue.Empty:
                continue
            if kind == OUT:
                if on_output is not None:
                    on_output(*rest)
            elif kind == EXIT:
                outcome.status = rest[0]
                return outcome
            elif kind == FAIL:
                raise AgentRefused(f"{self.name}: the guest could not start the command: {rest[0]}")
            else:
                raise AgentLost(f"{self.name}: {rest[0]}", started=True)

    def _request(self, kind: int, payload: bytes, timeout: float) -> None:
        ident = next(self._ids)
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._waiters_lock:
            self._waiters[ident] = events
        try:
            self._send(kind, ident, payload, started=False)
            try:
                reply, *rest = events.get(timeout=timeout)
            except queue.Empty:
                raise AgentLost(f"{self.name}: no answer from the agent in {timeout:.0f}s", started=False) from None
            if reply != ACK:
                raise AgentLost(f"{self.name}: {rest[0] if rest else 'unexpected reply'}", started=False)
        finally:
            with self._waiters_lock:
                self._waiters.pop(ident, None)

    def _send(self, kind: int, ident: int, payload: bytes, *, started: bool) -> None:
        try:
            with self._write_lock:
                self.sock.sendall(_HEADER.pack(kind, ident, len(payload)) + payload)
        except OSError as exc:
            raise AgentLost(f"{self.name}: cannot write to the agent: {exc}", started=started) from None

    # -- the reader ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "QEMU closed the agent channel (the machine stopped)"
        try:
            while True:
                header = self._read_exactly(_HEADER.size)
                kind, ident, length = _HEADER.unpack(header)
                payload = self._read_exactly(length) if length else b""
                if kind == OUT:
                    self._deliver(ident, (OUT, _STREAMS.get(payload[0], "stdout"), payload[1:]))
                elif kind == EXIT:
                    self._deliver(ident, (EXIT, struct.unpack("<i", payload)[0]))
                elif kind == FAIL:
                    self._deliver(ident, (FAIL, payload.decode(errors="replace")))
                elif kind == ACK:
                    self._deliver(ident, (ACK,))
                elif kind == READY:
                    # Sent once, when a cold-booted agent starts; forks are checked with SETUP.
                    self._ready.set()
        except (EOFError, OSError) as exc:
            if not isinstance(exc, EOFError):
                reason = f"agent channel failed: {exc}"
        self.lost_reason = reason
        self._lost.set()
        self._ready.set()  # wakes wait_ready, which then sees the loss
        with self._waiters_lock:
            waiters = list(self._waiters.values())
        for events in waiters:
            events.put(("lost", reason))

    def _read_exactly(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _deliver(self, ident: int, event: tuple) -> None:
        with self._waiters_lock:
            events = self._waiters.get(ident)
        if events is not None:
            events.put(event)

    @property
    def lost(self) -> bool:
        """Whether the agent channel has closed."""
        return self._lost.is_set()

    def wait_ready(self, timeout: float) -> None:
        """Wait for the agent of a cold boot to announce itself."""
        if not self._ready.wait(timeout):
            raise AgentLost(f"{self.name}: the agent did not start within {timeout:.0f}s", started=False)
        if self._lost.is_set():
            raise AgentLost(f"{self.name}: {self.lost_reason}", started=False)

    def close(self) -> None:
        """Close the channel; the reader thread ends when it sees the socket shut."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout=5)
        self.sock.close()
