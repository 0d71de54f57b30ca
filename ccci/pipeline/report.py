"""The report: what a run did, typed, and serialised exactly as the report contract in docs/design.md.

    {"run", "recipe", "sha", "status", "passed", "total_ms",
     "steps": [{"name", "status", "exit_code", "duration_ms", "cached", "allow_failure",
                "metrics", "stdout", "stderr", "infra_retries"}]}

Added keys (never in place of contract keys): report ``notes`` (what the executor could not do
as asked, e.g. forks run in the parent's sandbox), ``started_at`` (epoch seconds) and
``artifacts`` (files the steps left in ``.ccci/artifacts``, kept with the run), ``mode`` (where
the app lived: ``fork``, a VM fork's own swarm, or ``host``, the operator's; empty when no step
ran); step
``teardown`` and ``started_at``. ``exit_code`` is null for a step that never ran.

The run's verdict is decided in one place, ``verdict``, by precedence:
timed_out > canceled > error > failed > passed. A run is ``error`` only when the infrastructure
failed and nothing worse happened: infrastructure trouble outranks a test failure because a
failure seen on a broken machine says nothing about the recipe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STEP_STATUSES = ("passed", "failed", "skipped", "timed_out", "canceled", "error")
RUN_STATUSES = ("passed", "failed", "error", "canceled", "timed_out")
PRECEDENCE = ("timed_out", "canceled", "error", "failed", "passed")  # worst first


@dataclass
class StepResult:
    """What happened to one Step of a run: its status, exit code, time, metrics and bounded output."""

    name: str
    status: str
    exit_code: int | None = None
    duration_ms: int = 0
    cached: bool = False  # no executor caches steps yet; kept for the contract
    allow_failure: bool = False
    metrics: dict[str, int | float] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    infra_retries: int = 0
    teardown: bool = False
    started_at: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STEP_STATUSES:
            raise ValueError(f"step {self.name}: unknown status {self.status!r}")

    @property
    def counts(self) -> bool:
        """Whether this step's outcome weighs on the run's verdict."""
        return not (self.allow_failure and self.status in ("failed", "timed_out", "error", "skipped"))


@dataclass
class Report:
    """The outcome of one run of a Pipeline: the verdict and one StepResult per Step, in order."""

    run: str | int | None
    recipe: str
    sha: str
    status: str
    total_ms: int
    steps: list[StepResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: float | None = None
    artifacts: list[str] = field(default_factory=list)  # files kept with the run, relative paths
    mode: str = ""  # where the app lived: "fork" (the VM fork's own swarm) or "host" ("" before steps ran)

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {self.status!r}")

    @property
    def passed(self) -> bool:
        """Whether the run passed."""
        return self.status == "passed"

    def failing_step(self) -> StepResult | None:
        """Return the first step that explains a verdict other than passed, if any."""
        for wanted in PRECEDENCE[:-1]:
            for step in self.steps:
                if step.counts and step.status == wanted:
                    return step
        return next((s for s in self.steps if s.counts and s.status == "skipped"), None)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as the contract's JSON-ready dictionary."""
        return {
            "run": self.run,
            "recipe": self.recipe,
            "sha": self.sha,
            "status": self.status,
            "passed": self.passed,
            "total_ms": self.total_ms,
            "steps": [asdict(s) for s in self.steps],
            "notes": list(self.notes),
            "started_at": self.started_at,
            "artifacts": list(self.artifacts),
            "mode": self.mode,
        }

    def to_json(self, indent: int | None = None) -> str:
        """Return the report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def stopped(cls, *, run: str | int | None, recipe: str, sha: str, status: str, note: str) -> Report:
        """Return the report of a run that ended without its pipeline's own report (it never ran, or
        its harness could not say), with the note that says why."""
        return cls(run=run, recipe=recipe, sha=sha, status=status, total_ms=0, notes=[note])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_dict`` output (unknown keys are ignored)."""
        step_keys = {f.name for f in fields(StepResult)}
        steps = [StepResult(**{k: v for k, v in s.items() if k in step_keys}) for s in data.get("steps", [])]
        return cls(
            run=data.get("run"),
            recipe=data.get("recipe", ""),
            sha=data.get("sha", ""),
            status=data["status"],
            total_ms=int(data.get("total_ms", 0)),
            steps=steps,
            notes=list(data.get("notes", [])),
            started_at=data.get("started_at"),
            artifacts=list(data.get("artifacts", [])),
            mode=str(data.get("mode", "")),
        )


def verdict(steps: Iterable[StepResult], stopped: str | None = None) -> str:
    """Decide the run's status from its steps and why it was stopped early ("canceled"/"timed_out").

    Steps that are allowed to fail do not count. A skipped step that counts makes the run
    failed: its checks did not run, so the run cannot claim to have passed.
    """
    seen = {stopped} if stopped else set()
    for step in steps:
        if step.counts:
            seen.add("failed" if step.status == "skipped" else step.status)
    return next(status for status in PRECEDENCE if status in seen or status == "passed")
