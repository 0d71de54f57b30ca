"""The killer: SIGKILL at random moments, spread over every kind of process of the serve tree.

At each moment (exponentially distributed, ``interval`` seconds apart on average) it reads the
serve tree from /proc and kills one process of the kind killed least so far among those present
— the gunicorn master, a web worker, the ccci worker, a harness, a step's shell — so the kills
spread over all five whatever the runs are doing. When the master dies it restarts ``ccci serve``
(see ``Serve.restart_after``); the ccci worker is restarted by serve's own supervisor. A serve
that died without being killed is restarted too, and reported.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .targets import KINDS, Target, serve_tree, sigkill
from .world import ChaosWorld


@dataclass(frozen=True)
class Kill:
    """One SIGKILL the drill sent."""

    kind: str
    pid: int
    run: str
    stray: bool  # a harness (or its step) whose worker had died
    at: float  # seconds since the drill started
    wall: float  # epoch seconds, to compare with the steps' heartbeats


class Killer:
    """Kills processes of the serve tree and keeps serve running."""

    def __init__(self, world: ChaosWorld, rng: random.Random, interval: float, t0: float):
        self.world = world
        self.rng = rng
        self.interval = interval
        self.t0 = t0
        self.kills: list[Kill] = []
        self.up = threading.Event()  # set while serve answers
        self.up.set()
        self.restarts = 0
        self.web_workers_stopped = 0  # left by a dead master; stopped as systemd would
        self.old_workers: list[Target] = []  # ccci workers of dead masters: PDEATHSIG must end them
        self.unexpected: list[str] = []  # serve exits nobody caused

    def run(self, kills: int, stop: threading.Event) -> None:
        """Kill ``kills`` processes at random moments, or until ``stop`` is set."""
        while len(self.kills) < kills and not stop.wait(self.rng.expovariate(1 / self.interval)):
            self.kill_one()

    def counts(self) -> dict[str, int]:
        """Return the kills by kind of target, every kind listed."""
        counted = Counter(k.kind for k in self.kills)
        return {kind: counted.get(kind, 0) for kind in KINDS}

    def kill_one(self) -> bool:
        """Kill one process of the kind killed least so far; return whether one was killed."""
        serve = self.world.serve
        if not serve.up():
            self.unexpected.append(f"ccci serve (pid {serve.pid}) exited with {serve.proc.returncode} on its own")
            self._restart([])
            return False
        tree = serve_tree(serve.pid, self.world.token, self.world.gitea.url)
        present = {t.kind for t in tree}
        if not present:
            return False
        counts = self.counts()
        least = min(counts[k] for k in present)
        kind = self.rng.choice(sorted(k for k in present if counts[k] == least))
        target = self.rng.choice([t for t in tree if t.kind == kind])
        if not sigkill(target):
            return False  # it ended on its own in the meantime
        self.kills.append(Kill(kind, target.pid, target.run, target.stray, round(time.monotonic() - self.t0, 3),
                               time.time()))  # fmt: skip
        if kind == "master":
            self.old_workers += [t for t in tree if t.kind == "worker"]
            self._restart([t for t in tree if t.kind == "web"])
        return True

    def _restart(self, web_workers: list[Target]) -> None:
        self.up.clear()
        self.web_workers_stopped += len(web_workers)
        self.world.serve.restart_after(web_workers)
        self.restarts += 1
        self.up.set()
