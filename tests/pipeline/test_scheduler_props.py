"""Property tests of the scheduler against a fake executor that runs steps in real threads.

The fake machine records, under a lock, a global sequence number when each step starts and when
it finishes, the machine it ran on, and how many steps ran at once; steps "work" for a random
millisecond or two so that real interleavings happen.
"""

import random
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccci.errors import TransientInfraError
from ccci.pipeline.executor import TIMEOUT_EXIT, ExecResult
from ccci.pipeline.scheduler import run_pipeline
from ccci.pipeline.spec import Pipeline, Step

OUTCOME = {"pass": "passed", "fail": "failed", "timeout": "timed_out", "error": "error"}


class World:
    def __init__(self, isolated):
        self.isolated = isolated
        self.lock = threading.Lock()
        self.seq = 0
        self.spans = {}  # step -> (start seq, end seq, machine name)
        self.running = 0
        self.max_running = 0
        self.open = set()  # machines and checkpoints not yet closed
        self.names = iter(range(10**6))

    def tick(self):
        self.seq += 1
        return self.seq


class FakeMachine:
    log_path = None

    def __init__(self, world):
        self.world = world
        self.name = f"m{next(world.names)}"
        world.open.add(self.name)

    def exec(self, request):
        w, step = self.world, request.env["CCCI_STEP"]
        with w.lock:
            start = w.tick()
            w.running += 1
            w.max_running = max(w.max_running, w.running)
        try:
            time.sleep(random.random() / 500)  # simulated work, not synchronisation
            if request.command == "error":
                raise TransientInfraError("agent lost")
            if request.command == "timeout":
                return ExecResult(TIMEOUT_EXIT, timed_out=True)
            return ExecResult(0 if request.command == "pass" else 1)
        finally:
            with w.lock:
                w.running -= 1
                w.spans[step] = (start, w.tick(), self.name)

    def checkpoint(self):
        return FakeCheckpoint(self.world)

    def close(self):
        self.world.open.discard(self.name)


class FakeCheckpoint:
    def __init__(self, world):
        self.world = world
        self.name = f"c{next(world.names)}"
        world.open.add(self.name)

    def fork(self):
        return FakeMachine(self.world)

    def close(self):
        self.world.open.discard(self.name)


class FakeExecutor:
    name = "fake"

    def __init__(self, world):
        self.world = world
        self.isolated_forks = world.isolated

    def boot(self, workspace, image=None):
        return FakeMachine(self.world)


@st.composite
def pipelines(draw):
    n = draw(st.integers(1, 7))
    steps = []
    for i in range(n):
        needs = draw(st.lists(st.sampled_from(range(i)), unique=True, max_size=3)) if i else []
        fork = draw(st.sampled_from([None, *needs]))
        steps.append(
            Step(
                name=f"s{i}",
                run=draw(st.sampled_from(["pass", "pass", "pass", "fail", "timeout", "error"])),
                needs=tuple(f"s{j}" for j in needs),
                allow_failure=draw(st.booleans()),
                fork_from=None if fork is None else f"s{fork}",
            )
        )
    for k in range(draw(st.integers(0, 2))):
        steps.append(Step(name=f"t{k}", run=draw(st.sampled_from(["pass", "fail"])), teardown=True))
    order = draw(st.permutations(steps))  # declaration order need not be topological
    return Pipeline(path=Path("ci.yml"), steps=tuple(order), parallelism=draw(st.integers(1, 3)))


def expected_statuses(pipeline):
    status = {}
    pending = list(pipeline.steps)
    while pending:
        for step in list(pending):
            if all(n in status for n in step.needs):
                blocked = any(status[n] != "passed" for n in step.needs)
                status[step.name] = "skipped" if blocked else OUTCOME[step.run]
                pending.remove(step)
    return status


def expected_verdict(pipeline, status):
    seen = set()
    for step in pipeline.steps:
        s = status[step.name]
        if step.allow_failure and s in ("failed", "timed_out", "error", "skipped"):
            continue
        seen.add("failed" if s == "skipped" else s)
    for candidate in ("timed_out", "canceled", "error", "failed"):
        if candidate in seen:
            return candidate
    return "passed"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines(), st.booleans())
def test_scheduler_properties(pipeline, isolated):
    world = World(isolated)
    report = run_pipeline(pipeline, FakeExecutor(world), Path("."), {"RECIPE": "fake"})
    status = expected_statuses(pipeline)

    # Results in declaration order, with the dataflow outcome; skips propagate transitively.
    assert [s.name for s in report.steps] == [s.name for s in pipeline.steps]
    assert {s.name: s.status for s in report.steps} == status
    assert report.status == expected_verdict(pipeline, status)

    # Exactly the steps whose needs passed ran; none started before its needs finished.
    ran = {name for name, s in status.items() if s != "skipped"}
    assert set(world.spans) == ran
    for step in pipeline.steps:
        for need in step.needs:
            if step.name in world.spans:
                assert world.spans[step.name][0] > world.spans[need][1]

    # The parallelism bound holds; teardown steps start after every other step finished.
    assert world.max_running <= pipeline.parallelism
    work_end = max((e for name, (_, e, _) in world.spans.items() if name.startswith("s")), default=0)
    for name, (start, _, _) in world.spans.items():
        if name.startswith("t"):
            assert start > work_end

    # A step others fork from, and (without isolated forks) a fork_from step, runs alone in its machine.
    sources = {s.fork_from for s in pipeline.steps if s.fork_from}
    for step in pipeline.steps:
        alone = step.name in sources or (step.fork_from and not isolated)
        if alone and step.name in world.spans:
            start, end, machine = world.spans[step.name]
            for other, (s2, e2, m2) in world.spans.items():
                assert other == step.name or m2 != machine or e2 < start or s2 > end
        if isolated and step.fork_from and step.name in world.spans:
            assert world.spans[step.name][2] != world.spans[step.fork_from][2]  # a fresh fork
    assert any("no isolated forks" in n for n in report.notes) == (
        not isolated and any(s.fork_from and s.name in ran for s in pipeline.steps)
    )
    assert world.open == set()  # every machine and checkpoint closed
