"""The invariants of docs/design.md, checked on everything a settled drill left behind.

Each check returns the evidence of its violations as sentences (an empty list: it held), named
by the invariant it guards. They read the forge (every comment with its edit history, every
commit status and reaction), the store through ``ccci runs --json``, the run pages and the API,
the files under STATE_DIR, ccci's own log, the heartbeats, and /proc.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ccci.reporter import COMMIT_STATE_OF
from ccci.store import ACTIVE_STATES, FINAL_STATES
from ccci.vm.owner import TAG
from ccci.vm.snapshot import vm_dir

from . import heartbeats
from .targets import processes_mentioning
from .traffic import TESTME_KINDS, Traffic
from .world import PUBLIC_URL, ChaosWorld

INVARIANTS = {
    "exactly one final report": "Every accepted !testme gets exactly one final report, across restarts of any process",
    "one comment, one run": "One comment -> at most one run, however often the forge delivers it",
    "nothing leaks": "After the next sweep: no process of any run, no fork file, lock or ABRA_DIR",
    "same app never overlaps": "Two runs of the same app never overlap",
    "apps never wait for each other": "Runs of different apps never wait for each other (no global serialisation)",
    "no secret anywhere": "No secret value appears in a comment, a log, a report, a run file or a page",
    "bad input refused": "Bad input gets a clear refusal (4xx, never 5xx) and changes nothing",
}
MARKER = re.compile(r"<!-- ccci:run=(\d+) -->")
HEAD = re.compile(r"^### \S+ (passed|failed|error|canceled|timed out|queued|running)\b")


def verdict(body: str) -> str | None:
    """Return the final verdict a run comment shows, or None while it shows progress."""
    lines = body.splitlines()
    head = lines[1] if len(lines) > 1 else ""
    if "was superseded by run" in head:
        return "canceled"
    m = HEAD.match(head)
    if m is None or m.group(1) in ("queued", "running"):
        return None
    return m.group(1).replace(" ", "_")


def final_body_problems(rid: int, state: str, comment: Any) -> list[str]:
    """Say what is wrong with run ``rid``'s comment: not showing ``state``, or changed after its final report."""
    bodies = [*comment.history, comment.body]
    if verdict(comment.body) != state:
        shown = verdict(comment.body) or "progress"
        return [f"run {rid} is {state} but comment {comment.id} shows {shown}: {comment.body[:160]!r}"]
    first = next(i for i, b in enumerate(bodies) if verdict(b) is not None)
    changed = [i for i in range(first + 1, len(bodies)) if bodies[i] != bodies[first]]
    if changed:
        return [f"comment {comment.id} of run {rid} changed after its final report (version {changed[0] + 1} "
                f"of {len(bodies)}): {bodies[first][:120]!r} then {bodies[changed[0]][:120]!r}"]  # fmt: skip
    return []


def final_status_problems(run: dict[str, Any], mine: list[dict[str, Any]]) -> list[str]:
    """Say what is wrong with the commit statuses of ``run``: one final status, last, matching its state."""
    rid = run["id"]
    if not run["sha"]:
        return [f"run {rid} never pinned a sha yet has commit statuses {mine}"] if mine else []
    finals = [s["state"] for s in mine if s["state"] != "pending"]
    want = COMMIT_STATE_OF[run["state"]]
    if finals != [want]:
        return [f"run {rid} ({run['state']}) has final statuses {finals} on {run['sha'][:10]}, not [{want!r}]"]
    if mine[-1]["state"] != want:
        return [f"run {rid}'s last status is {mine[-1]['state']!r}, after its final {want!r}"]
    return []


@dataclass
class Findings:
    """Violations by invariant, and the figures the checks measured on the way."""

    violations: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in INVARIANTS})
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, invariant: str, evidence: list[str]) -> None:
        """Record ``evidence`` against ``invariant``."""
        self.violations[invariant] += evidence


