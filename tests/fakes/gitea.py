"""FakeGitea: a real HTTP server on 127.0.0.1 that answers like Gitea's API v1 and serves git.

Only what ccci calls is implemented, in Gitea's documented shapes and status codes
(docs/protocols.md §2); everything else is a 404. The fake keeps state (pull requests, comments
with their edit history, reactions, commit statuses, org members), records every request as
a ``Call``, and wakes ``wait_for`` on each one — tests wait on a condition, never sleep.

    with FakeGitea(git_root=tmp_path) as gitea:
        repo = make_recipe_repo(tmp_path)                    # tests/fakes/gitrepo.py
        sha = repo.open_pr(7, {"compose.yml": "…"})
        gitea.open_pr("coop-cloud", "custom-html", 7, sha)
        comment = gitea.post_comment("coop-cloud", "custom-html", 7, "!testme", user="alice")
        payload = gitea.comment_payload(comment.id)          # what the webhook would carry
        client = GiteaClient(gitea.url, gitea.token)
        gitea.wait_for(lambda g: g.statuses.get(sha))

API:  {gitea.url}/api/v1/…, requiring ``Authorization: token <gitea.token>`` (401 otherwise).
Git:  {gitea.url}/<owner>/<repo>.git, smart HTTP through ``git http-backend`` over the bare
      repositories under ``git_root`` (``<git_root>/<owner>/<repo>.git``), refs/pull/* included.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from .gitrepo import git
from .server import FakeHandler, FakeServer

T = TypeVar("T")
REACTIONS = ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")  # [ui] REACTIONS default
COMMIT_STATES = ("pending", "success", "error", "failure", "warning")
_T0 = "2025-06-02T14:00:00Z"


@dataclass(frozen=True)
class Call:
    """One request the fake answered: ``time`` is ``time.monotonic()`` when it was recorded."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    json: Any  # the decoded JSON body, or None
    status: int
    time: float


@dataclass
class FakePull:
    """A pull request as the fake forge knows it."""

    owner: str
    repo: str
    number: int
    head_sha: str
    head_ref: str
    base_ref: str
    base_sha: str
    state: str = "open"
    merged: bool = False
    user: str = "bob"
    title: str = "Change the recipe"


@dataclass
class FakeComment:
    """A comment and every body it has had (``history``, oldest first, excludes ``body``)."""

    id: int
    owner: str
    repo: str
    number: int
    body: str
    user: str
    history: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))  # unix seconds, as Gitea keeps them
    updated: int = field(default_factory=lambda: int(time.time()))


