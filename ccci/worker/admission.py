"""Admission: a queued run becomes one that may start — authorized, pinned, the only one of its PR.

    authorize (allowlist, else organisation membership) ▸ the hourly limit ▸ the PR still open
      ▸ pin the head sha ▸ supersede the PR's older runs ▸ "queued" on the forge

The forge's answers decide: a permanent one (404, 410, 401/403, a malformed value such as a head
that is not a commit id) ends the run at once with an ``error`` report that says why; a transient
one (unreachable, 5xx, 429) is asked again with a growing pause (``Backoff``), and a run that
cannot be admitted for ``ADMIT_TIMEOUT`` ends too. A membership check the forge could not answer
is such a transient failure: nobody is refused because the forge was down.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from .. import logs
from ..config import Settings
from ..errors import ForgeError
from ..forge import PullRequest
from ..intake.policy import Decision, authorize, limit_text, refusal_text
from ..reporter import Reporter
from ..store import ACTIVE_STATES, Run, Store
from .backoff import Backoff
from .endings import Endings

log = logging.getLogger(__package__)  # one component for the operator: ccci.worker


class AdmissionForge(Protocol):
    """What admission needs from the forge."""

    def get_pull(self, owner: str, repo: str, number: int) -> PullRequest:
        """Return the pull request ``owner/repo#number``."""
        ...

    def is_org_member(self, org: str, login: str) -> bool:
        """Return True only if the forge confirms ``login`` is a member of ``org``."""
        ...


def authorized(settings: Settings, forge: AdmissionForge, login: str) -> Decision:
    """Decide whether ``login`` may use ccci; a check the forge could not answer raises, to ask again."""
    decision = authorize(
        login,
        allowed_users=settings.ALLOWED_USERS,
        allowed_orgs=settings.ALLOWED_ORGS,
        is_org_member=forge.is_org_member,
    )
    if decision.uncertain:
        raise ForgeError(decision.reason, transient=True)
    return decision


class Admission:
    """Admits queued runs, one pass at a time."""

    def __init__(self, settings: Settings, store: Store, reporter: Reporter, forge: Any, endings: Endings):
        self.settings = settings
        self.store = store
        self.reporter = reporter
        self.forge: AdmissionForge = forge
        self.endings = endings
        self.backoff = Backoff()

    def admit(self) -> None:
        """Try every queued run not yet admitted whose pause is over."""
        for run in reversed(self.store.list_runs(states=("queued",), limit=500)):
            if run.admitted or run.cancel_requested or not self.backoff.due(run.id):
                continue
            try:
                self._admit(run)
            except ForgeError as exc:
                self._forge_failed(run, exc)
            else:
                self.backoff.clear(run.id)

    def _admit(self, run: Run) -> None:
        if not run.authorized:
            decision = authorized(self.settings, self.forge, run.requester)
            if not decision.allowed:
                self._refuse(run, decision.reason, refusal_text(run.requester, self.settings.TRIGGER))
                return
            since = time.time() - 3600
            if self.store.count_recent_runs(run.requester, since, up_to=run.id) > self.settings.RUNS_PER_HOUR:
                limited = limit_text(run.requester, self.settings.RUNS_PER_HOUR, self.settings.TRIGGER)
                self._refuse(run, f"{run.requester} reached RUNS_PER_HOUR", limited)
                return
            with self.store.transaction():
                self.store.update_run(run.id, authorized=1)
                self.reporter.react(run, "eyes")
        pull = self.forge.get_pull(run.owner, run.repo, run.pr)
        if pull.state != "open":
            self.endings.without_running(run, "canceled", "the pull request was closed before the run started")
            return
        with self.store.transaction():
            self.store.update_run(run.id, sha=pull.head_sha, admitted=1, private=int(pull.private))
            pinned = self.store.get_run(run.id)
            assert pinned is not None
            self._supersede_older(pinned)
            self.reporter.queued(pinned)
            self.reporter.status(pinned, "queued", f"run #{run.id} queued")

    def _refuse(self, run: Run, reason: str, text: str) -> None:
        logs.for_run(log, run.id).info("refused: %s", reason)
        with self.store.transaction():
            self.store.update_run(run.id, only_if_state=("queued",), state="refused", note=reason,
                                  finished_at=time.time())  # fmt: skip
            self.reporter.refuse(owner=run.owner, repo=run.repo, pr=run.pr, comment_id=run.comment_id or 0,
                                 login=run.requester, text=text)  # fmt: skip

    def _forge_failed(self, run: Run, exc: ForgeError) -> None:
        """End the run on a permanent answer; back off on a transient one, within ADMIT_TIMEOUT."""
        if not exc.transient:
            logs.for_run(log, run.id).warning("the forge refused admission: %s", exc)
            # A PR the forge does not know has nowhere to be told: the report stays with ccci
            # (run page, admin API), and nothing is sent that could only fail for ever.
            gone = exc.status in (404, 410)
            self.endings.without_running(run, "error", refused_because(run, exc), tell_forge=not gone)
            if gone and self.store.drop_pending(run.id, f"pull request #{run.pr} is gone"):
                logs.for_run(log, run.id).info("dropped its writes to the forge: the pull request is gone")
            self.backoff.clear(run.id)
            return
        waited = time.time() - run.created_at
        if waited > self.settings.ADMIT_TIMEOUT:
            note = (
                f"ccci could not admit this run for {waited / 60:.0f} minutes because the forge did not "
                f"answer ({exc}). Comment `{self.settings.TRIGGER}` again once the forge is back."
            )
            self.endings.without_running(run, "error", note)
            self.backoff.clear(run.id)
            return
        pause = self.backoff.failed(run.id)
        logs.for_run(log, run.id).warning("admitting: %s (trying again in %.0f s)", exc, pause)

    def _supersede_older(self, run: Run) -> None:
        """Cancel the PR's older runs: at most one run per PR goes on, the newest."""
        for older in self.store.list_runs(states=ACTIVE_STATES, owner=run.owner, repo=run.repo, pr=run.pr):
            by = f"run #{run.id}, which superseded it"
            if older.id < run.id and not older.superseded_by and self.store.request_cancel(older.id, by):
                self.store.update_run(older.id, superseded_by=run.id)


def refused_because(run: Run, exc: ForgeError) -> str:
    """Say, for the PR, why the forge's permanent answer ended the run."""
    where = f"pull request #{run.pr} of {run.full_name}"
    if exc.status == 404:
        return f"{where} was not found on the forge (404): it was deleted, or ccci's account cannot see it."
    if exc.status == 410:
        return f"{where} is gone from the forge (410)."
    if exc.status in (401, 403):
        return f"the forge refused ccci's token ({exc.status}) while reading {where}: check FORGE_TOKEN's scopes."
    return f"the forge's answer about {where} cannot be used: {exc}"
