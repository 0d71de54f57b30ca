"""GiteaAdmin: what a test does to a real Gitea, through its API as the site admin.

The admin acts as any user with Gitea's ``Sudo`` header, so a test makes people (a member, an
outsider, a fork owner), an organisation with teams, repositories, pull requests and comments
exactly as those people would, and each of those writes makes Gitea send its real webhooks.
Commits arrive over Gitea's git smart HTTP (``Checkout``). ``GiteaWeb`` is a signed-in browser
session for the few things Gitea has no API for: a webhook's delivery history and its replay.

    admin = GiteaAdmin(instance.url, instance.admin_token)
    admin.create_user("alice1")
    admin.create_org("org1", members={"maintainers": ["alice1"]})
    checkout = Checkout.create(admin, "org1", "hello", tmp_path / "hello", user="alice1", password=PASSWORD)
    sha = checkout.push_branch("feature", {"a.txt": "1\\n"})
    pr = admin.create_pull("org1", "hello", head="feature", as_user="alice1")
    comment = admin.comment("org1", "hello", pr, "!testme", as_user="alice1")
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from tests.fakes.gitrepo import git

PASSWORD = "ccci-test-Passw0rd"  # every test user's password: a throwaway instance on loopback


class GiteaAdmin:
    """The site admin's API client; ``as_user=`` makes a call as that user (the Sudo header)."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.api = self.url + "/api/v1"
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"token {token}", "Accept": "application/json"})

    def close(self) -> None:
        """Close the session."""
        self.session.close()

    def call(self, method: str, path: str, *, as_user: str | None = None, ok=(200, 201, 204), **kw) -> Any:
        """Call the API; return the decoded JSON (None when empty); raise on an unexpected status."""
        headers = {"Sudo": as_user} if as_user else {}
        response = self.session.request(method, self.api + path, headers=headers, timeout=30, **kw)
        if response.status_code not in ok:
            who = as_user or "admin"
            raise AssertionError(f"{method} {path} as {who}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    # -- people and places -----------------------------------------------------------------------

    def create_user(self, login: str) -> None:
        """Create user ``login`` (password ``PASSWORD``), ready to use."""
        self.call(
            "POST",
            "/admin/users",
            json={
                "username": login,
                "email": f"{login}@ccci.invalid",
                "password": PASSWORD,
                "must_change_password": False,
            },
        )

    def create_org(self, org: str, *, members: Mapping[str, list[str]] | None = None) -> None:
        """Create ``org`` and, for each team name, a team with write access to all its repositories."""
        self.call("POST", "/orgs", json={"username": org, "visibility": "public"})
        for team, logins in dict(members or {}).items():
            created = self.call(
                "POST",
                f"/orgs/{org}/teams",
                json={
                    "name": team,
                    "permission": "write",
                    "includes_all_repositories": True,
                    "units": ["repo.code", "repo.issues", "repo.pulls"],
                },
            )
            for login in logins:
                self.call("PUT", f"/teams/{created['id']}/members/{login}")

    def create_repo(self, org: str, name: str) -> dict[str, Any]:
        """Create an empty public repository ``org/name`` (its first commit comes over git)."""
        return self.call("POST", f"/orgs/{org}/repos", json={"name": name, "default_branch": "main"})

    def fork(self, owner: str, repo: str, *, as_user: str) -> dict[str, Any]:
        """Fork ``owner/repo`` into ``as_user``'s account."""
        return self.call("POST", f"/repos/{owner}/{repo}/forks", json={}, as_user=as_user, ok=(202,))

    def create_org_hook(self, org: str, url: str, secret: str, *, events=("pull_request_comment",)) -> int:
        """Add an active JSON webhook for ``events`` to ``org``; return its id."""
        hook = self.call(
            "POST",
            f"/orgs/{org}/hooks",
            json={
                "type": "gitea",
                "active": True,
                "events": list(events),
                "config": {"url": url, "content_type": "json", "secret": secret},
            },
        )
        return hook["id"]

    # -- pull requests and comments --------------------------------------------------------------

    def create_pull(self, owner: str, repo: str, *, head: str, as_user: str, base: str = "main") -> int:
        """Open a pull request of ``head`` (``branch`` or ``user:branch``) into ``base``; return its number."""
        pull = self.call(
            "POST",
            f"/repos/{owner}/{repo}/pulls",
            json={"head": head, "base": base, "title": f"Change the recipe ({head})"},
            as_user=as_user,
        )
        return pull["number"]

    def pull(self, owner: str, repo: str, number: int) -> dict[str, Any]:
        """Return pull request ``number`` as Gitea has it now."""
        return self.call("GET", f"/repos/{owner}/{repo}/pulls/{number}")

    def close_pull(self, owner: str, repo: str, number: int, *, as_user: str) -> None:
        """Close pull request ``number`` without merging it."""
        self.call("PATCH", f"/repos/{owner}/{repo}/pulls/{number}", json={"state": "closed"}, as_user=as_user)

    def comment(self, owner: str, repo: str, number: int, body: str, *, as_user: str) -> dict[str, Any]:
        """Comment on issue or PR ``number`` as ``as_user``; return the comment."""
        path = f"/repos/{owner}/{repo}/issues/{number}/comments"
        return self.call("POST", path, json={"body": body}, as_user=as_user)

    def edit_comment(self, owner: str, repo: str, comment_id: int, body: str, *, as_user: str) -> None:
        """Replace comment ``comment_id``'s body, as its author."""
        path = f"/repos/{owner}/{repo}/issues/comments/{comment_id}"
        self.call("PATCH", path, json={"body": body}, as_user=as_user)

    def comments(self, owner: str, repo: str, number: int) -> list[dict[str, Any]]:
        """Return every comment of issue or PR ``number``, oldest first."""
        return self.call("GET", f"/repos/{owner}/{repo}/issues/{number}/comments")

    def comments_by(self, owner: str, repo: str, number: int, login: str) -> list[dict[str, Any]]:
        """Return the comments ``login`` made on ``number``."""
        return [c for c in self.comments(owner, repo, number) if c["user"]["login"] == login]

    def reactions(self, owner: str, repo: str, comment_id: int) -> list[tuple[str, str]]:
        """Return the reactions on a comment as (login, content) pairs."""
        found = self.call("GET", f"/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions") or []
        return [(r["user"]["login"], r["content"]) for r in found]

    def statuses(self, owner: str, repo: str, sha: str) -> list[dict[str, Any]]:
        """Return the commit statuses of ``sha``, oldest first."""
        found = self.call("GET", f"/repos/{owner}/{repo}/commits/{sha}/statuses", params={"limit": 50})
        return sorted(found, key=lambda s: s["id"])

    def comment_history(self, owner: str, repo: str, number: int, comment_id: int) -> list[str]:
        """Return every text comment ``comment_id`` has had, oldest first, from Gitea's edit history."""
        base = f"{self.url}/{owner}/{repo}/issues/{number}/content-history"
        listed = requests.get(f"{base}/list", params={"comment_id": comment_id}, timeout=30)
        listed.raise_for_status()
        texts = []
        # Ordered by id: the list is by edit time in seconds, which ties when edits come fast.
        for item in sorted(listed.json()["results"] or [], key=lambda i: i["value"]):
            detail = requests.get(
                f"{base}/detail", params={"comment_id": comment_id, "history_id": item["value"]}, timeout=30
            )
            detail.raise_for_status()
            texts.append(_revision_text(detail.json()["diffHtml"]))
        return texts


def _revision_text(diff_html: str) -> str:
    """Return the text of one revision from Gitea's diff of it against the one before."""
    # routers/web/repo/issue_content_history.go: deleted text in <span class='gd'>, inserted in 'gi'.
    without_removed = re.sub(r"<span class='gd'>.*?</span>", "", diff_html, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", "", without_removed))


@dataclass
class Checkout:
    """A clone of a Gitea repository that pushes over Gitea's git smart HTTP as one user."""

    path: Path
    remote: str  # the clone URL with the user's credentials

    @classmethod
    def create(cls, admin: GiteaAdmin, owner: str, repo: str, path: Path, *, user: str, password: str) -> Checkout:
        """Clone ``owner/repo`` into ``path`` as ``user`` (an empty repository gets a first commit on main)."""
        info = admin.call("GET", f"/repos/{owner}/{repo}")
        parts = urlsplit(info["clone_url"])
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
        remote = urlunsplit(parts._replace(netloc=netloc))
        git("clone", "-q", remote, str(path))
        checkout = cls(path, remote)
        if info["empty"]:
            checkout.commit_and_push("main", {"README.md": f"# {repo}\n"}, "Initial recipe")
        return checkout

    def push_branch(self, branch: str, files: Mapping[str, str], message: str = "Change the recipe") -> str:
        """Start ``branch`` from main with ``files`` committed, push it; return its head sha."""
        git("fetch", "-q", "origin", cwd=self.path)
        git("checkout", "-q", "-B", branch, "origin/main", cwd=self.path)
        return self._commit_push(branch, files, message)

    def commit_and_push(self, branch: str, files: Mapping[str, str], message: str = "Address review") -> str:
        """Commit ``files`` on top of ``branch`` (created if new), push it; return the new sha."""
        git("fetch", "-q", "origin", cwd=self.path)
        if git("ls-remote", "--heads", "origin", branch, cwd=self.path):
            git("checkout", "-q", "-B", branch, f"origin/{branch}", cwd=self.path)
        else:
            git("checkout", "-q", "--orphan", branch, cwd=self.path)
        return self._commit_push(branch, files, message)

    def _commit_push(self, branch: str, files: Mapping[str, str], message: str) -> str:
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            git("add", "--", rel, cwd=self.path)
        git("commit", "-q", "-m", message, cwd=self.path)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.path)
        return git("rev-parse", "HEAD", cwd=self.path)


class GiteaWeb:
    """A signed-in session on Gitea's web pages, as a script (not a browser) has one.

    Gitea 1.26 has no CSRF tokens any more: its forms are guarded by Go's cross-origin
    protection (``Sec-Fetch-Site``/``Origin``), which lets a client that sends neither through.
    """

    def __init__(self, url: str, login: str, password: str):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        answer = self.session.post(
            f"{self.url}/user/login",
            data={"user_name": login, "password": password},
            timeout=30,
            allow_redirects=False,
        )
        if answer.status_code not in (302, 303):
            raise AssertionError(f"signing in to Gitea as {login} failed: HTTP {answer.status_code}")

    def close(self) -> None:
        """Close the session."""
        self.session.close()

    def org_hook_deliveries(self, org: str, hook_id: int) -> list[Delivery]:
        """Return the hook's delivery history as Gitea shows it (newest first)."""
        page = self.session.get(f"{self.url}/org/{org}/settings/hooks/{hook_id}", timeout=30)
        page.raise_for_status()
        return _deliveries(page.text)

    def replay_org_hook(self, org: str, hook_id: int, uuid: str) -> None:
        """Press "replay" on one delivery: Gitea sends its payload again, as a new delivery."""
        page_url = f"{self.url}/org/{org}/settings/hooks/{hook_id}"
        answer = self.session.post(f"{page_url}/replay/{uuid}", timeout=30, allow_redirects=False)
        if answer.status_code not in (302, 303):
            raise AssertionError(f"replaying delivery {uuid} failed: HTTP {answer.status_code} {answer.text[:300]}")


@dataclass(frozen=True)
class Delivery:
    """One entry of a webhook's delivery history."""

    uuid: str
    status: int | None  # the receiver's HTTP status; 0 if it never answered, None if not sent yet
    request_body: str  # the payload, once sent ("" before)
    response_body: str

    def about(self, comment_id: int) -> bool:
        """Tell whether this delivery carried an event about comment ``comment_id``."""
        return bool(self.request_body) and json.loads(self.request_body).get("comment", {}).get("id") == comment_id


def _deliveries(page: str) -> list[Delivery]:
    """Parse the delivery list of a webhook settings page (templates/repo/settings/webhook/history.tmpl)."""
    found = []
    for item in re.split(r'<div class="item">', page)[1:]:
        uuid = re.search(r'data-panel="#info-\d+">([0-9a-f-]{36})</button>', item)
        if uuid is None:
            continue
        status = re.search(r'<span class="ui (?:green|red) label">(\d+)</span>', item)
        pres = re.findall(r'<pre class="webhook-info">(.*?)</pre>', item, flags=re.DOTALL)
        request_body = html.unescape(pres[1]) if len(pres) > 1 else ""
        response_body = html.unescape(pres[3]) if len(pres) > 3 else ""
        found.append(Delivery(uuid.group(1), int(status.group(1)) if status else None, request_body, response_body))
    return found