class FakeGitea(FakeServer):
    """A Gitea API v1 and git smart-HTTP server for tests; use it as a context manager."""

    def __init__(self, *, token: str = "fake-gitea-token", git_root: Path | str | None = None, bot_login: str = "ccci"):
        self.token = token
        self.git_root = Path(git_root) if git_root is not None else None
        self.bot_login = bot_login
        super().__init__()
        self.handler, self.name = _Handler, "fake-gitea"
        self.pulls: dict[tuple[str, str, int], FakePull] = {}
        self.comments: dict[int, FakeComment] = {}
        self.reactions: dict[int, list[tuple[str, str]]] = {}  # comment id -> [(user, content)]
        self.statuses: dict[str, list[dict[str, Any]]] = {}  # sha -> statuses, in posting order
        self.members: dict[str, set[str]] = {}  # org (lower) -> logins (lower)
        self.hidden_orgs: set[str] = set()  # orgs the bot is not in: /members redirects
        # ccci's account has write access to the repositories (commit statuses need it), and with
        # it Gitea lets it edit anyone's comment, not only its own.
        self.bot_can_write = True
        self.down = False
        self.held: list[list[Any]] = []  # [method, path pattern, release, answers still to hold]
        self._ids = iter(range(1000, 10**9))

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and release the socket; safe to call twice."""
        super().close()

    def clone_url(self, owner: str, repo: str) -> str:
        """Return the HTTP clone URL of ``owner/repo``."""
        return f"{self.url}/{owner}/{repo}.git"

    # -- test controls ---------------------------------------------------------------------------

    def open_pr(
        self,
        owner: str,
        repo: str,
        number: int,
        head_sha: str,
        state: str = "open",
        *,
        head_ref: str | None = None,
        base_ref: str = "main",
        user: str = "bob",
        title: str = "Change the recipe",
    ) -> FakePull:
        """Create (or replace) PR ``number``; with a repo on disk, point refs/pull/<n>/head at it."""
        base_sha = self._git_rev(owner, repo, f"refs/heads/{base_ref}") or "0" * 40
        pull = FakePull(
            owner, repo, number, head_sha, head_ref or f"pr-{number}", base_ref, base_sha, state, user=user, title=title
        )
        with self._cond:
            self.pulls[(owner, repo, number)] = pull
            self._set_pull_ref(pull)
            self._cond.notify_all()
        return pull

    def move_head(self, owner: str, repo: str, number: int, head_sha: str) -> None:
        """Make ``head_sha`` the head of PR ``number`` (a push to the PR branch)."""
        with self._cond:
            pull = self.pulls[(owner, repo, number)]
            pull.head_sha = head_sha
            self._set_pull_ref(pull)
            self._cond.notify_all()

    def close_pr(self, owner: str, repo: str, number: int, *, merged: bool = False) -> None:
        """Close PR ``number``, merged or not."""
        with self._cond:
            pull = self.pulls[(owner, repo, number)]
            pull.state, pull.merged = "closed", merged
            self._cond.notify_all()

    def add_member(self, org: str, login: str) -> None:
        """Make ``login`` a member of ``org``."""
        with self._cond:
            self.members.setdefault(org.lower(), set()).add(login.lower())
            self._cond.notify_all()

    def hide_members(self, org: str, hidden: bool = True) -> None:
        """Act as if ccci's account is not in ``org``: membership checks then redirect (303)."""
        with self._cond:
            (self.hidden_orgs.add if hidden else self.hidden_orgs.discard)(org.lower())

    def set_down(self, down: bool) -> None:
        """Answer 503 to every API request while ``down`` (git keeps serving)."""
        with self._cond:
            self.down = down
            self._cond.notify_all()

    def hold_after_write(self, method: str, pattern: str, times: int = 1) -> threading.Event:
        """Apply the next ``times`` matching requests but hold their answers until the event is set.

        The write has landed on the forge, and the client has not heard so: what a crash of the
        client between sending and recording looks like from here.
        """
        release = threading.Event()
        with self._cond:
            self.held.append([method, pattern, release, times])
        return release

    def post_comment(self, owner: str, repo: str, number: int, body: str, *, user: str = "alice") -> FakeComment:
        """Add a comment as ``user`` directly (a person commenting), without an API call."""
        with self._cond:
            comment = FakeComment(next(self._ids), owner, repo, number, body, user)
            self.comments[comment.id] = comment
            self._cond.notify_all()
            return comment

    def comment_payload(self, comment_id: int, action: str = "created") -> dict[str, Any]:
        """Return the IssueCommentPayload the forge would send for comment ``comment_id``."""
        with self._cond:
            c = self.comments[comment_id]
            pull = self.pulls.get((c.owner, c.repo, c.number))
            payload = {
                "action": action,
                "issue": self._issue_json(c.owner, c.repo, c.number, pull),
                "comment": self._comment_json(c),
                "repository": self._repo_json(c.owner, c.repo),
                "sender": _user(c.user),
                "is_pull": pull is not None,
            }
            if action == "edited" and c.history:
                payload["changes"] = {"body": {"from": c.history[-1]}}
            return payload

    # -- reading state ---------------------------------------------------------------------------

    def comments_on(self, owner: str, repo: str, number: int) -> list[FakeComment]:
        """Return the comments of PR ``number``, oldest first."""
        with self._cond:
            return [c for c in self.comments.values() if (c.owner, c.repo, c.number) == (owner, repo, number)]

    def api_calls(self, method: str | None = None, pattern: str = "") -> list[Call]:
        """Return recorded API calls, optionally only ``method`` ones whose path matches ``pattern``."""
        with self._cond:
            return [
                c
                for c in self.calls
                if c.path.startswith("/api/v1/")
                and (method is None or c.method == method)
                and re.search(pattern, c.path)
            ]

    # -- HTTP ------------------------------------------------------------------------------------

    def _record(self, method: str, path: str, query: dict[str, str], body: Any, status: int) -> None:
        with self._cond:
            self.calls.append(Call(method, path, query, body, status, time.monotonic()))
            self._cond.notify_all()

    def _api(
        self, method: str, path: str, query: dict[str, str], headers: Any, body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        """Answer one API request: (status, JSON body or None, extra headers)."""
        if self.down:
            return 503, {"message": "fake forge is down"}, {}
        if headers.get("Authorization") != f"token {self.token}":
            message = "invalid username, password or token" if headers.get("Authorization") else "token is required"
            return 401, {"message": message, "url": f"{self.url}/api/swagger"}, {}
        for route_method, pattern, handler in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and route_method == method:
                with self._cond:
                    return handler(self, body, query, **m.groupdict())
        return 404, {"message": "Not Found", "url": f"{self.url}/api/swagger"}, {}

    def _missing_issue(self) -> tuple[int, Any, dict]:
        # The comment endpoints look the issue up and answer any failure, "does not exist"
        # included, as an internal error (routers/api/v1/repo/issue_comment.go): a 500, not a 404,
        # whose text ("issue does not exist [...]") only a site admin gets to read.
        return 500, {"message": "", "url": f"{self.url}/api/swagger"}, {}

    def _get_pull(self, body: Any, query: Any, owner: str, repo: str, n: str) -> tuple[int, Any, dict]:
        pull = self.pulls.get((owner, repo, int(n)))
        if pull is None:
            return _not_found()
        return 200, self._pull_json(pull), {}

    def _is_member(self, body: Any, query: Any, org: str, login: str) -> tuple[int, Any, dict]:
        if org.lower() in self.hidden_orgs:
            return 303, None, {"Location": f"{self.url}/api/v1/orgs/{org}/public_members/{login}"}
        return (204, None, {}) if login.lower() in self.members.get(org.lower(), ()) else (404, None, {})

    def _is_public_member(self, body: Any, query: Any, org: str, login: str) -> tuple[int, Any, dict]:
        # Every membership is public here: a client that follows the redirect is told "yes".
        return (204, None, {}) if login.lower() in self.members.get(org.lower(), ()) else (404, None, {})

    def _list_comments(self, body: Any, query: dict[str, str], owner: str, repo: str, n: str) -> tuple[int, Any, dict]:
        # routers/api/v1/repo/issue_comment.go ListIssueComments: no paging at all (page and limit
        # are ignored); only since/before, RFC 3339, compared with updated_at in whole seconds.
        bounds = {}
        for key in ("since", "before"):
            if query.get(key, "").strip():
                try:
                    bounds[key] = int(datetime.fromisoformat(query[key].strip()).timestamp())
                except ValueError:
                    return 422, {"message": f'parsing time "{query[key]}" as RFC 3339 failed'}, {}
        if (owner, repo, int(n)) not in self.pulls:
            return self._missing_issue()
        items = [
            c
            for c in self.comments_on(owner, repo, int(n))
            if c.updated >= bounds.get("since", 0) and c.updated <= bounds.get("before", 1 << 62)
        ]
        items.sort(key=lambda c: (c.created, c.id))
        return 200, [self._comment_json(c) for c in items], {}

    def _create_comment(self, body: Any, query: Any, owner: str, repo: str, n: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict) or not isinstance(body.get("body"), str) or not body["body"]:
            return 422, {"message": "[Body]: Required"}, {}  # the form binding answers before the handler
        if (owner, repo, int(n)) not in self.pulls:
            return self._missing_issue()
        comment = FakeComment(next(self._ids), owner, repo, int(n), body["body"], self.bot_login)
        self.comments[comment.id] = comment
        return 201, self._comment_json(comment), {}

    def _get_comment(self, body: Any, query: Any, owner: str, repo: str, cid: str) -> tuple[int, Any, dict]:
        comment = self.comments.get(int(cid))
        if comment is None or (comment.owner, comment.repo) != (owner, repo):
            return _not_found()
        return 200, self._comment_json(comment), {}

    def _edit_comment(self, body: Any, query: Any, owner: str, repo: str, cid: str) -> tuple[int, Any, dict]:
        comment = self.comments.get(int(cid))
        if comment is None or (comment.owner, comment.repo) != (owner, repo):
            return _not_found()
        if not isinstance(body, dict) or not isinstance(body.get("body"), str):
            return 422, {"message": "[Body]: Required"}, {}
        if comment.user != self.bot_login and not self.bot_can_write:
            return 403, None, {}  # editIssueComment: neither the poster nor a writer, an empty 403
        comment.history.append(comment.body)
        comment.body = body["body"]
        comment.updated = int(time.time())
        return 200, self._comment_json(comment), {}

    def _add_reaction(self, body: Any, query: Any, owner: str, repo: str, cid: str) -> tuple[int, Any, dict]:
        comment = self.comments.get(int(cid))
        if comment is None or (comment.owner, comment.repo) != (owner, repo):
            return _not_found()
        content = body.get("content") if isinstance(body, dict) else None
        if content not in REACTIONS:
            return 403, {"message": f"'{content}' is not an allowed reaction"}, {}
        reaction = {"user": _user(self.bot_login), "content": content, "created_at": _T0}
        existing = self.reactions.setdefault(comment.id, [])
        if (self.bot_login, content) in existing:
            return 200, reaction, {}
        existing.append((self.bot_login, content))
        return 201, reaction, {}

    def _set_status(self, body: Any, query: Any, owner: str, repo: str, sha: str) -> tuple[int, Any, dict]:
        if not isinstance(body, dict) or body.get("state") not in COMMIT_STATES:
            return 422, {"message": "[State]: invalid state"}, {}
        entries = self.statuses.setdefault(sha, [])
        status = {
            "id": len(entries) + 1,
            "state": body["state"],
            "status": body["state"],
            "target_url": body.get("target_url", ""),
            "description": body.get("description", ""),
            "context": body.get("context", ""),
            "url": f"{self.url}/api/v1/repos/{owner}/{repo}/statuses/{sha}",
            "creator": _user(self.bot_login),
            "created_at": _T0,
            "updated_at": _T0,
        }
        entries.append(status)
        return 201, status, {}

    def _combined_status(self, body: Any, query: Any, owner: str, repo: str, ref: str) -> tuple[int, Any, dict]:
        # routers/api/v1/repo/status.go GetCombinedCommitStatusByRef: the latest status per context.
        latest: dict[str, dict[str, Any]] = {}
        for status in self.statuses.get(ref, []):
            latest[status["context"]] = status
        statuses = list(latest.values())
        order = ("error", "failure", "warning", "pending", "success")
        state = next((s for s in order if any(x["state"] == s for x in statuses)), "")
        repo_json = self._repo_json(owner, repo)
        return 200, {"state": state, "sha": ref, "total_count": len(statuses), "statuses": statuses,
                     "repository": repo_json, "commit_url": "", "url": ""}, {}  # fmt: skip

    # -- JSON shapes (modules/structs) -----------------------------------------------------------

    def _repo_json(self, owner: str, repo: str) -> dict[str, Any]:
        return {
            "id": zlib.crc32(f"{owner}/{repo}".encode()) % 10**6,
            "owner": _user(owner),
            "name": repo,
            "full_name": f"{owner}/{repo}",
            "private": False,
            "fork": False,
            "html_url": f"{self.url}/{owner}/{repo}",
            "clone_url": self.clone_url(owner, repo),
            "ssh_url": f"ssh://git@127.0.0.1:2222/{owner}/{repo}.git",
            "default_branch": "main",
            "permissions": {"admin": False, "push": False, "pull": True},
        }

    def _pull_json(self, p: FakePull) -> dict[str, Any]:
        repo = self._repo_json(p.owner, p.repo)
        html = f"{self.url}/{p.owner}/{p.repo}/pulls/{p.number}"
        return {
            "id": p.number + 5000,
            "url": html,
            "number": p.number,
            "user": _user(p.user),
            "title": p.title,
            "body": "",
            "state": p.state,
            "draft": False,
            "merged": p.merged,
            "merged_at": _T0 if p.merged else None,
            "mergeable": p.state == "open",
            "html_url": html,
            "diff_url": html + ".diff",
            "patch_url": html + ".patch",
            "head": {"label": p.head_ref, "ref": p.head_ref, "sha": p.head_sha, "repo_id": repo["id"], "repo": repo},
            "base": {"label": p.base_ref, "ref": p.base_ref, "sha": p.base_sha, "repo_id": repo["id"], "repo": repo},
            "merge_base": p.base_sha,
            "created_at": _T0,
            "updated_at": _T0,
        }

    def _issue_json(self, owner: str, repo: str, number: int, pull: FakePull | None) -> dict[str, Any]:
        kind = "pulls" if pull else "issues"
        html = f"{self.url}/{owner}/{repo}/{kind}/{number}"
        return {
            "id": number + 2000,
            "url": f"{self.url}/api/v1/repos/{owner}/{repo}/issues/{number}",
            "html_url": html,
            "number": number,
            "user": _user(pull.user if pull else "bob"),
            "title": pull.title if pull else "An issue",
            "body": "",
            "state": pull.state if pull else "open",
            "pull_request": {"merged": pull.merged, "merged_at": None, "draft": False, "html_url": html}
            if pull
            else None,
            "repository": {"id": 1, "name": repo, "owner": owner, "full_name": f"{owner}/{repo}"},
        }

    def _comment_json(self, c: FakeComment) -> dict[str, Any]:
        html = f"{self.url}/{c.owner}/{c.repo}/pulls/{c.number}"
        return {
            "id": c.id,
            "html_url": f"{html}#issuecomment-{c.id}",
            "pull_request_url": html,
            "issue_url": "",
            "user": _user(c.user),
            "original_author": "",
            "original_author_id": 0,
            "body": c.body,
            "assets": [],
            "created_at": _rfc3339(c.created),
            "updated_at": _rfc3339(c.updated),
        }

    # -- git -------------------------------------------------------------------------------------

    def _bare(self, owner: str, repo: str) -> Path | None:
        if self.git_root is None:
            return None
        path = self.git_root / owner / f"{repo}.git"
        return path if path.is_dir() else None

    def _git_rev(self, owner: str, repo: str, ref: str) -> str:
        bare = self._bare(owner, repo)
        if bare is None:
            return ""
        try:
            return git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=bare)
        except RuntimeError:
            return ""

    def _set_pull_ref(self, pull: FakePull) -> None:
        bare = self._bare(pull.owner, pull.repo)
        if bare is not None:  # update-ref refuses a sha the repository does not have
            git("update-ref", f"refs/pull/{pull.number}/head", pull.head_sha, cwd=bare)


