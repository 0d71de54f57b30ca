"""A webhook delivery, from raw bytes to a decision, without a single forge round trip.

verify the signature → parse the event → parse the comment → check the commenter against the
local allowlist → claim the comment and record the run, all in one transaction → enqueue the
acknowledgement. Organisation membership and the PR head need the forge: the worker does
those when it admits the run, so the forge never waits on the forge.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..reporter import Reporter
from ..store import Store
from .event import CommentEvent, Ignored, MalformedEvent, parse_event
from .grammar import Command, Ignore, Reply, parse_comment
from .policy import in_allowed_users, refusal_text
from .signature import verify_signature


@dataclass
class Outcome:
    """What the webhook answers: an HTTP status and a short JSON body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    wake_worker: bool = False


def handle_delivery(
    settings: Settings, store: Store, reporter: Reporter, headers: Mapping[str, str], body: bytes
) -> Outcome:
    """Decide what one webhook delivery means and record it."""
    if not settings.WEBHOOK_SECRET:
        return Outcome(401, {"error": "webhooks are refused: no WEBHOOK_SECRET is configured"})
    if not verify_signature(headers, body, settings.WEBHOOK_SECRET):
        return Outcome(401, {"error": "bad or missing signature"})
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return Outcome(400, {"error": "body is not JSON"})
    if not isinstance(payload, dict):
        return Outcome(400, {"error": "body is not a JSON object"})
    try:
        event = parse_event(headers, payload, bot_login=settings.BOT_LOGIN, trigger=settings.TRIGGER)
    except MalformedEvent as exc:
        return Outcome(400, {"error": f"malformed event: {exc}"})
    if isinstance(event, Ignored):
        return Outcome(200, {"result": "ignored", "reason": event.reason})
    parsed = parse_comment(event.body, settings.TRIGGER)
    if isinstance(parsed, Ignore):
        return Outcome(200, {"result": "ignored", "reason": parsed.reason})
    if isinstance(parsed, Reply):
        return _reply(store, reporter, event, parsed.text)
    assert isinstance(parsed, Command)
    if parsed.name == "cancel":
        return _cancel(store, event)
    return _test(settings, store, reporter, event)


def _test(settings: Settings, store: Store, reporter: Reporter, event: CommentEvent) -> Outcome:
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
        return Outcome(200, {"result": "refused", "reason": f"{event.author} may not trigger runs"}, claimed)
    since = time.time() - 3600
    if store.count_recent_runs(event.author, since) >= settings.RUNS_PER_HOUR:
        return _reply(
            store,
            reporter,
            event,
            f"@{event.author}, you have started {settings.RUNS_PER_HOUR} runs in the last hour, which is the "
            f"limit here. Please try `{settings.TRIGGER}` again in a while.",
            result="limited",
        )
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
        if claimed and local:
            reporter.react(run, "eyes")
            reporter.queued(run)
    if not claimed:
        return Outcome(
            200,
            {"result": "ignored", "reason": "comment already handled", "run": run.id if run else None},
        )
    body: dict[str, Any] = {"result": "queued", "run": run.id}
    if not local:
        body["authorization"] = "pending organisation membership check"
    return Outcome(202, body, wake_worker=True)


def _reply(store: Store, reporter: Reporter, event: CommentEvent, text: str, result: str = "replied") -> Outcome:
    with store.transaction():
        claimed, _ = store.claim_comment(owner=event.owner, repo=event.repo, comment_id=event.comment_id, action=result)
        if claimed:
            reporter.reply(owner=event.owner, repo=event.repo, pr=event.pr, comment_id=event.comment_id, text=text)
    return Outcome(200, {"result": result if claimed else "ignored"}, wake_worker=claimed)


def _cancel(store: Store, event: CommentEvent) -> Outcome:
    claimed, _ = store.claim_comment(owner=event.owner, repo=event.repo, comment_id=event.comment_id, action="cancel")
    if not claimed:
        return Outcome(200, {"result": "ignored", "reason": "comment already handled"})
    # The worker checks who may cancel, then cancels through the harness' own teardown.
    store.request_cancel_by_comment(
        owner=event.owner, repo=event.repo, pr=event.pr, login=event.author, comment_id=event.comment_id
    )
    return Outcome(202, {"result": "cancel requested"}, wake_worker=True)
