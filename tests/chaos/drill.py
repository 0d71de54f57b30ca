"""The chaos drill: ccci under random SIGKILLs, then every invariant of docs/design.md checked.

    make chaos                                    # 200 kills, about 8 minutes
    .venv/bin/python -m tests.chaos.drill --kills 20 --seed 7 --keep

It serves ccci for real (``python -m ccci serve``: gunicorn and the worker, EXECUTOR=bwrap, the
bubblewrap sandbox) against FakeGitea with three recipe repositories of three pull requests
each (tests/chaos/world.py); makes traffic at random moments (traffic.py) while it kills the
gunicorn master, web workers, the ccci worker, harnesses and step shells at random moments
(killer.py), restarting serve when its master died. Then it lets everything settle — waiting
for no run to be active (/admin/runs) and the outbox to be drained (/metrics) — runs
``ccci sweep`` and checks the invariants (invariants.py). It prints a summary with its
figures and exits 1 naming every invariant that did not hold (2 when the drill itself could
not work); the work directory is kept for a post-mortem when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from . import heartbeats
from .invariants import INVARIANTS, Checker, write_json
from .killer import Killer
from .targets import processes_mentioning, serve_tree, wait_gone
from .traffic import Traffic
from .world import ChaosWorld

WARM_UP = 180.0  # seconds to wait for two apps to be busy at once before the first kill
SHOWN = 12  # evidence lines printed per invariant (the JSON summary has them all)


def main(argv: list[str] | None = None) -> int:
    """Run the drill; return 0 when every invariant held."""
    args = _parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ccci-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    world = ChaosWorld(root)
    say(f"seed {seed}; working in {root}")
    world.start()
    say(f"ccci serve on {world.serve.url} (pid {world.serve.pid}), FakeGitea on {world.gitea.url}")
    traffic = Traffic(world, random.Random(rng.random()), args.pace)
    killer = Killer(world, random.Random(rng.random()), args.interval, t0)
    summary: dict[str, Any] = {"seed": seed, "root": str(root)}
    try:
        summary.update(_drill(args, world, traffic, killer, t0))
    finally:
        world.close()
    summary["after_stop"] = _after_stop(world, summary)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    failed = [name for name, evidence in summary["violations"].items() if evidence]
    broken = summary["drill_errors"]
    _print_summary(summary, killer)
    if args.json:
        write_json(Path(args.json), summary)
    if failed or broken or args.keep:
        say(f"work directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 2 if broken else 1 if failed else 0


def _drill(args: argparse.Namespace, world: ChaosWorld, traffic: Traffic, killer: Killer, t0: float) -> dict:
    stop_traffic = threading.Event()
    talker = threading.Thread(target=traffic.run, args=(stop_traffic,), name="traffic")
    talker.start()
    try:
        _wait_for(lambda: heartbeats.concurrent_apps_seen(world.apps), WARM_UP)  # the check itself comes later
        say(f"warm: runs of different apps are running at once ({time.monotonic() - t0:.0f} s); killing")
        progress = threading.Thread(target=_progress, args=(killer, traffic, args.kills, t0), daemon=True)
        progress.start()
        killer.run(args.kills, threading.Event())
        kill_s = time.monotonic() - t0
    finally:
        stop_traffic.set()
        talker.join()
    say(f"{len(killer.kills)} kills sent; delivering what was not answered yet, then settling")
    traffic.drain(killer.up, time.monotonic() + 300)
    active = _settle(world, killer, args.settle_timeout)
    settle_s = time.monotonic() - t0 - kill_s
    say(f"settled in {settle_s:.0f} s" if not active else f"did not settle: {len(active)} run(s) still active")
    swept = world.ccci("sweep")
    tree = serve_tree(world.serve.pid, world.token, world.gitea.url)
    live = {t.pid for t in tree if t.kind in ("master", "web", "worker")} | {os.getpid()}
    runs = world.runs()
    findings = Checker(world, traffic, runs, live).check()
    findings.add("nothing leaks", [f"{t.kind} {t.pid} (run {t.run}) still in the serve tree" for t in tree
                                   if t.kind in ("harness", "step")])  # fmt: skip
    findings.add("nothing leaks", [f"ccci worker {t.pid} of a killed master is still alive" for t in killer.old_workers
                                   if not wait_gone(t, 0)])  # fmt: skip
    drill_errors = []
    if not findings.figures.get("logs_showing_the_redacted_step_secret"):
        drill_errors.append("no run's log shows the step's secret redacted: the secret check had nothing to find")
    if not findings.figures.get("holdings"):
        drill_errors.append("no step wrote a heartbeat: the overlap checks had nothing to read")
    if traffic.unanswered:
        drill_errors.append(f"{len(traffic.unanswered)} deliveries were never answered")
    log = world.log_path.read_text(errors="replace")
    spans = heartbeats.step_spans(heartbeats.read_beats(world.apps))
    landed = Counter(k.kind for k in killer.kills if heartbeats.mid_step(k.wall, spans, k.run))
    return {
        "kills": killer.counts(),
        "kills_total": len(killer.kills),
        "kills_mid_step": {kind: landed.get(kind, 0) for kind in killer.counts()},
        "kills_of_strays": sum(1 for k in killer.kills if k.stray),
        "kill_phase_s": round(kill_s, 1),
        "settle_s": round(settle_s, 1),
        "serve_restarts": killer.restarts,
        "web_workers_of_dead_masters_stopped": killer.web_workers_stopped,
        "worker_starts_logged": len(re.findall(r"worker started as pid", log)),
        "unexpected_serve_exits": killer.unexpected,
        "traffic": traffic.figures(),
        "sweep": _json_or_text(swept.stdout),
        **findings.figures,
        "violations": findings.violations,
        "drill_errors": drill_errors,
        "kill_log": [k.__dict__ for k in killer.kills],
    }


def _settle(world: ChaosWorld, killer: Killer, timeout: float) -> list[dict]:
    """Wait until no run is active and the outbox is drained, twice in a row; return what is still active."""
    deadline = time.monotonic() + timeout
    delay, quiet, active = 0.2, 0, [{"id": "?"}]
    while quiet < 2:
        if not world.serve.up():
            killer.unexpected.append(f"ccci serve exited with {world.serve.proc.returncode} while settling")
            killer._restart([])
        try:
            params = [("state", "queued"), ("state", "running"), ("limit", "1000")]
            active = world.admin("GET", "/admin/runs", params=params).json()["runs"]
            metrics = requests.get(world.serve.url + "/metrics", timeout=15).text
            drained = "ccci_outbox_backlog 0.0\n" in metrics
            quiet = quiet + 1 if not active and drained else 0
        except (requests.RequestException, ValueError):
            quiet = 0
        if quiet < 2 and time.monotonic() > deadline:
            return active
        time.sleep(delay)  # the store's state has no event to wait on from outside
        delay = min(delay * 1.5, 2.0)
    return []


def _after_stop(world: ChaosWorld, summary: dict) -> list[str]:
    """Once serve was stopped, nothing of ccci or of any run may be left running."""
    left = processes_mentioning(world.needles, world.root, {os.getpid()})
    evidence = [f"process {pid} still running after serve stopped: {line}" for pid, line in left]
    summary.setdefault("violations", {name: [] for name in INVARIANTS})["nothing leaks"] += evidence
    return evidence


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)  # heartbeats are files other processes write: nothing to wait on
        delay = min(delay * 2, 0.5)
    return True


def _progress(killer: Killer, traffic: Traffic, total: int, t0: float) -> None:
    shown = 0
    while shown < total:
        if len(killer.kills) >= shown + max(1, total // 10):
            shown = len(killer.kills)
            counts = ", ".join(f"{k} {n}" for k, n in killer.counts().items())
            say(f"{shown}/{total} kills ({counts}); {len(traffic.deliveries)} deliveries, "
                f"{killer.restarts} serve restarts, {time.monotonic() - t0:.0f} s")  # fmt: skip
        time.sleep(1)  # a progress line, nothing waits on it


def _print_summary(s: dict, killer: Killer) -> None:
    t = s.get("traffic", {})
    kills = ", ".join(f"{k} {n}" for k, n in s.get("kills", {}).items())
    print(f"\nccci chaos drill — seed {s['seed']}, wall time {s['wall_s']:.0f} s "
          f"(kills {s.get('kill_phase_s', 0):.0f} s, settling {s.get('settle_s', 0):.0f} s)")  # fmt: skip
    mid = ", ".join(f"{k} {n}" for k, n in s.get("kills_mid_step", {}).items())
    print(f"  kills:       {s.get('kills_total', 0)} SIGKILLs — {kills}; of them {s.get('kills_of_strays', 0)} of "
          f"harnesses (or their steps) whose worker had died")  # fmt: skip
    print(f"  mid-step:    kills that landed while a step was running (of the killed run, for harness and step): "
          f"{mid}")  # fmt: skip
    print(f"  restarts:    serve {s.get('serve_restarts', 0)} (web workers of dead masters stopped: "
          f"{s.get('web_workers_of_dead_masters_stopped', 0)}), ccci worker starts logged "
          f"{s.get('worker_starts_logged', 0)}")  # fmt: skip
    print(f"  deliveries:  {t.get('deliveries', 0)} {t.get('by_kind', {})}; unanswered attempts sent again: "
          f"{t.get('attempts_unanswered', 0)}; redeliveries answered 'ignored': "
          f"{t.get('redeliveries_answered_ignored', 0)}")  # fmt: skip
    print(f"  runs:        accepted (202) {t.get('accepted_202', 0)}, in the store {s.get('runs_in_store', 0)}, "
          f"by verdict {s.get('runs_by_state', {})}, superseded {s.get('superseded', 0)}")  # fmt: skip
    print(f"  found:       duplicates {s.get('duplicates_found', 0)}, leaks {s.get('leaks_found', 0)}, "
          f"malformed refused {s.get('malformed_refused', 0)}/{sum(t.get('malformed', {}).values())}, "
          f"same-app holdings {s.get('holdings', 0)}, cross-app overlaps {s.get('cross_app_overlaps', 0)}, "
          f"places searched for secrets {s.get('places_searched', 0)} (the step's secret redacted in "
          f"{s.get('logs_showing_the_redacted_step_secret', 0)} run logs)")  # fmt: skip
    print(f"  sweep after settling: {_sweep_line(s.get('sweep'))}")
    for what in s.get("unexpected_serve_exits", []):
        print(f"  note: {what}")
    for name, text in INVARIANTS.items():
        evidence = s["violations"].get(name, [])
        print(f"  {'FAIL' if evidence else 'ok  '}  {name}: {text}" + (f" ({len(evidence)})" if evidence else ""))
        for line in evidence[:SHOWN]:
            print(f"          - {line}")
        if len(evidence) > SHOWN:
            print(f"          … {len(evidence) - SHOWN} more in the JSON summary")
    for error in s.get("drill_errors", []):
        print(f"  DRILL  {error}")


def _sweep_line(sweep: Any) -> str:
    if not isinstance(sweep, dict):
        return str(sweep)[:200]
    swept = sum(len(v) for v in sweep.get("swept", {}).values())
    return (f"reaped {len(sweep.get('reaped_apps', []))} app(s), removed {len(sweep.get('removed_abra_dirs', []))} "
            f"ABRA_DIR(s) and {swept} other leftover(s), {len(sweep.get('errors', []))} error(s)")  # fmt: skip


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text[-2000:]


def say(text: str) -> None:
    """Print one progress line."""
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.drill", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=200, help="SIGKILLs to send (default %(default)s)")
    p.add_argument("--interval", type=float, default=2.0, help="mean seconds between kills (default %(default)s)")
    p.add_argument("--pace", type=float, default=1.5, help="mean seconds between deliveries (default %(default)s)")
    p.add_argument("--seed", type=int, help="seed of the random choices (default: a new one, printed)")
    p.add_argument("--settle-timeout", type=float, default=900, help="seconds to wait for quiet (default %(default)s)")
    p.add_argument("--workdir", help="directory to work in (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even when everything held")
    p.add_argument("--json", help="also write the summary, with all evidence, to this file")
    return p


if __name__ == "__main__":
    sys.exit(main())
