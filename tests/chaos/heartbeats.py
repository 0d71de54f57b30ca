"""Heartbeats: when each run held each app, read from the lines the drill's steps wrote.

A line is ``<run> <step> <nonce> start|tick|end <epoch seconds>`` in ``marks/apps/<domain>.log``.
A run held an app at least from its first line to its last (a killed step leaves no ``end``, and
a reaper tearing down a dead run's app writes under that run's id: still that run's holding).
Two holdings of one app that share any moment are an overlap; lines only ever shrink the true
holding, so an overlap seen here is a real one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TEARDOWN_STEPS = ("undeploy",)
TICK_SLACK = 0.5  # seconds: a beat is due every 0.2 s, later on a loaded machine


@dataclass(frozen=True)
class Beat:
    """One heartbeat line."""

    run: str
    step: str
    nonce: str
    event: str
    at: float


@dataclass(frozen=True)
class Holding:
    """One run's time on one app, from its first heartbeat to its last."""

    app: str
    run: str
    first: float
    last: float


def read_beats(apps_dir: Path) -> dict[str, list[Beat]]:
    """Return the heartbeats of every app domain, in file order."""
    beats: dict[str, list[Beat]] = {}
    for path in sorted(apps_dir.glob("*.log")):
        app = path.name.removesuffix(".log")
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 5:
                try:
                    rows.append(Beat(parts[0], parts[1], parts[2], parts[3], float(parts[4])))
                except ValueError:
                    pass
        beats[app] = rows
    return beats


def holdings(beats: dict[str, list[Beat]]) -> list[Holding]:
    """Return every run's holding of every app it wrote a heartbeat for."""
    spans: dict[tuple[str, str], list[float]] = {}
    for app, rows in beats.items():
        for b in rows:
            span = spans.setdefault((app, b.run), [b.at, b.at])
            span[0], span[1] = min(span[0], b.at), max(span[1], b.at)
    return [Holding(app, run, first, last) for (app, run), (first, last) in spans.items()]


def overlaps(held: list[Holding], *, same_app: bool) -> list[tuple[Holding, Holding]]:
    """Return pairs of holdings of different runs sharing a moment: of one app, or of different apps."""
    found = []
    ordered = sorted(held, key=lambda h: h.first)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.first > a.last:
                break
            if a.run != b.run and (a.app == b.app) == same_app:
                found.append((a, b))
    return found


def steps_run_twice(beats: dict[str, list[Beat]]) -> list[str]:
    """Return, for people, every (run, work step) that was executed more than once."""
    nonces: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for app, rows in beats.items():
        for b in rows:
            if b.step not in TEARDOWN_STEPS:  # a reaper tears a dead run's app down again, rightly
                nonces[(app, b.run, b.step)].add(b.nonce)
    return [
        f"run {run} executed step {step} on {app} {len(n)} times (executions {', '.join(sorted(n))})"
        for (app, run, step), n in sorted(nonces.items())
        if len(n) > 1
    ]


def step_spans(beats: dict[str, list[Beat]]) -> list[tuple[str, float, float]]:
    """Return (run, first, last) of every execution of a step, from its heartbeats."""
    spans: dict[str, list] = {}
    for rows in beats.values():
        for b in rows:
            span = spans.setdefault(b.nonce, [b.run, b.at, b.at])
            span[1], span[2] = min(span[1], b.at), max(span[2], b.at)
    return [(run, first, last) for run, first, last in spans.values()]


def mid_step(at: float, spans: list[tuple[str, float, float]], run: str = "") -> bool:
    """Tell whether a step (of ``run``, or of any run) was executing at epoch time ``at``.

    A step beats every 0.2 s, so one killed between two beats has its last beat just before
    ``at``: it counts as executing until ``TICK_SLACK`` after its last beat.
    """
    return any(first <= at <= last + TICK_SLACK and (not run or r == run) for r, first, last in spans)


def concurrent_apps_seen(apps_dir: Path) -> bool:
    """Tell whether runs of two different apps have held their apps at the same moment yet."""
    return bool(overlaps(holdings(read_beats(apps_dir)), same_app=False))
