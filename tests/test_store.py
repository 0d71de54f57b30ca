"""The store: atomic comment claims across processes, run state changes, the outbox."""

import subprocess
import sys
import textwrap

from ccci.store import Store

CLAIMER = textwrap.dedent(
    """
    import sys
    from ccci.store import Store
    store = Store(sys.argv[1])
    sys.stdin.readline()  # start together
    claimed, run = store.claim_comment(owner="o", repo="r", comment_id=7, action="test",
                                       run={"pr": 1, "recipe": "r", "requester": "alice"})
    print("claimed" if claimed else "duplicate", run.id if run else "-")
    """
)


def test_concurrent_claims_from_many_processes_make_one_run(tmp_path):
    db = tmp_path / "ccci.db"
    Store(db)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        outputs.append(out.split())
    assert sorted(o[0] for o in outputs) == ["claimed"] + ["duplicate"] * 7
    run_ids = {o[1] for o in outputs}
    assert len(run_ids) == 1  # every duplicate sees the one run the claim made
    assert len(Store(db).list_runs()) == 1


def test_update_only_from_given_states(tmp_path):
    store = Store(tmp_path / "db")
    _, run = store.claim_comment(
        owner="o", repo="r", comment_id=1, action="test", run={"pr": 1, "recipe": "r", "requester": "u"}
    )
    assert store.update_run(run.id, only_if_state=("queued",), state="running")
    assert not store.update_run(run.id, only_if_state=("queued",), state="running")
    assert store.update_run(run.id, only_if_state=("running",), state="passed", report={"status": "passed"})
    assert store.get_run(run.id).report_dict() == {"status": "passed"}
    assert not store.update_run(run.id, only_if_state=("queued", "running"), state="failed")


def test_an_answer_is_noted_once_per_user_and_pr(tmp_path):
    store = Store(tmp_path / "db")
    assert store.note_answer(repo="o/r", pr=1, login="Mallory")
    assert not store.note_answer(repo="o/r", pr=1, login="mallory")
    assert store.note_answer(repo="o/r", pr=2, login="mallory")


def test_outbox_coalesces_pending_writes_and_keeps_order(tmp_path):
    store = Store(tmp_path / "db")
    a = store.enqueue("run_comment", {"body": "queued"}, run_id=1, coalesce_key="run_comment:1")
    b = store.enqueue("status", {"state": "pending"}, run_id=1)
    c = store.enqueue("run_comment", {"body": "running"}, run_id=1, coalesce_key="run_comment:1")
    assert a == c  # replaced in place: still ahead of the status
    items = store.pending_outbox()
    assert [(i.id, i.payload) for i in items] == [(a, {"body": "running"}), (b, {"state": "pending"})]
    # A write replaced while in flight is not marked delivered with the old payload.
    assert not store.mark_delivered(a, payload={"body": "queued"})
    assert store.mark_delivered(a, payload={"body": "running"})
    assert store.outbox_backlog() == 1


def test_queue_position_counts_admitted_runs_ahead(tmp_path):
    store = Store(tmp_path / "db")
    ids = []
    for n in range(3):
        _, run = store.claim_comment(
            owner="o",
            repo="r",
            comment_id=n,
            action="test",
            run={"pr": n, "recipe": "r", "requester": "u", "admitted": 1},
        )
        ids.append(run.id)
    assert [store.queue_position(i) for i in ids] == [0, 1, 2]
    store.update_run(ids[0], state="running")
    assert store.queue_position(ids[2]) == 1


def test_a_transaction_commits_all_or_nothing(tmp_path):
    store = Store(tmp_path / "db")
    try:
        with store.transaction():
            store.claim_comment(
                owner="o", repo="r", comment_id=5, action="test", run={"pr": 1, "recipe": "r", "requester": "u"}
            )
            store.enqueue("reaction", {"content": "eyes"})
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    assert store.list_runs() == [] and store.outbox_backlog() == 0
    claimed, _ = store.claim_comment(owner="o", repo="r", comment_id=5, action="test")
    assert claimed  # the rolled-back claim left nothing behind


def test_events_are_read_incrementally_and_a_half_written_line_waits(tmp_path):
    from ccci.harness.runfiles import RunFiles

    files = RunFiles(tmp_path, 3)
    files.create()
    files.append_event({"kind": "started", "step": "a"})
    events, offset = files.read_events_from(0)
    assert events == [{"kind": "started", "step": "a"}]
    with files.events.open("a") as f:
        f.write('{"kind": "finished", "st')  # being written
    assert files.read_events_from(offset) == ([], offset)
    with files.events.open("a") as f:
        f.write('ep": "a"}\n')
    assert files.read_events_from(offset)[0] == [{"kind": "finished", "step": "a"}]
    assert len(files.read_events()) == 2


def test_counters_and_heartbeats_add_up_across_connections(tmp_path):
    a, b = Store(tmp_path / "ccci.db"), Store(tmp_path / "ccci.db")
    a.count("webhook_deliveries", "queued")
    b.count("webhook_deliveries", "queued")
    b.count("webhook_deliveries", "ignored", by=3)
    assert a.counters("webhook_deliveries") == {"queued": 2, "ignored": 3} and a.counters("forge_errors") == {}
    assert a.heartbeat("worker") is None
    b.beat("worker", at=100.0)
    b.beat("worker", at=200.0)
    assert a.heartbeat("worker") == 200.0


def test_durations_are_histograms_of_finished_and_started_runs(tmp_path):
    store = Store(tmp_path / "ccci.db")
    for i, (wait, took) in enumerate([(2.0, 30.0), (20.0, 400.0), (0.5, None)]):
        _, run = store.claim_comment(owner="o", repo="r", comment_id=i, action="test",
                                     run={"pr": i, "recipe": "r", "requester": "a"})  # fmt: skip
        changes = {"created_at": 1000.0, "started_at": 1000.0 + wait, "state": "running"}
        if took is not None:
            changes.update(finished_at=1000.0 + wait + took, state="passed")
        store.update_run(run.id, **changes)
    assert store.durations("run", (60.0, 600.0)) == ([1, 2], 2, 430.0)
    assert store.durations("queue_wait", (1.0, 5.0, 60.0)) == ([1, 2, 3], 3, 22.5)
    assert store.finished_counts() == {"passed": 2}


def test_outbox_stats_say_backlog_retries_and_the_oldest_pending(tmp_path):
    store = Store(tmp_path / "ccci.db")
    assert store.outbox_stats() == {"pending": 0, "retries": 0, "oldest_pending": None}
    first = store.enqueue("comment", {"n": 1})
    store.enqueue("comment", {"n": 2})
    for _ in range(2):  # two attempts that failed, then the one that got through
        store.mark_attempt(first)
        store.mark_failed(first, "forge down", 0.0)
    store.mark_attempt(first)
    store.mark_delivered(first)
    stats = store.outbox_stats()
    assert stats["pending"] == 1 and stats["retries"] == 2 and stats["oldest_pending"] > 0
