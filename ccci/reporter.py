"""The reporter: what ccci says on the forge about a run, written to the outbox.

One status comment per run, found by its hidden marker and edited in place from queued to
running to the final report; one commit status per transition under the ``ccci/testme``
context; reactions on the triggering comment. Nothing here talks to the forge directly: the
courier delivers what the reporter enqueues.
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .forge import repo_web_url
from .pipeline.events import Event, StepBoard
from .pipeline.render import marker, render_comment, render_progress
from .pipeline.report import Report
from .store import Run, Store

STATUS_CONTEXT = "ccci/testme"
COMMENT_LIMIT = 60_000
COMMIT_STATE_OF = {
    "queued": "pending",
    "running": "pending",
    "passed": "success",
    "failed": "failure",
    "error": "error",
    "canceled": "error",
    "timed_out": "failure",
}


class Reporter:
    """Turns run events into outbox writes for one ccci installation."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    def run_url(self, run_id: int) -> str:
        """Return the run page's public address, or '' without PUBLIC_URL."""
        base = self.settings.PUBLIC_URL.rstrip("/")
        return f"{base}/runs/{run_id}" if base else ""

    def repo_url(self, run: Run) -> str:
        """Return the web page of the run's repository, for links to its PR and commit."""
        return repo_web_url(run.clone_url)

    def react(self, run: Run, content: str) -> None:
        """Put a reaction on the comment that triggered the run."""
        if run.comment_id is not None:
            self.react_to(run.owner, run.repo, run.comment_id, content, run_id=run.id)

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
                "state": COMMIT_STATE_OF.get(state, state),
                "description": description[:140],
                "target_url": self.run_url(run.id),
                "context": STATUS_CONTEXT,
            },
            run_id=run.id,
        )

    def queued(self, run: Run) -> None:
        """Say the run is queued, with its place in the queue."""
        self.comment(
            run,
            render_progress(
                "queued",
                marker_run_id=run.id,
                recipe=run.recipe,
                tested_sha=run.sha or "PR head",
                position=self.store.queue_position(run.id) + 1,
                public_url=self.settings.PUBLIC_URL,
                repo_url=self.repo_url(run),
            ),
        )

    def running(self, run: Run, events: list[dict[str, Any]]) -> None:
        """Show the run's live step states, and which run holds the app while it waits."""
        board = StepBoard()
        for data in events:
            board.update(Event.from_dict(data))
        body = render_progress(
            "running",
            marker_run_id=run.id,
            recipe=run.recipe,
            tested_sha=run.sha or "",
            steps=board.rows(),
            public_url=self.settings.PUBLIC_URL,
            repo_url=self.repo_url(run),
        )
        if board.waiting:
            body += f"\n\n⏸️ {board.waiting}; this run starts when it is free."
        self.comment(run, body)

    def final(self, run: Run, report: Report, head_sha: str | None) -> None:
        """Edit the comment into the final report and set the final commit status."""
        typed = Report.from_dict(report.to_dict())  # a copy: the note below is for the comment only
        if run.canceled_by and typed.status == "canceled":
            typed.notes.insert(0, f"canceled by {run.canceled_by}")
        body = render_comment(
            typed,
            marker_run_id=run.id,
            public_url=self.settings.PUBLIC_URL,
            tested_sha=run.sha or typed.sha,
            head_sha=head_sha,
            repo_url=self.repo_url(run),
            limit=COMMENT_LIMIT - 500,
        )
        if run.superseded_by:
            # Collapsed: the newer run's comment is the one that matters now.
            body = (
                f"{marker(run.id)}\n⏭️ **ccci run #{run.id} was superseded by run #{run.superseded_by}.**\n\n"
                f"<details><summary>What run #{run.id} did before it was canceled</summary>\n\n"
                f"{body.replace(marker(run.id), '').strip()}\n\n</details>"
            )
        self.comment(run, body)
        self.status(run, typed.status, f"run #{run.id} {typed.status.replace('_', ' ')}")

    def refuse(self, *, owner: str, repo: str, pr: int, comment_id: int, login: str, text: str) -> None:
        """React ``confused``; explain once per user and PR, never more."""
        self.reply(owner=owner, repo=repo, pr=pr, comment_id=comment_id, login=login, text=text)

    def reply(
        self, *, owner: str, repo: str, pr: int, comment_id: int, login: str, text: str, once: bool = True
    ) -> None:
        """React ``confused`` and answer with a short text (usage help, a refusal, a limit).

        With ``once``, a user gets at most one such answer per PR, refusals and usage together:
        nobody can make ccci talk by repeating a command.
        """
        self.react_to(owner, repo, comment_id, "confused")
        if not once or self.store.note_answer(repo=f"{owner}/{repo}", pr=pr, login=login):
            self.store.enqueue("comment", {"owner": owner, "repo": repo, "pr": pr, "body": text})

    def react_to(self, owner: str, repo: str, comment_id: int, content: str, run_id: int | None = None) -> None:
        """Put a reaction on any comment."""
        payload: dict[str, Any] = {"owner": owner, "repo": repo, "comment_id": comment_id, "content": content}
        self.store.enqueue("reaction", payload, run_id=run_id)
