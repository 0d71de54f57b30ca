"""Cancels, and the other commands that wait for a permission check: every way a run is stopped.

Every source of a cancel — a ``!testme cancel`` comment, the admin API, the command line, a newer
run that supersedes an older one — goes through one store call, ``Store.request_cancel``; here
the requested cancels are carried out: a queued run is dequeued (it ends canceled), a running
one is signaled once through its dispatcher and ends through its own teardown.

A comment command is acted on only once its author's permission is known: ``!testme cancel``
works for whoever requested the run and for anyone allowed to start runs, and is refused (once
per user and PR) for anyone else; a malformed ``!testme …`` gets usage help only from someone
allowed — a stranger gets no answer at all.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import Settings
from ..dispatch import Dispatcher
from ..errors import ForgeError
from ..intake.grammar import usage
from ..intake.policy import not_a_recipe_text, refusal_text
from ..reporter import Reporter
from ..store import ACTIVE_STATES, PendingCommand, Store
from .admission import AdmissionForge, authorized
from .backoff import Backoff
from .endings import Endings

log = logging.getLogger(__package__)  # one component for the operator: ccci.worker

NOTHING_TO_CANCEL = "There is no queued or running ccci run on this pull request to cancel."


class Cancels:
    """Decides comment commands, and carries out requested cancels."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        reporter: Reporter,
        forge: Any,
        dispatcher: Dispatcher,
        endings: Endings,
    ):
        self.settings = settings
        self.store = store
        self.reporter = reporter
        self.forge: AdmissionForge = forge
        self.dispatcher = dispatcher
        self.endings = endings
        self.backoff = Backoff()
        self._signaled: set[int] = set()  # runs already asked to stop: signal once, then wait

    def handle_commands(self) -> None:
        """Decide the pending ``!testme cancel`` and malformed commands whose authors can be checked."""
        for command in self.store.pending_commands():
            if not self.backoff.due(command.id):
                continue
            try:
                if command.command in ("usage", "not-a-recipe"):
                    self._usage(command)
                else:
                    self._cancel(command)
            except ForgeError as exc:
                if self.backoff.failing_for(command.id) <= self.settings.ADMIT_TIMEOUT:
                    self.backoff.failed(command.id)
                    continue
                log.warning("command %s dropped: the forge did not answer for too long (%s)", command.id, exc)
            self.backoff.clear(command.id)
            self.store.mark_command_handled(command.id)

    def carry_out(self) -> None:
        """Dequeue the canceled queued runs; signal the canceled running ones, once each."""
        for run in self.store.list_runs(states=ACTIVE_STATES, limit=500):
            if not run.cancel_requested:
                continue
            if run.state == "queued":
                self.endings.without_running(run, "canceled", "canceled before it started")
            elif run.id in self.dispatcher.active() and run.id not in self._signaled:
                self._signaled.add(run.id)
                self.dispatcher.cancel(run)

    def forget(self, run_id: int) -> None:
        """Drop what is remembered of a run that ended."""
        self._signaled.discard(run_id)

    def _usage(self, command: PendingCommand) -> None:
        """Help someone allowed who mistyped a command (or asked for a run that cannot be); a stranger gets nothing."""
        if authorized(self.settings, self.forge, command.login).allowed:
            text = usage(self.settings.TRIGGER) if command.command == "usage" else not_a_recipe_text(command.repo)
            self.reporter.reply(owner=command.owner, repo=command.repo, pr=command.pr,
                                comment_id=command.comment_id or 0, login=command.login, text=text)  # fmt: skip

    def _cancel(self, command: PendingCommand) -> None:
        c = command
        active = self.store.list_runs(states=ACTIVE_STATES, owner=c.owner, repo=c.repo, pr=c.pr)
        requester = any(r.requester.lower() == c.login.lower() for r in active)
        may = requester or authorized(self.settings, self.forge, c.login).allowed
        with self.store.transaction():
            if not may:
                self.reporter.refuse(owner=c.owner, repo=c.repo, pr=c.pr, comment_id=c.comment_id or 0,
                                     login=c.login, text=refusal_text(c.login, self.settings.TRIGGER))  # fmt: skip
            elif not active:
                self.reporter.reply(owner=c.owner, repo=c.repo, pr=c.pr, comment_id=c.comment_id or 0,
                                    login=c.login, once=False, text=NOTHING_TO_CANCEL)  # fmt: skip
            else:
                for run in active:
                    self.store.request_cancel(run.id, f"@{c.login}")
                if c.comment_id:
                    self.reporter.react_to(c.owner, c.repo, c.comment_id, "+1")
