"""A webhook delivery, from raw bytes to a decision, without a single forge round trip.

verify the signature → parse the event → parse the comment → check the commenter against the
local allowlist → claim the comment and record the run, all in one transaction → enqueue the
acknowledgement. Organisation membership and the PR head need the forge: the worker does
those when it admits the run, so the forge never waits on the forge.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..names import is_recipe
from ..reporter import Reporter
from ..store import Store
from .event import CommentEvent, Ignored, MalformedEvent, parse_event
from .grammar import Command, Ignore, Reply, parse_comment
from .headers import Headers
from .policy import in_allowed_users, limit_text, not_a_recipe_text, refusal_text
from .signature import verify_signature


@dataclass
class HookAnswer:
    """What the webhook answers: an HTTP status and a short JSON body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    wake_worker: bool = False


def handle_delivery(settings: Settings, store: Store, reporter: Reporter, headers: Headers, body: bytes) -> HookAnswer:
    """Decide what one webhook delivery means and record it."""
    if not settings.WEBHOOK_SECRET:
        return HookAnswer(401, {"error": "webhooks are refused: no WEBHOOK_SECRET is configured"})
    if not verify_signature(headers, body, settings.WEBHOOK_SECRET):
        return HookAnswer(401, {"error": "bad or missing signature"})
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError, and numbers too long to convert
        return HookAnswer(400, {"error": "body is not JSON"})
    except RecursionError:
        return HookAnswer(400, {"error": "body is nested too deeply"})
    if not isinstance(payload, dict):
        return HookAnswer(400, {"error": "body is not a JSON object"})
    try:
        event = parse_event(headers, payload, bot_login=settings.BOT_LOGIN, trigger=settings.TRIGGER)
    except MalformedEvent as exc:
        return HookAnswer(400, {"error": f"malformed event: {exc}"})
    if isinstance(event, Ignored):
        return HookAnswer(200, {"result": "ignored", "reason": event.reason})
    parsed = parse_comment(event.body, settings.TRIGGER)
    if isinstance(parsed, Ignore):
        return HookAnswer(200, {"result": "ignored", "reason": parsed.reason})
    if isinstance(parsed, Reply):
        return _usage(settings, store, reporter, event, parsed.text)
    if parsed.name == "test" and not is_recipe(event.repo):
        # Refused now, with the reason: a run that could never start would otherwise be queued.
        return _usage(settings, store, reporter, event, not_a_recipe_text(event.repo), command="not-a-recipe")
    assert isinstance(parsed, Command)
    if parsed.name == "cancel":
        return _cancel(store, event)
    return _test(settings, store, reporter, event)


def _test(settings: Settings, store: Store, reporter: Reporter, event: CommentEvent) -> HookAnswer:
    local = in_allowed_users(event.author, settings.ALLOWED_USERS)  # no forge call here
    if not local and not settings.ALLOWED_ORGS:
        with store.transaction():
            claimed, _ = store.claim_comment(
                owner=event.owner, repo=event.repo, comment_id=event.comment_id, action="refused"
            )
            if claimed:
                reporter.refuse(
                    owner=event.owner,
                    repo=event.repo,
                    pr=event.pr,
                    comment_id=event.comment_id,
                    login=event.author,
                    text=refusal_text(event.author, settings.TRIGGER),
                )
        return HookAnswer(200, {"result": "refused", "reason": f"{event.author} may not trigger runs"}, claimed)
    # Only users the allowlist already vouches for are limited here; organisation members are
    # limited by the worker once it knows they are members, so strangers never get an answer.
    if local and store.count_recent_runs(event.author, time.time() - 3600) >= settings.RUNS_PER_HOUR:
        with store.transaction():
            claimed, _ = store.claim_comment(
                owner=event.owner, repo=event.repo, comment_id=event.comment_id, action="limited"
            )
            if claimed:
                reporter.reply(
                    owner=event.owner,
                    repo=event.repo,
                    pr=event.pr,
                    comment_id=event.comment_id,
                    login=event.author,
                    text=limit_text(event.author, settings.RUNS_PER_HOUR, settings.TRIGGER),
                )
        return HookAnswer(200, {"result": "limited" if claimed else "ignored"}, wake_worker=claimed)
    recipe = event.repo
    # The claim, the run and its acknowledgement commit together: all of them or none.
    with store.transaction():
        claimed, run = store.claim_comment(
            owner=event.owner,
            repo=event.repo,
            comment_id=event.comment_id,
            action="test",
            run={
                "pr": event.pr,
                "recipe": recipe,
                "requester": event.author,
                "clone_url": event.clone_url,
                # Allowed by the local list now; otherwise the worker checks membership first.
                "authorized": int(local),
            },
        )
        if claimed and local and run is not None:
            reporter.react(run, "eyes")
            reporter.queued(run)
    if not claimed or run is None:
        return HookAnswer(
            200,
            {"result": "ignored", "reason": "comment already handled", "run": run.id if run else None},
        )
    body: dict[str, Any] = {"result": "queued", "run": run.id}
    if not local:
        body["authorization"] = "pending organisation membership check"
    return HookAnswer(202, body, wake_worker=True)


def _usage(
    settings: Settings, store: Store, reporter: Reporter, event: CommentEvent, text: str, command: str = "usage"
) -> HookAnswer:
    """Answer a command that cannot be done with ``text``, only to someone who may use ccci, once per PR."""
    local = in_allowed_users(event.author, settings.ALLOWED_USERS)
    with store.transaction():
        claimed, _ = store.claim_comment(
            owner=event.owner, repo=event.repo, comment_id=event.comment_id, action="usage"
        )
        if claimed and local:
            reporter.reply(
                owner=event.owner,
                repo=event.repo,
                pr=event.pr,
                comment_id=event.comment_id,
                login=event.author,
                text=text,
            )
        elif claimed and settings.ALLOWED_ORGS:  # the worker checks membership before it says a word
            store.record_command(
                command,
                owner=event.owner,
                repo=event.repo,
                pr=event.pr,
                login=event.author,
                comment_id=event.comment_id,
            )
    if not claimed:
        return HookAnswer(200, {"result": "ignored", "reason": "comment already handled"})
    if local:
        return HookAnswer(200, {"result": "replied"}, wake_worker=True)
    if settings.ALLOWED_ORGS:
        return HookAnswer(200, {"result": "pending", "reason": "organisation membership check"}, wake_worker=True)
    return HookAnswer(200, {"result": "ignored", "reason": f"{event.author} may not use ccci"})


def _cancel(store: Store, event: CommentEvent) -> HookAnswer:
    claimed, _ = store.claim_comment(owner=event.owner, repo=event.repo, comment_id=event.comment_id, action="cancel")
    if not claimed:
        return HookAnswer(200, {"result": "ignored", "reason": "comment already handled"})
    # The worker checks who may cancel, then cancels through the harness' own teardown.
    store.record_command(
        "cancel", owner=event.owner, repo=event.repo, pr=event.pr, login=event.author, comment_id=event.comment_id
    )
    return HookAnswer(202, {"result": "cancel requested"}, wake_worker=True)
