"""Janitor: the safety net that frees what dead runs left behind — apps, locks, run ABRA_DIRs, VMs.

Every resource has one owner that frees it when it exits; the janitor is for owners that never
reached their exit (SIGKILL, a crash, a power cut). It decides "dead" only from facts the kernel
keeps — a lock or owner file whose flock can be taken has no living owner — never from age, so
it cannot steal from a slow run. A lock held for longer than ``leak_after`` is flagged in the
log and in the report, for a person to look at, and left alone.

``quick()`` runs at the start of every run (before it takes its own app lock); ``thorough()``
at the end of every run and as ``python -m ccci sweep``. Any number of janitors may run at once:
each dead holder's app is reaped by exactly one of them (see ``applock``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import logs
from .abradir import sweep_abra_dirs
from .applock import LockHolder, LockInfo, list_locks, probe_and_reap

log = logging.getLogger(__name__)

Sweeper = Callable[[], list]  # removes one kind of leftover, returns what it removed


@dataclass
class SweepReport:
    """What one janitor pass did: reaped, removed, flagged (never stolen), and what failed."""

    reaped_apps: list[LockHolder] = field(default_factory=list)
    removed_abra_dirs: list[Path] = field(default_factory=list)
    flagged: list[LockInfo] = field(default_factory=list)
    swept: dict[str, list] = field(default_factory=dict)  # extra sweeper name -> what it removed
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data, for /admin and ``ccci sweep --json``."""
        return {
            "reaped_apps": [asdict(h) for h in self.reaped_apps],
            "removed_abra_dirs": [str(p) for p in self.removed_abra_dirs],
            "flagged": [
                {
                    "app_domain": i.app_domain,
                    "run": i.holder.run_id if i.holder else None,
                    "pid": i.holder.pid if i.holder else None,
                    "age": i.age,
                    "reason": i.reason,
                }
                for i in self.flagged
            ],
            "swept": {name: [str(x) for x in items] for name, items in self.swept.items()},
            "errors": list(self.errors),
        }

    def summary(self) -> str:
        """Return one line for the log: counts of what was done."""
        swept = sum(len(items) for items in self.swept.values())
        return (
            f"reaped {len(self.reaped_apps)} app(s), removed {len(self.removed_abra_dirs)} ABRA_DIR(s) "
            f"and {swept} other leftover(s); {len(self.flagged)} possible leak(s), {len(self.errors)} error(s)"
        )


class Janitor:
    """Finds the leftovers of dead runs on this host and frees them, each exactly once."""

    def __init__(
        self,
        runs_dir: Path,
        lock_dir: Path,
        *,
        leak_after: float,
        reap_app: Callable[[LockHolder], None],
        extra_sweepers: Sequence[Sweeper] = (),
    ):
        self.runs_dir = runs_dir
        self.lock_dir = lock_dir
        self.leak_after = leak_after
        self.reap_app = reap_app  # tears down a dead run's app (the recipe's teardown steps)
        self.extra_sweepers = list(extra_sweepers)

    def quick(self) -> SweepReport:
        """Reap the apps of dead lock holders and flag long-held locks."""
        report = SweepReport()

        def reap(holder: LockHolder) -> None:
            try:
                self.reap_app(holder)
            except Exception as exc:
                report.errors.append(f"reaping {holder.app_domain} of run {holder.run_id}: {exc}")
                raise  # probe_and_reap logs it and keeps the lock for the next pass

        report.reaped_apps = probe_and_reap(self.lock_dir, reap)
        report.flagged = [info for info in self.locks() if info.possible_leak]
        for info in report.flagged:
            run = info.holder.run_id if info.holder else "unknown"
            logs.for_run(log, run).warning(
                "possible leak: %s held by this run: %s (left alone)", info.app_domain, info.reason
            )
        return report

    def thorough(self) -> SweepReport:
        """Do ``quick``, then remove dead runs' ABRA_DIRs and run every extra sweeper."""
        report = self.quick()
        try:
            report.removed_abra_dirs = sweep_abra_dirs(self.runs_dir)
        except OSError as exc:
            report.errors.append(f"sweeping ABRA_DIRs under {self.runs_dir}: {exc}")
            log.exception("sweeping ABRA_DIRs failed")
        for i, sweeper in enumerate(self.extra_sweepers, 1):
            name = _name(sweeper, i)
            try:
                report.swept[name] = list(sweeper())
            except Exception as exc:
                report.errors.append(f"{name}: {exc}")
                log.exception("sweeper %s failed", name)
        log.info("janitor: %s", report.summary())
        return report

    def locks(self) -> list[LockInfo]:
        """Describe every app lock, with possible leaks flagged (for /admin/runs)."""
        return list_locks(self.lock_dir, self.leak_after)


def _name(sweeper: Sweeper, index: int) -> str:
    name = getattr(getattr(sweeper, "func", sweeper), "__name__", "")  # functools.partial too
    return name if name and name != "<lambda>" else f"sweeper-{index}"
