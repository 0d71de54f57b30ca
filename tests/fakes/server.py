"""FakeServer: the part every fake HTTP service shares — a real threaded server on 127.0.0.1.

A fake keeps its state under one re-entrant Condition, which every recorded call and every test
control notifies, so tests wait for what they expect with ``wait_for`` instead of sleeping.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

T = TypeVar("T")


class FakeHandler(BaseHTTPRequestHandler, abc.ABC):
    """Hands every request, whatever its method, to the fake's own ``_handle``; logs nothing.

    An abstract base: each fake's handler defines ``_handle``. Fakes record the calls they
    answer instead of logging them.
    """

    timeout = 10  # a client that connects and never sends must not pin a thread forever

    @abc.abstractmethod
    def _handle(self) -> None:
        """Answer the request: each fake's own routing, in its documented shapes."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeServer:
    """Serves ``handler`` on a free port of 127.0.0.1 for as long as the fake is open."""

    handler: type[BaseHTTPRequestHandler]
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._cond = threading.Condition(threading.RLock())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Any:
        """Start serving on a free port of 127.0.0.1."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        server.daemon_threads = False  # server_close() joins every handler thread
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the socket; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The base URL the fake serves at."""
        assert self._server is not None, f"{type(self).__name__} is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def wait_for(self, predicate: Callable[[Any], T], timeout: float = 10) -> T:
        """Wait until ``predicate(self)`` is truthy and return it; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{type(self).__name__}: condition not met within {timeout}s; calls: {self.calls[-10:]}"
                    )
                self._cond.wait(remaining)
