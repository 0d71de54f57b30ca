"""The browser world: ccci's web app under real gunicorn, and headless Chromium driven over CDP.

web         gunicorn serving app:app with deploy/gunicorn.conf.py, state in a tmp dir, and the
            Store and runs directory it reads, for tests to create runs and write their files
chromium    a headless Chromium speaking the DevTools protocol over a pipe (--remote-debugging-pipe:
            NUL-terminated JSON on fds 3 and 4), so no WebSocket client is needed
page        one tab in it: navigate, evaluate JavaScript, wait for a condition, screenshot
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccci.store import Store
from tests.support import ROOT, free_port, stop, wait_for_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium reaches out to Google services unless told not to; here the only network is loopback.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-pipe",
)  # fmt: skip


def chromium_binary() -> str | None:
    """Return the first Chromium found on PATH, or None."""
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


class CdpError(Exception):
    """The browser answered a DevTools command with an error, or did not answer in time."""


class Chromium:
    """One headless Chromium process and its DevTools pipe; ``close`` always reaps it."""

    def __init__(self, binary: str, profile: Path, log_path: Path):
        to_browser, self._to_browser = os.pipe()  # Chromium reads commands on its fd 3
        self._from_browser, from_browser = os.pipe()  # and writes answers and events on its fd 4
        # Copies above fd 9, so that moving them onto 3 and 4 in the child cannot clobber either.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                preexec_fn=lambda: (os.dup2(ends[0], 3), os.dup2(ends[1], 4)), pass_fds=(3, 4),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, *, session: str | None = None, timeout: float = 30) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._read(deadline, method):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise CdpError(f"{method}: {reply['error']}")
                    return reply["result"]
                self.events.append(reply)

    def _read(self, deadline: float, method: str) -> list[dict[str, Any]]:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([self._from_browser], [], [], max(remaining, 0))
        if not ready:
            raise CdpError(f"{method}: no answer from Chromium in time")
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
            raise CdpError(f"{method}: Chromium closed its pipe:\n{self.log_path.read_text()[-2000:]}")
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in messages]

    def close(self) -> None:
        """Ask Chromium to quit, kill it if it does not, reap it and close the pipe."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=10)
        except (CdpError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # Renderer and utility processes share the process group; make sure none outlives the test.
        stop(self.proc, signal.SIGKILL)
        os.close(self._to_browser)
        os.close(self._from_browser)


class Page:
    """One tab of a Chromium, attached with a flat CDP session."""

    def __init__(self, browser: Chromium):
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, params: dict | None = None, **kwargs) -> dict:
        """Send a command to this tab."""
        return self.browser.send(method, params, session=self.session, **kwargs)

    def goto(self, url: str) -> None:
        """Navigate and wait until the document has loaded."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def eval(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        """Evaluate ``expression`` until it is truthy (the page polls; so must we); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.eval(expression)
            except CdpError:  # the page is navigating: its context is being replaced
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}; page text:\n{self.text()[:2000]}")
            time.sleep(0.05)

    def wait_for_event(self, method: str, timeout: float = 20) -> dict[str, Any]:
        """Wait until this tab reports a new ``method`` event (enable its domain first); return it."""
        seen = len(self.browser.events)
        deadline = time.monotonic() + timeout
        while True:
            for event in self.browser.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == self.session:
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {method}")
            self.send("Runtime.evaluate", {"expression": "0"})  # a round trip collects what arrived
            time.sleep(0.05)

    def text(self) -> str:
        """Return the page's visible text."""
        try:
            return self.eval("document.body ? document.body.innerText : ''") or ""
        except CdpError:
            return ""

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the page to ``path``."""
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def exceptions(self) -> list[str]:
        """Return the uncaught JavaScript exceptions this tab reported so far."""
        return [
            e["params"]["exceptionDetails"].get("text", "")
            + str(e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))
            for e in self.browser.events
            if e.get("method") == "Runtime.exceptionThrown" and e.get("sessionId") == self.session
        ]


@pytest.fixture
def chromium(tmp_path) -> Iterator[Chromium]:
    """A headless Chromium with a fresh profile, reaped whatever the test does."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); install Debian's chromium")
    browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.send("Browser.getVersion")  # answers once the browser is up
        yield browser
    finally:
        browser.close()


@pytest.fixture
def page(chromium) -> Page:
    """A fresh tab."""
    return Page(chromium)


class Web:
    """ccci's web app under gunicorn (no worker, so runs stay as tests leave them), and its state."""

    def __init__(self, tmp_path: Path):
        state = tmp_path / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Store(state / "ccci.db")
        self.runs_dir = state / "runs"
        self.log_path = tmp_path / "gunicorn.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
        self.env.update(
            CCCI_STATE_DIR=str(state),
            CCCI_LOCK_DIR=str(tmp_path / "locks"),
            PYTHONPATH=str(ROOT),
            GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{self.port} --workers 2",
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start gunicorn with deploy/gunicorn.conf.py and wait until it listens."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [Path(sys.executable).parent / "gunicorn", "-c", "deploy/gunicorn.conf.py", "app:app"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for_port(self.port, self.proc, "gunicorn")

    def stop(self) -> None:
        """Stop gunicorn gracefully and check that it exited cleanly."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        stop(proc)
        assert proc.returncode == 0, self.log_path.read_text()[-3000:]


@pytest.fixture
def web(tmp_path) -> Iterator[Web]:
    """ccci's web app, served until the test ends."""
    server = Web(tmp_path)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.store.close()
