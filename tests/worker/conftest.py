"""The worker in a fake world of real parts, in-process: Zuul's ``hold_jobs_in_build`` for ccci.

    world.gitea       FakeGitea (real HTTP): comments, reactions, statuses, members, PR heads
    world.store       the real SQLite store
    world.dispatcher  HeldDispatcher: starts nothing; every run waits until the test releases it
    world.worker      the real Worker (admission, cancels, endings, the courier) on those three
    world.testme()    a comment on the forge, delivered through the real intake (no HTTP server)
    world.settle()    worker passes until nothing changes: no sleeps, no threads, no gunicorn

A test opens a PR, comments, settles, releases the held run with a report (or loses it: a
harness gone without one), settles again, and asserts what the forge shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ccci.config import Settings, load_settings
from ccci.dispatch import Finished
from ccci.forge import GiteaClient
from ccci.intake.delivery import handle_delivery
from ccci.pipeline.report import Report, StepResult
from ccci.store import Run, Store
from ccci.worker import Worker
from tests.fakes import sign
from tests.fakes.gitea import FakeGitea

OWNER, REPO = "coop-cloud", "hello"
SECRET = "worker-world-secret-0123456789"


@dataclass
class HeldDispatcher:
    """A dispatcher test double: it starts nothing, and holds each run until the test releases it."""

    poll_interval: float = 0.0
    held: dict[int, Run] = field(default_factory=dict)  # run id -> the run as it was started
    refs: dict[int, str] = field(default_factory=dict)
    canceled: list[int] = field(default_factory=list)  # runs the worker asked to stop
    adopted: list[int] = field(default_factory=list)
    events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    fail_next_start: Exception | None = None
    _ended: list[Finished] = field(default_factory=list)

    def start(self, run: Run, record: Callable[[str], None] | None = None) -> str:
        """Take the run and hold it; record its reference the way a real dispatcher must."""
        if self.fail_next_start is not None:
            error, self.fail_next_start = self.fail_next_start, None
            raise error
        ref = f"held-{run.id}"
        if record is not None:
            record(ref)
        self.held[run.id], self.refs[run.id] = run, ref
        return ref

    def active(self) -> set[int]:
        return set(self.held)

    def poll(self) -> list[Finished]:
        ended, self._ended = self._ended, []
        return ended

    def progress(self, run: Run) -> list[dict[str, Any]]:
        return self.events.get(run.id, [])

    def cancel(self, run: Run) -> bool:
        self.canceled.append(run.id)
        return run.id in self.held

    def adopt(self, run: Run) -> None:
        self.adopted.append(run.id)
        self.held[run.id] = run

    def sweep(self) -> str:
        return ""

    # -- what the test does with a held run ------------------------------------------------------

    def release(self, run_id: int, status: str = "passed", notes: list[str] | None = None) -> None:
        """End a held run with a harness report of ``status``."""
        run = self.held.pop(run_id)
        step = StepResult(name="work", status=status if status != "error" else "error", exit_code=0)
        report = Report(run=run_id, recipe=run.recipe, sha=run.sha or "", status=status, total_ms=5,
                        steps=[step], notes=list(notes or []))  # fmt: skip
        self._ended.append(Finished(run_id, report, "the harness exited with status 0"))

    def lose(self, run_id: int, reason: str = "its harness exited with status -9", **how: Any) -> None:
        """End a held run without a report: its harness died (``requeue``, ``timed_out``, ``cleanup``)."""
        self.held.pop(run_id)
        self._ended.append(Finished(run_id, None, reason, **how))


@dataclass
class World:
    """Everything one worker test talks to."""

    gitea: FakeGitea
    store: Store
    dispatcher: HeldDispatcher
    worker: Worker
    settings: Settings
    forge: GiteaClient

    def open_pr(self, number: int, sha: str | None = None) -> str:
        sha = sha or f"{number:040x}"
        self.gitea.open_pr(OWNER, REPO, number, sha)
        return sha

    def testme(self, number: int, body: str = "!testme", user: str = "alice") -> dict[str, Any]:
        """Post a comment on the forge and deliver its webhook through the real intake; return the answer."""
        comment = self.gitea.post_comment(OWNER, REPO, number, body, user=user)
        payload = self.gitea.comment_payload(comment.id)
        raw = json.dumps(payload).encode()
        answer = handle_delivery(self.settings, self.store, self.worker.reporter, sign(raw, SECRET), raw)
        return {"status": answer.status, **answer.body, "comment_id": comment.id}

    def settle(self, passes: int = 50) -> None:
        """Run worker passes until two in a row change nothing and the outbox is empty."""
        last = None
        for _ in range(passes):
            self.worker.run_pass()
            now = self._fingerprint()
            if now == last and self.store.outbox_backlog() == 0:
                return
            last = now
        raise AssertionError(f"the worker did not settle in {passes} passes: {now}")

    def run(self, run_id: int) -> Run:
        run = self.store.get_run(run_id)
        assert run is not None
        return run

    def bot_comments(self, number: int) -> list:
        return [c for c in self.gitea.comments_on(OWNER, REPO, number) if c.user == self.gitea.bot_login]

    def states(self, sha: str) -> list[str]:
        return [s["state"] for s in self.gitea.statuses.get(sha, [])]

    def _fingerprint(self) -> tuple:
        runs = tuple((r.id, r.state, r.admitted, r.cancel_requested) for r in self.store.list_runs(limit=10_000))
        return (
            runs,
            self.store.outbox_backlog(),
            len(self.store.pending_commands()),
            tuple(sorted(self.dispatcher.held)),
        )


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    """Return a factory of worker worlds (settings as keywords); close everything after the test."""
    made: list[tuple[FakeGitea, GiteaClient]] = []

    def make(**settings: Any) -> World:
        gitea = FakeGitea().start()
        values: dict[str, Any] = {
            "STATE_DIR": tmp_path / "state", "FORGE_URL": gitea.url, "FORGE_TOKEN": gitea.token,
            "WEBHOOK_SECRET": SECRET, "ALLOWED_USERS": ("alice",), "BOT_LOGIN": gitea.bot_login,
            "PUBLIC_URL": "http://ccci.example.test", **settings,
        }  # fmt: skip
        config = load_settings({}, **values)
        store = Store(config.db_path)
        forge = GiteaClient(gitea.url, gitea.token, retries=0)
        dispatcher = HeldDispatcher()
        worker = Worker(config, forge, store=store, dispatcher=dispatcher)
        made.append((gitea, forge))
        return World(gitea, store, dispatcher, worker, config, forge)

    yield make
    for gitea, forge in made:
        forge.close()
        gitea.close()


@pytest.fixture
def world(make_world) -> World:
    return make_world()