_ROUTES: list[tuple[str, str, Callable[..., tuple[int, Any, dict[str, str]]]]] = [
    ("GET", r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/pulls/(?P<n>\d+)", FakeGitea._get_pull),
    ("GET", r"/api/v1/orgs/(?P<org>[^/]+)/members/(?P<login>[^/]+)", FakeGitea._is_member),
    ("GET", r"/api/v1/orgs/(?P<org>[^/]+)/public_members/(?P<login>[^/]+)", FakeGitea._is_public_member),
    ("GET", r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/(?P<n>\d+)/comments", FakeGitea._list_comments),
    ("POST", r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/(?P<n>\d+)/comments", FakeGitea._create_comment),
    ("GET", r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/comments/(?P<cid>\d+)", FakeGitea._get_comment),
    ("PATCH", r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/comments/(?P<cid>\d+)", FakeGitea._edit_comment),
    (
        "POST",
        r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/comments/(?P<cid>\d+)/reactions",
        FakeGitea._add_reaction,
    ),
    (
        "POST",
        r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/statuses/(?P<sha>[0-9a-f]{40,64})",
        FakeGitea._set_status,
    ),
    (
        "GET",
        r"/api/v1/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/commits/(?P<ref>[^/]+)/status",
        FakeGitea._combined_status,
    ),
]


def _rfc3339(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_found() -> tuple[int, Any, dict[str, str]]:
    return 404, {"errors": None, "message": "not found"}, {}


def _user(login: str) -> dict[str, Any]:
    return {
        "id": zlib.crc32(login.encode()) % 10**6,
        "login": login,
        "username": login,
        "full_name": "",
        "email": f"{login}@noreply.invalid",
    }


class _Handler(FakeHandler):
    """Route one request to the fake's API or to git http-backend."""

    server_version = "FakeGitea/1.24"

    def _handle(self) -> None:
        fake: FakeGitea = self.server.fake  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        raw = self._read_body()
        if split.path.startswith("/api/"):
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            status, payload, headers = fake._api(self.command, split.path, query, self.headers, body)
            fake._record(self.command, split.path, query, body, status)
            with fake._cond:
                holds = [h for h in fake.held if h[0] == self.command and re.search(h[1], split.path) and h[3] > 0]
                for hold in holds:
                    hold[3] -= 1
            for hold in holds:
                hold[2].wait(60)
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if data:
                self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        status = self._git(fake, split.path, split.query, raw)
        fake._record(self.command, split.path, {}, None, status)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _git(self, fake: FakeGitea, path: str, query: str, body: bytes) -> int:
        m = re.fullmatch(r"/(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+)\.git(?P<rest>/.*)", path)
        if fake.git_root is None or m is None or fake._bare(m["owner"], m["repo"]) is None:
            self.send_error(404)
            return 404
        env = {
            "GIT_PROJECT_ROOT": str(fake.git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            # Let a client fetch any commit by sha, as Gitea does.
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "uploadpack.allowAnySHA1InWant",
            "GIT_CONFIG_VALUE_0": "true",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
        }
        for header, var in (("Content-Encoding", "HTTP_CONTENT_ENCODING"), ("Git-Protocol", "HTTP_GIT_PROTOCOL")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        proc = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        if proc.returncode != 0 and status == 200:
            status = 500
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return status


@pytest.fixture
def fake_gitea(tmp_path: Path):
    """A started FakeGitea serving git from ``tmp_path / "git"``, closed after the test.

    Use it with ``pytest_plugins = ["tests.fakes.gitea"]`` in the root conftest.
    """
    root = tmp_path / "git"
    root.mkdir()
    with FakeGitea(git_root=root) as gitea:
        yield gitea
