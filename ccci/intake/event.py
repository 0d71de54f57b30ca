"""The event: a forge delivery reduced to the one thing ccci acts on, a new PR comment.

``parse_event`` reads the event name from the headers and the already-decoded JSON payload and
returns either a ``CommentEvent`` (a new comment on an open pull request, by someone other
than ccci, mentioning the trigger) or ``Ignored`` with a short reason for the webhook's reply.
A payload that claims to be an ``issue_comment`` but lacks a field ccci relies on, has the
wrong type for it, or names an owner/repo that is not safe in a URL or a path raises
``MalformedEvent`` (the view answers 400). Field facts: docs/protocols.md §1.2 and §1.4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..names import is_id, is_login, is_repo_name
from .headers import Headers, first_value

_MARKER = "<!-- ccci:run="


class MalformedEvent(ValueError):
    """The payload says it is a comment event but is not shaped like one."""


@dataclass(frozen=True)
class Ignored:
    """A delivery ccci does not act on, and why (said in the webhook's reply)."""

    reason: str


@dataclass(frozen=True)
class CommentEvent:
    """A new comment on an open pull request: the input to the grammar and the policy."""

    delivery: str  # the forge's delivery id, or "" (a redelivery gets a new one; dedupe on comment_id)
    owner: str
    repo: str
    full_name: str
    pr: int
    comment_id: int
    body: str
    author: str
    clone_url: str
    pr_url: str
    forge: str  # "gitea" or "forgejo"


def parse_event(
    headers: Headers, payload: Any, *, bot_login: str = "", trigger: str = "!testme"
) -> CommentEvent | Ignored:
    """Reduce a delivery to a CommentEvent, or say why it is Ignored."""
    name = first_value(headers, "X-Gitea-Event", "X-Forgejo-Event", "X-Gogs-Event")
    if not name:
        return Ignored("no event name in the headers")
    if name != "issue_comment":
        return Ignored(f"event {_short(name)} is ignored")
    if not isinstance(payload, Mapping):
        raise MalformedEvent("the payload is not a JSON object")

    action = _field(payload, "action", str)
    issue = _field(payload, "issue", Mapping)
    comment = _field(payload, "comment", Mapping)
    repository = _field(payload, "repository", Mapping)
    number = _positive(issue, "issue.number")
    state = _field(issue, "state", str, "issue.state")
    comment_id = _positive(comment, "comment.id")
    body = _field(comment, "body", str, "comment.body")
    author = _field(_field(comment, "user", Mapping, "comment.user"), "login", str, "comment.user.login")
    owner = _field(_field(repository, "owner", Mapping, "repository.owner"), "login", str, "repository.owner.login")
    repo = _field(repository, "name", str, "repository.name")
    full_name = _field(repository, "full_name", str, "repository.full_name")
    clone_url = _field(repository, "clone_url", str, "repository.clone_url")
    pull_meta = issue.get("pull_request")
    if pull_meta is not None and not isinstance(pull_meta, Mapping):
        raise MalformedEvent("issue.pull_request must be an object or null")
    is_pull = payload.get("is_pull")
    if is_pull is None:  # Gitea before 1.12 has no is_pull
        is_pull = pull_meta is not None
    elif not isinstance(is_pull, bool):
        raise MalformedEvent("is_pull must be true or false")

    for what, value in (("repository.owner.login", owner), ("repository.name", repo)):
        if not is_repo_name(value):
            raise MalformedEvent(f"{what} {_short(value)!r} is not a safe repository name")
    if full_name.lower() != f"{owner}/{repo}".lower():
        raise MalformedEvent("repository.full_name does not match owner and name")
    if not is_login(author):
        raise MalformedEvent(f"comment.user.login {_short(author)!r} is not a forge login")
    # The URL is handed to git: http(s) only, never ext:: or file:// or a local path.
    if not re.fullmatch(r"https?://[^\s/]+/\S*", clone_url):
        raise MalformedEvent("repository.clone_url is not an http(s) URL")
    pr_url = _pr_url(issue, pull_meta)

    if not is_pull:
        return Ignored("not a pull request comment")
    if action != "created":
        return Ignored(f"action {_short(action)} is ignored")
    if (bot_login and author.lower() == bot_login.lower()) or _MARKER in body:
        return Ignored("comment by ccci itself")
    if state != "open":
        return Ignored("pull request is closed")
    if trigger.lower() not in body.lower():
        return Ignored(f"no {trigger} in the comment")
    return CommentEvent(
        delivery=first_value(headers, "X-Gitea-Delivery", "X-Forgejo-Delivery"),
        owner=owner,
        repo=repo,
        full_name=full_name,
        pr=number,
        comment_id=comment_id,
        body=body,
        author=author,
        clone_url=clone_url,
        pr_url=pr_url,
        forge="forgejo" if first_value(headers, "X-Forgejo-Event", "X-Forgejo-Delivery") else "gitea",
    )


def _field(obj: Mapping[str, Any], key: str, kind: type, path: str = "") -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise MalformedEvent(f"{path or key} is missing or not {'a string' if kind is str else 'an object'}")
    return value


def _positive(obj: Mapping[str, Any], path: str) -> int:
    value = obj.get(path.rsplit(".", 1)[-1])
    if not is_id(value):
        raise MalformedEvent(f"{path} is missing or not a positive integer below 2^63")
    return value


def _pr_url(issue: Mapping[str, Any], pull_meta: Mapping[str, Any] | None) -> str:
    for url in ((pull_meta or {}).get("html_url"), issue.get("html_url")):
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return url
    return ""


def _short(text: str) -> str:
    """Cut attacker-chosen text down before it goes into a reason or an error."""
    return text if len(text) <= 40 else text[:37] + "..."
