"""The reporter: what ccci says on the forge about a run, written to the outbox.

One status comment per run, found by its hidden marker and edited in place from queued to
running to the final report; one commit status per transition under the ``ccci/testme``
context; reactions on the triggering comment. Nothing here talks to the forge directly: the
courier delivers what the reporter enqueues.
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .store import Run, Store

STATUS_CONTEXT = "ccci/testme"
STATUS_STATES = {
    "queued": "pending",
    "running": "pending",
    "passed": "success",
    "failed": "failure",
    "error": "error",
    "canceled": "error",
    "timed_out": "failure",
}


def marker(run_id: int) -> str:
    """Return the hidden marker that identifies a run's status comment."""
    return f"<!-- ccci:run={run_id} -->"


class Reporter:
    """Turns run events into outbox writes for one ccci installation."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    def run_url(self, run_id: int) -> str:
        """Return the run page's public address, or '' without PUBLIC_URL."""
        base = self.settings.PUBLIC_URL.rstrip("/")
        return f"{base}/runs/{run_id}" if base else ""

    def react(self, run: Run, content: str) -> None:
        """Put a reaction on the comment that triggered the run."""
        if run.comment_id is not None:
            self._react(run.owner, run.repo, run.comment_id, content, run_id=run.id)

    def comment(self, run: Run, body: str) -> None:
        """Set the run's status comment to ``body`` (created the first time, then edited)."""
        self.store.enqueue(
            "run_comment",
            {"body": body, "marker": marker(run.id)},
            run_id=run.id,
            coalesce_key=f"run_comment:{run.id}",
        )

    def status(self, run: Run, state: str, description: str) -> None:
        """Set the commit status of the run's pinned sha."""
        if not run.sha:
            return
        self.store.enqueue(
            "status",
            {
                "owner": run.owner,
                "repo": run.repo,
                "sha": run.sha,
                "state": STATUS_STATES.get(state, state),
                "description": description[:140],
                "target_url": self.run_url(run.id),
                "context": STATUS_CONTEXT,
            },
            run_id=run.id,
        )

    def queued(self, run: Run) -> None:
        """Say the run is queued, with its place in the queue."""
        position = self.store.queue_position(run.id)
        where = "next in line" if position == 0 else f"{position} run{'s' if position > 1 else ''} ahead"
        sha = f" at `{run.sha[:10]}`" if run.sha else ""
        self.comment(
            run,
            f"{marker(run.id)}\n⏳ **ccci run #{run.id}** — `{run.recipe}`{sha} is queued ({where}), "
            f"requested by @{run.requester}.{self._link(run)}",
        )

    def refuse(self, *, owner: str, repo: str, pr: int, comment_id: int, login: str, text: str) -> None:
        """React ``confused``; explain once per user and PR, never more."""
        self._react(owner, repo, comment_id, "confused")
        if self.store.note_refusal(repo=f"{owner}/{repo}", pr=pr, login=login):
            self.store.enqueue("comment", {"owner": owner, "repo": repo, "pr": pr, "body": text})

    def reply(self, *, owner: str, repo: str, pr: int, comment_id: int, text: str) -> None:
        """Answer a comment with a short text (usage help)."""
        self._react(owner, repo, comment_id, "confused")
        self.store.enqueue("comment", {"owner": owner, "repo": repo, "pr": pr, "body": text})

    def _react(self, owner: str, repo: str, comment_id: int, content: str, run_id: int | None = None) -> None:
        payload: dict[str, Any] = {"owner": owner, "repo": repo, "comment_id": comment_id, "content": content}
        self.store.enqueue("reaction", payload, run_id=run_id)

    def _link(self, run: Run) -> str:
        url = self.run_url(run.id)
        return f" [Run page]({url})" if url else ""
