"""Helper processes for the harness suite: real processes that hold flocks and install guards.

Shared by the harness tests and their conftest; imported as ``tests.harness.procs`` so that it
is one module whatever else is collected (a bare ``conftest`` import depends on collection order).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from ccci.pids import process_alive, process_start_time

HELPER = Path(__file__).with_name("helper.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0  # seconds; generous for a loaded 2-core machine, never used to synchronise


class Helper:
    """One helper process: its stdin for commands, its stdout read line by line."""

    def __init__(self, pool: HelperPool, popen: subprocess.Popen):
        self.pool = pool
        self.popen = popen
        self.pid = popen.pid
        self.lines: list[str] = []
        self._buffer = b""
        self._eof = False

    def expect(self, prefix: str, timeout: float = TIMEOUT) -> str:
        """Return the next unread line starting with ``prefix``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self.lines):
                if line.startswith(prefix):
                    del self.lines[: i + 1]
                    return line
            if self._eof:
                raise AssertionError(f"helper {self.pid} ended without {prefix!r}; output: {self.output()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {prefix!r} from helper {self.pid} in {timeout}s: {self.output()}")
            self._read(remaining)

    def read_all(self, timeout: float = TIMEOUT) -> list[str]:
        """Read until the helper and every process sharing its stdout have closed it."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"helper {self.pid} output never ended: {self.output()}")
            self._read(remaining)
        return list(self.lines)

    def send(self, line: str) -> None:
        """Write one line to the helper's stdin."""
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the helper to exit and return its exit code."""
        return self.popen.wait(timeout)

    def output(self) -> str:
        return " | ".join(self.pool.transcript.get(self.pid, []))

    def _read(self, timeout: float) -> None:
        fd = self.popen.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            self._eof = True
            chunk = b"\n" if self._buffer else b""
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            self.pool.transcript.setdefault(self.pid, []).append(line)
            if line.startswith("child "):  # a grandchild: reap it too, whatever happens
                self.pool.record(int(line.split()[1]))


def wait_gone(pid: int, started: int | None, timeout: float = TIMEOUT) -> None:
    """Wait until the process ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_start_time(pid) != started:
            return  # already gone (zombie or reused pid): the pidfd names someone else
        ready, _, _ = select.select([fd], [], [], timeout)  # readable once the process exits
        assert ready, f"process {pid} still runs after {timeout}s"
    finally:
        os.close(fd)


def expect_any(candidates: list[Helper], prefix: str, timeout: float = TIMEOUT) -> Helper:
    """Return the first of ``candidates`` to print a line starting with ``prefix``."""
    deadline = time.monotonic() + timeout
    while True:
        for helper in candidates:
            if any(line.startswith(prefix) for line in helper.lines):
                helper.expect(prefix)
                return helper
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"none of {[h.pid for h in candidates]} printed {prefix!r}")
        fds = {h.popen.stdout.fileno(): h for h in candidates if not h._eof}
        if not fds:
            raise AssertionError(f"all of {[h.pid for h in candidates]} ended without {prefix!r}")
        ready, _, _ = select.select(list(fds), [], [], remaining)
        for fd in ready:
            fds[fd]._read(0)


class HelperPool:
    """Starts helpers and kills every one of them (and recorded grandchildren) at the end."""

    def __init__(self):
        self.helpers: list[Helper] = []
        self.recorded: dict[int, int | None] = {}  # pid -> start time, to never kill a reused pid
        self.transcript: dict[int, list[str]] = {}

    def start(self, *args: str, env: dict[str, str] | None = None, **popen_kwargs) -> Helper:
        """Start ``helper.py args...`` with pipes on stdin and stdout."""
        popen = subprocess.Popen(
            [sys.executable, str(HELPER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            **popen_kwargs,
        )
        helper = Helper(self, popen)
        self.helpers.append(helper)
        self.record(popen.pid)
        return helper

    def record(self, pid: int) -> None:
        """Remember a process to kill at cleanup."""
        self.recorded.setdefault(pid, process_start_time(pid))

    def cleanup(self) -> None:
        for helper in self.helpers:  # read what is left, to record grandchildren not yet seen
            while not helper._eof and select.select([helper.popen.stdout.fileno()], [], [], 0)[0]:
                helper._read(0)
        for pid, started in list(self.recorded.items()):
            if started is None or not process_alive(pid, started):
                continue
            try:
                if os.getpgid(pid) == pid:  # a guarded helper leads its own group: kill its children too
                    os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for helper in self.helpers:
            try:
                helper.popen.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (helper.popen.stdin, helper.popen.stdout):
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