class Checker:
    """Checks one settled drill."""

    def __init__(self, world: ChaosWorld, traffic: Traffic, runs: list[dict[str, Any]], live: set[int]):
        self.world = world
        self.traffic = traffic
        self.runs = runs
        self.by_id = {r["id"]: r for r in runs}
        self.live = live  # the serve tree's own processes (master, web workers, worker) and this one
        self.bot = [c for c in world.gitea.comments.values() if c.user == world.gitea.bot_login]

    def check(self) -> Findings:
        """Run every check."""
        found = Findings()
        found.add("exactly one final report", self.final_reports(found.figures))
        found.add("one comment, one run", self.one_run_per_comment(found.figures))
        found.add("nothing leaks", self.leaks(found.figures))
        beats = heartbeats.read_beats(self.world.apps)
        held = heartbeats.holdings(beats)
        found.add("same app never overlaps", self.same_app_overlaps(held, found.figures))
        found.add("one comment, one run", heartbeats.steps_run_twice(beats))
        found.add("apps never wait for each other", self.cross_app(held, found.figures))
        found.add("no secret anywhere", self.secrets(found.figures))
        found.add("bad input refused", self.bad_input(found.figures))
        return found

    # -- exactly one final report ------------------------------------------------------------------

    def final_reports(self, figures: dict[str, Any]) -> list[str]:
        """Every run ended once, and the forge shows that one end: one comment, one final status."""
        bad = []
        for comment_id, run_id in sorted(self.traffic.accepted().items()):
            if run_id not in self.by_id:
                bad.append(f"comment {comment_id} was answered 202 queued as run {run_id}, which the store lacks")
        comments = defaultdict(list)
        for c in self.bot:
            m = MARKER.search(c.body)
            if m:
                comments[int(m.group(1))].append(c)
        statuses = defaultdict(list)
        for entries in self.world.gitea.statuses.values():
            for s in entries:
                statuses[s["target_url"]].append(s)
        for run_id in sorted(set(comments) - set(self.by_id)):
            bad.append(f"comments {[c.id for c in comments[run_id]]} report run {run_id}, which the store lacks")
        for r in self.runs:
            rid, state = r["id"], r["state"]
            if state in ACTIVE_STATES:
                bad.append(f"run {rid} is still {state} after settling (dispatch ref {r['dispatch_ref']})")
                continue
            if state not in FINAL_STATES:
                continue  # refused: not a run anyone asked to see
            if not r["report"] or r["report"].get("status") != state:
                bad.append(f"run {rid} is {state} but its stored report says {(r['report'] or {}).get('status')}")
            mine = comments.get(rid, [])
            if len(mine) != 1:
                bad.append(f"run {rid} ({state}) has {len(mine)} status comments on the forge: {[c.id for c in mine]}")
            for c in mine:
                bad += final_body_problems(rid, state, c)
            bad += final_status_problems(r, statuses.get(f"{PUBLIC_URL}/runs/{rid}", []))
        figures["runs_in_store"] = len(self.runs)
        figures["runs_by_state"] = dict(Counter(r["state"] for r in self.runs))
        figures["superseded"] = sum(1 for r in self.runs if r["superseded_by"])
        return bad

    # -- one comment, one run ------------------------------------------------------------------------

    def one_run_per_comment(self, figures: dict[str, Any]) -> list[str]:
        """No comment made two runs, however it was delivered, and no run came from nowhere."""
        bad = []
        for comment_id, n in Counter(r["comment_id"] for r in self.runs).items():
            if n > 1:
                ids = [r["id"] for r in self.runs if r["comment_id"] == comment_id]
                bad.append(f"comment {comment_id} made {n} runs: {ids}")
        named: dict[int, set[int]] = defaultdict(set)
        queued: Counter[int] = Counter()
        for d in self.traffic.deliveries:
            if d.kind in TESTME_KINDS:
                if d.answer.get("run") is not None:
                    named[d.comment_id].add(d.answer["run"])
                if d.status == 202:
                    queued[d.comment_id] += 1
        bad += [f"deliveries of comment {c} were answered with runs {sorted(ids)}" for c, ids in named.items()
                if len(ids) > 1]  # fmt: skip
        bad += [f"comment {c} was answered 202 queued {n} times" for c, n in queued.items() if n > 1]
        testme = {d.comment_id for d in self.traffic.deliveries if d.kind in TESTME_KINDS}
        bad += [f"run {r['id']} has comment {r['comment_id']}, which no !testme delivery carried"
                for r in self.runs if r["comment_id"] not in testme]  # fmt: skip
        figures["duplicates_found"] = len(bad)
        return bad

    # -- nothing leaks -------------------------------------------------------------------------------

    def leaks(self, figures: dict[str, Any]) -> list[str]:
        """After the sweep: no run's process, lock file, ABRA_DIR or VM fork is left."""
        w = self.world
        bad = [f"process {pid} outlived its run: {line}" for pid, line in
               processes_mentioning(w.needles, w.root, self.live)]  # fmt: skip
        bad += [f"lock file left: {p}" for p in sorted(w.lock_dir.glob("*.lock"))]
        runs_dir = w.state_dir / "runs"
        bad += [f"ABRA_DIR left: {p}" for p in sorted(runs_dir.glob("*/abra"))]
        bad += [f"ABRA_DIR owner file left: {p}" for p in sorted(runs_dir.glob("*/abra-owner.json"))]
        for p in sorted(runs_dir.glob("reap-*")):  # a reaper's temporary run directory (harness.run.reap_app)
            inside = sorted(str(c.relative_to(p)) for c in p.iterdir())
            bad.append(f"reaper's run directory left: {p} ({', '.join(inside) if inside else 'empty'}); "
                       f"the process reaping there was killed, and the sweep left it")  # fmt: skip
        forks = vm_dir(w.state_dir)
        if forks.is_dir():
            bad += [f"VM fork file left: {p}" for p in sorted(forks.iterdir()) if TAG.match(p.name)]
        figures["leaks_found"] = len(bad)
        return bad

    # -- overlaps --------------------------------------------------------------------------------

    def same_app_overlaps(self, held: list[heartbeats.Holding], figures: dict[str, Any]) -> list[str]:
        """No two runs held one app at the same moment."""
        figures["holdings"] = len(held)
        return [
            f"runs {a.run} and {b.run} both held {a.app}: {a.run} from {a.first:.3f} to {a.last:.3f}, "
            f"{b.run} from {b.first:.3f} to {b.last:.3f}"
            for a, b in heartbeats.overlaps(held, same_app=True)
        ]

    def cross_app(self, held: list[heartbeats.Holding], figures: dict[str, Any]) -> list[str]:
        """Runs of different apps ran at once at least once, and no run waited for another app."""
        together = heartbeats.overlaps(held, same_app=False)
        figures["cross_app_overlaps"] = len(together)
        bad = [] if together else ["no two runs of different apps ever ran at the same moment"]
        recipe = {str(r["id"]): r["recipe"] for r in self.runs}
        for events in sorted((self.world.state_dir / "runs").glob("*/events.jsonl")):
            run = events.parent.name
            for line in events.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                m = re.search(r"held by run (\S+)", event.get("text", "")) if event.get("kind") == "waiting" else None
                if m and recipe.get(m.group(1)) not in (None, recipe.get(run)):
                    bad.append(f"run {run} ({recipe.get(run)}) waited for run {m.group(1)} ({recipe[m.group(1)]})")
        return bad

    # -- secrets ---------------------------------------------------------------------------------

    def secrets(self, figures: dict[str, Any]) -> list[str]:
        """Look for every secret in every comment version, status, log, run file and page."""
        w = self.world
        places: dict[str, bytes] = {}
        for c in w.gitea.comments.values():
            for i, body in enumerate([*c.history, c.body]):
                places[f"comment {c.id} (version {i + 1})"] = body.encode()
        for sha, entries in w.gitea.statuses.items():
            places[f"statuses of {sha[:10]}"] = json.dumps(entries).encode()
        places["ccci's log"] = w.log_path.read_bytes()
        for path in sorted(p for p in w.state_dir.rglob("*") if p.is_file()):
            places[str(path.relative_to(w.root))] = path.read_bytes()
        places.update(self._pages())
        bad = []
        for name, value in w.secrets.named().items():
            bad += [f"the {name} appears in {where}" for where, data in places.items() if value.encode() in data]
        logs = list((w.state_dir / "runs").glob("*/log"))
        figures["places_searched"] = len(places)
        figures["logs_showing_the_redacted_step_secret"] = sum(
            1 for p in logs if b"the step's secret is [redacted]" in p.read_bytes()
        )
        return bad

    def _pages(self) -> dict[str, bytes]:
        url = self.world.serve.url
        pages = {}
        for r in self.runs:
            rid = r["id"]
            for suffix, headers in (("", {}), ("", {"Accept": "application/json"}), ("/log", {})):
                name = f"GET /runs/{rid}{suffix}{' (JSON)' if headers else ''}"
                pages[name] = requests.get(f"{url}/runs/{rid}{suffix}", headers=headers, timeout=30).content
            for artifact in (r["report"] or {}).get("artifacts", []):
                got = requests.get(f"{url}/runs/{rid}/artifacts/{artifact}", timeout=30)
                pages[f"GET /runs/{rid}/artifacts/{artifact}"] = got.content
        pages["GET /admin/runs"] = self.world.admin("GET", "/admin/runs", params={"limit": 1000}).content
        for path in ("/metrics", "/healthz"):
            pages[f"GET {path}"] = requests.get(url + path, timeout=30).content
        return pages

    # -- bad input -------------------------------------------------------------------------------

    def bad_input(self, figures: dict[str, Any]) -> list[str]:
        """Every malformed delivery got a 4xx, nothing answered 5xx, and none of them changed a thing."""
        bad = list(self.traffic.five_xx)
        malformed = [d for d in self.traffic.deliveries if d.malformed]
        for d in malformed:
            if d.status is None or not 400 <= d.status < 500:
                bad.append(f"{d.kind[10:]} (comment {d.comment_id}) was answered {d.status}: {d.answer}")
        touched = {d.comment_id for d in malformed}
        bad += [f"run {r['id']} was made from malformed delivery of comment {r['comment_id']}"
                for r in self.runs if r["comment_id"] in touched]  # fmt: skip
        reactions = self.world.gitea.reactions
        bad += [f"ccci reacted {reactions[c]} to comment {c}, only ever delivered malformed"
                for c in sorted(touched) if reactions.get(c)]  # fmt: skip
        figures["malformed_refused"] = sum(1 for d in malformed if d.status is not None and 400 <= d.status < 500)
        return bad


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
