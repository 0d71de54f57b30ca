"""The forge: the few Gitea/Forgejo API calls ccci makes, behind a narrow interface.

``Forge`` is the Protocol the rest of ccci codes against (Prow's plugins declare only the
client methods they use); ``GiteaClient`` is the real thing on ``requests.Session``, and
``tests/fakes/gitea.py`` serves the same API over real HTTP for tests. Endpoints, shapes and
status codes follow docs/protocols.md §2.

Every request carries a timeout. Idempotent methods (GET, PATCH, PUT, DELETE) are retried with
backoff on connection errors and 502/503/504; POST is retried only when the connection could
not be made at all (urllib3 never retries a POST whose request may have reached the forge),
because a blindly repeated comment POST makes a second comment — the outbox above handles
that. Any other failure raises ``ForgeError`` with ``status`` and ``transient`` set (5xx, 429
and connection errors are transient), and is told to ``on_error`` by kind (``ERROR_KINDS``), which
the worker counts in the store for the metrics. The token goes in the ``Authorization`` header only —
never in a URL, an error message or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import ForgeError
from .names import is_sha

log = logging.getLogger(__name__)

COMMIT_STATES = ("pending", "success", "error", "failure", "warning")
# How a forge request can fail: not reached, too slow, refused (4xx), rate limited, broken (5xx), nonsense.
ERROR_KINDS = ("unreachable", "timeout", "client_error", "rate_limited", "server_error", "bad_response")


@dataclass(frozen=True)
class PullRequest:
    """What ccci needs to know about a pull request to test its head commit."""

    number: int
    state: str  # "open" | "closed"
    merged: bool
    head_sha: str
    head_ref: str
    base_clone_url: str  # where refs/pull/<number>/head can be fetched, forks included
    html_url: str
    private: bool = False  # the base repository is private: fetching it needs the token


class Forge(Protocol):
    """The forge operations ccci uses, and nothing more."""

    def get_pull(self, owner: str, repo: str, number: int) -> PullRequest:
        """Return the pull request ``owner/repo#number``."""
        ...

    def is_org_member(self, org: str, login: str) -> bool:
        """Return True only if the forge confirms ``login`` is a member of ``org``."""
        ...

    def list_comments(self, owner: str, repo: str, number: int) -> list[dict[str, Any]]:
        """Return every comment of issue or PR ``number``, oldest first, as the forge's JSON."""
        ...

    def create_comment(self, owner: str, repo: str, number: int, body: str) -> int:
        """Post a comment on issue or PR ``number`` and return its id."""
        ...

    def edit_comment(self, owner: str, repo: str, comment_id: int, body: str) -> None:
        """Replace the body of comment ``comment_id``."""
        ...

    def add_reaction(self, owner: str, repo: str, comment_id: int, content: str) -> None:
        """React to comment ``comment_id`` with ``content`` (e.g. "eyes"); already there is fine."""
        ...

    def set_status(
        self, owner: str, repo: str, sha: str, *, state: str, description: str, target_url: str, context: str
    ) -> None:
        """Set commit status ``context`` of ``sha``."""
        ...

    def latest_status(self, owner: str, repo: str, sha: str, context: str) -> dict[str, Any] | None:
        """Return the newest status of ``context`` on ``sha`` as the forge's JSON, or None."""
        ...


