"""The courier: delivers the outbox's forge writes in order, retrying with backoff.

Everything ccci says on the forge — reactions, the run's status comment, commit statuses,
refusals — is first written to the store's outbox, then delivered from here. So the webhook
answers without waiting on the forge, and nothing is lost while the forge is down: a write
that fails stays in the outbox and is tried again later, with exponential backoff.

Writes of one run go out in order: while one is failing, the run's later writes wait behind
it, so an edit never overtakes the comment it edits and ``success`` never precedes ``pending``.

Sending a write and marking it delivered are two steps, and a crash can fall between them. So
every attempt is counted before it is sent, and a write that was attempted before is checked
against the forge first: a status is compared with the latest status of its context, a comment
carries a hidden key (``<!-- ccci:out=<id> -->``) and is looked for among the PR's comments,
the run's own comment is found by its marker, and a reaction is idempotent on the forge itself.
Nothing ccci says is said twice.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from . import logs
from .errors import ForgeError
from .forge import Forge
from .store import OutboxItem, Store

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
# A write the forge keeps failing for this many attempts (hours, with the backoff) is given up:
# e.g. Gitea answers 500 with no message to comments on a PR that no longer exists.
MAX_ATTEMPTS = 40
# 4xx answers that will never succeed however often they are retried: give up on those.
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 410, 422, 423})


class Courier:
    """Delivers outbox writes to the forge; owned by the worker process."""

    def __init__(self, store: Store, forge: Forge, *, bot_login: str = "", base_backoff: float = 1.0):
        self.store = store
        self.forge = forge
        self.bot_login = bot_login  # only comments of this account are ever taken for ccci's own
        self.base_backoff = base_backoff

    def deliver_due(self, now: float | None = None) -> float | None:
        """Deliver every write that is due; return when the next pending one is due, if any."""
        now = time.time() if now is None else now
        blocked_runs: set[int] = set()
        next_due: float | None = None
        for item in self.store.pending_outbox(limit=200):
            if item.run_id is not None and item.run_id in blocked_runs:
                continue
            if item.next_attempt > now:
                if item.run_id is not None:
                    blocked_runs.add(item.run_id)
                next_due = item.next_attempt if next_due is None else min(next_due, item.next_attempt)
                continue
            self.store.mark_attempt(item.id)
            try:
                self._deliver(item)
            except ForgeError as exc:
                if exc.status in PERMANENT_STATUSES or item.attempts + 1 >= MAX_ATTEMPTS:
                    why = "refused by the forge" if exc.status in PERMANENT_STATUSES else f"failed {MAX_ATTEMPTS} times"
                    logs.for_run(log, item.run_id).error(
                        "outbox %s (%s) %s, giving up: %s", item.id, item.kind, why, exc
                    )
                    self.store.mark_delivered(item.id, payload=item.payload)
                    continue
                delay = min(MAX_BACKOFF, self.base_backoff * 2**item.attempts) * random.uniform(0.8, 1.2)
                logs.for_run(log, item.run_id).warning(
                    "outbox %s (%s) failed, retrying in %.1fs: %s", item.id, item.kind, delay, exc
                )
                self.store.mark_failed(item.id, str(exc), now + delay)
                if item.run_id is not None:
                    blocked_runs.add(item.run_id)
                next_due = now + delay if next_due is None else min(next_due, now + delay)
                continue
            # A coalesced write replaced while in flight stays pending and goes out next pass.
            if not self.store.mark_delivered(item.id, payload=item.payload):
                next_due = now
            logs.for_run(log, item.run_id).info("outbox %s (%s) delivered", item.id, item.kind)
        return next_due

    def _deliver(self, item: OutboxItem) -> None:
        p = item.payload
        if item.kind == "reaction":
            self.forge.add_reaction(p["owner"], p["repo"], p["comment_id"], p["content"])
        elif item.kind == "comment":
            key = out_key(item.id)
            if item.attempts and self._find_comment(p["owner"], p["repo"], p["pr"], key) is not None:
                return  # an earlier attempt got through before the crash that hid it
            self.forge.create_comment(p["owner"], p["repo"], p["pr"], f"{p['body']}\n\n{key}")
        elif item.kind == "status":
            if item.attempts and self._status_is_there(p):
                return
            self.forge.set_status(
                p["owner"],
                p["repo"],
                p["sha"],
                state=p["state"],
                description=p["description"],
                target_url=p.get("target_url", ""),
                context=p["context"],
            )
        elif item.kind == "run_comment":
            self._deliver_run_comment(item.run_id, p)
        else:
            raise ValueError(f"unknown outbox kind {item.kind!r}")

    def _deliver_run_comment(self, run_id: int | None, p: dict[str, Any]) -> None:
        """Create the run's status comment the first time, edit it in place afterwards."""
        run = self.store.get_run(run_id) if run_id is not None else None
        if run is None:
            raise ValueError(f"run_comment for unknown run {run_id}")
        comment_id = run.status_comment
        if comment_id is None:
            # A crash between creating the comment and recording its id must not make a
            # second comment: look for our hidden marker first.
            comment_id = self._find_comment(run.owner, run.repo, run.pr, p["marker"])
        if comment_id is None:
            comment_id = self.forge.create_comment(run.owner, run.repo, run.pr, p["body"])
        else:
            self.forge.edit_comment(run.owner, run.repo, comment_id, p["body"])
        if run.status_comment != comment_id:
            self.store.update_run(run.id, status_comment=comment_id)

    def _find_comment(self, owner: str, repo: str, pr: int, key: str) -> int | None:
        """Return ccci's own comment carrying ``key``, if there is one.

        Anyone can write a hidden marker into a comment; only one written by ccci's account is
        ccci's (else the run's report would be edited into a stranger's comment). Without
        BOT_LOGIN no comment can be told for ccci's, so none is adopted.
        """
        if not self.bot_login:
            return None
        for comment in self.forge.list_comments(owner, repo, pr):
            author = (comment.get("user") or {}).get("login", "")
            if key in comment.get("body", "") and str(author).lower() == self.bot_login.lower():
                return int(comment["id"])
        return None

    def _status_is_there(self, p: dict[str, Any]) -> bool:
        latest = self.forge.latest_status(p["owner"], p["repo"], p["sha"], p["context"])
        if latest is None:
            return False
        state = latest.get("status", latest.get("state"))  # Gitea's CommitStatus calls it "status"
        return (state, latest.get("description", ""), latest.get("target_url", "")) == (
            p["state"],
            p["description"],
            p.get("target_url", ""),
        )


def out_key(item_id: int) -> str:
    """Return the hidden key a comment of outbox write ``item_id`` carries, to be found again."""
    return f"<!-- ccci:out={item_id} -->"
