"""Proxy: a recording HTTP relay in front of one real server, to count and to hold requests.

In front of Gitea it counts ccci's API requests by kind (Gitea's own answers pass through
untouched); in front of ccci it sees each webhook Gitea delivers, when it arrived, and what ccci
answered, and ``hold()`` keeps deliveries waiting — the way a slow network would — so a test can
change the forge between a comment being made and ccci hearing of it.

    with Proxy("http://127.0.0.1:3000") as proxy:       # then point the client at proxy.url
        ...
        proxy.wait_for(lambda p: p.exchanges("POST", r"/comments$"))
"""

from __future__ import annotations

import contextlib
import http.client
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from tests.fakes.server import FakeHandler, FakeServer

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


@dataclass(frozen=True)
class Exchange:
    """One request relayed and its answer; times are ``time.monotonic()``."""

    method: str
    path: str  # without the query string
    query: str
    request_body: bytes
    status: int
    response_body: bytes
    arrived: float
    answered: float


class Proxy(FakeServer):
    """Relays every request to ``upstream`` and records the exchange; use it as a context manager."""

    def __init__(self, upstream: str, name: str = "proxy"):
        super().__init__()
        self.handler, self.name = _Handler, name
        self.upstream = urlsplit(upstream)
        if not self.upstream.hostname:
            raise ValueError(f"not a URL with a host: {upstream!r}")
        self.host = self.upstream.hostname
        self.arrivals: list[tuple[str, str, float]] = []  # (method, path, time) as requests come in
        self._holding = False

    def exchanges(self, method: str | None = None, pattern: str = "") -> list[Exchange]:
        """Return the relayed exchanges, optionally only ``method`` ones whose path matches ``pattern``."""
        with self._cond:
            return [c for c in self.calls if (method is None or c.method == method) and re.search(pattern, c.path)]

    def wait_next(self, timeout: float) -> None:
        """Wait until the next request arrives or is answered, or ``timeout`` seconds pass."""
        with self._cond:
            self._cond.wait(timeout)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep every request that arrives inside this block waiting until the block ends."""
        with self._cond:
            self._holding = True
        try:
            yield
        finally:
            with self._cond:
                self._holding = False
                self._cond.notify_all()

    def _relay(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        with self._cond:
            path = target.split("?", 1)[0]
            self.arrivals.append((method, path, time.monotonic()))
            self._cond.notify_all()
            while self._holding:
                self._cond.wait()
        conn = http.client.HTTPConnection(self.host, self.upstream.port, timeout=60)
        try:
            conn.request(method, target, body=body or None, headers={**headers, "Host": self.upstream.netloc})
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _record(self, exchange: Exchange) -> None:
        with self._cond:
            self.calls.append(exchange)
            self._cond.notify_all()


class _Handler(FakeHandler):
    server_version = "ccci-test-proxy"

    def _handle(self) -> None:
        proxy: Proxy = self.server.fake  # type: ignore[attr-defined]
        arrived = time.monotonic()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_error(501, "the test proxy relays only requests with a Content-Length")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            status, answer_headers, answer = proxy._relay(self.command, self.path, headers, body)
        except OSError as exc:
            status, answer_headers, answer = 502, [], f"test proxy: upstream unreachable: {exc}".encode()
        self.send_response(status)
        for name, value in answer_headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        path, _, query = self.path.partition("?")
        proxy._record(Exchange(self.command, path, query, body, status, answer, arrived, time.monotonic()))