class GiteaClient:
    """The Gitea/Forgejo API v1 client: one ``requests.Session``, timeouts, bounded retries."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10,
        retries: int = 3,
        backoff: float = 0.5,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.api = base_url.rstrip("/") + "/api/v1"
        self.timeout = timeout
        self.on_error = on_error
        self._token = token
        self.session = requests.Session()
        self.session.headers.update(
            {
                "Authorization": f"token {token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "ccci",
            }
        )
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            redirect=0,
            backoff_factor=backoff,
            backoff_max=10,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "PATCH", "PUT", "DELETE"}),
            raise_on_status=False,
            # A Retry-After of minutes would stall the worker; the outbox reschedules instead.
            respect_retry_after_header=False,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"GiteaClient({self.api!r})"

    def close(self) -> None:
        """Close the session and its pooled connections."""
        self.session.close()

    def __enter__(self) -> GiteaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the Forge protocol ----------------------------------------------------------------------

    def get_pull(self, owner: str, repo: str, number: int) -> PullRequest:
        """Return the pull request ``owner/repo#number``."""
        data = self._json("GET", f"/repos/{_seg(owner)}/{_seg(repo)}/pulls/{int(number)}")
        try:
            head, base = data["head"], data["base"]
            pull = PullRequest(
                number=int(data["number"]),
                state=str(data["state"]),
                merged=bool(data.get("merged")),
                head_sha=str(head["sha"]),
                head_ref=str(head.get("ref") or ""),
                base_clone_url=str((base.get("repo") or {}).get("clone_url") or ""),
                html_url=str(data.get("html_url") or ""),
                private=(base.get("repo") or {}).get("private") is True,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._bad(f"GET pull {owner}/{repo}#{number}: unexpected response ({exc!r})") from None
        if not is_sha(pull.head_sha):
            raise self._bad(f"GET pull {owner}/{repo}#{number}: head sha {pull.head_sha[:80]!r} is not a sha")
        return pull

    def is_org_member(self, org: str, login: str) -> bool:
        """Return True only on 204; 404 and any redirect mean no; other answers raise ForgeError."""
        # A caller outside the org is redirected to public_members (docs/protocols.md §2);
        # following it would turn "I may not know" into "yes", so never follow.
        path = f"/orgs/{_seg(org)}/members/{_seg(login)}"
        response = self._request("GET", path, allow_redirects=False)
        if response.status_code == 204:
            return True
        if response.status_code == 404 or 300 <= response.status_code < 400:
            return False
        raise self._error("GET", path, response)

    def list_comments(self, owner: str, repo: str, number: int) -> list[dict[str, Any]]:
        """Return every comment of issue or PR ``number``, oldest first, as the forge's JSON."""
        # One request: Gitea and Forgejo page nothing here (only since/before narrow the list) and
        # answer with every comment; asking for page 2 just gets all of them again.
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/{int(number)}/comments"
        comments = self._json("GET", path)
        if not isinstance(comments, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("body"), str) for c in comments
        ):
            raise self._bad(f"GET {path}: unexpected response")
        return comments

    def create_comment(self, owner: str, repo: str, number: int, body: str) -> int:
        """Post a comment on issue or PR ``number`` and return its id."""
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/{int(number)}/comments"
        data = self._json("POST", path, json={"body": body})
        comment_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(comment_id, int):
            raise self._bad(f"POST {path}: the answer has no comment id")
        return comment_id

    def edit_comment(self, owner: str, repo: str, comment_id: int, body: str) -> None:
        """Replace the body of comment ``comment_id``."""
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/comments/{int(comment_id)}"
        self._request("PATCH", path, json={"body": body}, check=True)

    def add_reaction(self, owner: str, repo: str, comment_id: int, content: str) -> None:
        """React to comment ``comment_id`` with ``content``; 201 (new) and 200 (already there) both do."""
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/issues/comments/{int(comment_id)}/reactions"
        self._request("POST", path, json={"content": content}, check=True)

    def set_status(
        self, owner: str, repo: str, sha: str, *, state: str, description: str, target_url: str, context: str
    ) -> None:
        """Set commit status ``context`` of ``sha``; the latest status per context wins."""
        if state not in COMMIT_STATES:
            raise ValueError(f"status state must be one of {', '.join(COMMIT_STATES)}, not {state!r}")
        if not is_sha(sha):
            raise ValueError(f"{sha[:80]!r} is not a commit sha")
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/statuses/{sha}"
        body = {"state": state, "description": description, "target_url": target_url, "context": context}
        self._request("POST", path, json=body, check=True)

    def latest_status(self, owner: str, repo: str, sha: str, context: str) -> dict[str, Any] | None:
        """Return the newest status of ``context`` on ``sha``, from the combined status (latest per context)."""
        if not is_sha(sha):
            raise ValueError(f"{sha[:80]!r} is not a commit sha")
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/commits/{sha}/status"
        data = self._json("GET", path)
        statuses = data.get("statuses") if isinstance(data, dict) else None
        if not isinstance(statuses, list):
            raise self._bad(f"GET {path}: unexpected response")
        return next((s for s in statuses if isinstance(s, dict) and s.get("context") == context), None)

    # -- plumbing --------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, check=True, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise self._bad(f"{method} {path}: HTTP {response.status_code} without a JSON body") from None

    def _request(self, method: str, path: str, *, check: bool = False, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)
        try:
            response = self.session.request(method, self.api + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            # The chained exception is dropped (from None): nothing of the request's headers may
            # travel further than this line.
            message = self._redact(f"{method} {path}: forge unreachable ({type(exc).__name__}: {exc})")
            self._count("timeout" if isinstance(exc, requests.Timeout) else "unreachable")
            raise ForgeError(message[:500], None, True) from None
        if check and not 200 <= response.status_code < 300:
            raise self._error(method, path, response)
        return response

    def _error(self, method: str, path: str, response: requests.Response) -> ForgeError:
        status = response.status_code
        detail = ""
        try:
            data = response.json()
            if isinstance(data, dict) and isinstance(data.get("message"), str):
                detail = ": " + data["message"]
        except ValueError:
            pass
        message = self._redact(f"{method} {path}: HTTP {status}{detail}")[:500]
        self._count("server_error" if status >= 500 else "rate_limited" if status == 429 else "client_error")
        return ForgeError(message, status, transient=status >= 500 or status == 429)

    def _bad(self, message: str) -> ForgeError:
        """Return the error for an answer that makes no sense (a proxy's page, a changed API)."""
        self._count("bad_response")
        return ForgeError(message)

    def _count(self, kind: str) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(kind)
        except Exception:  # counting is for the metrics: it must never replace the forge's error
            log.exception("counting a forge error (%s) failed", kind)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def repo_web_url(clone_url: str) -> str:
    """Return a repository's web page from its HTTP(S) clone URL (Gitea's is the page + ``.git``), or ''.

    ``<page>/pulls/<n>`` is a pull request and ``<page>/commit/<sha>`` a commit on Gitea and
    Forgejo. Credentials in the URL are dropped: the result goes into comments and pages.
    """
    parsed = urlsplit(clone_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return ""
    host = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
    path = parsed.path.rstrip("/").removesuffix(".git")
    return urlunsplit((parsed.scheme, host, path, "", ""))


def _seg(part: str) -> str:
    """Quote one URL path segment, so a name can never add a segment or a query."""
    return quote(str(part), safe="")
