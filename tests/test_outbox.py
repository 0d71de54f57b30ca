"""The courier against a real HTTP fake forge: order, coalescing, backoff while down, no loss."""

from __future__ import annotations

import time

import pytest

from ccci.config import load_settings
from ccci.forge import GiteaClient
from ccci.outbox import Courier
from ccci.reporter import Reporter
from ccci.store import Store
from tests.fakes.gitea import FakeGitea

SHA = "a" * 40


@pytest.fixture
def forge():
    with FakeGitea() as gitea:
        gitea.open_pr("coop-cloud", "hello", 3, SHA)
        client = GiteaClient(gitea.url, gitea.token, retries=0)
        yield gitea, client
        client.close()


def make_run(store: Store):
    _, run = store.claim_comment(
        owner="coop-cloud",
        repo="hello",
        comment_id=99,
        action="test",
        run={"pr": 3, "recipe": "hello", "requester": "alice", "sha": SHA, "admitted": 1},
    )
    return run


def test_writes_wait_while_the_forge_is_down_and_all_arrive_in_order_after(tmp_path, forge):
    gitea, client = forge
    store = Store(tmp_path / "db")
    reporter = Reporter(store, load_settings({}))
    courier = Courier(store, client, bot_login=gitea.bot_login, base_backoff=0.01)
    run = make_run(store)

    gitea.set_down(True)
    reporter.queued(run)
    reporter.status(run, "queued", "queued")
    reporter.status(run, "passed", "passed")
    now = time.time()
    next_due = courier.deliver_due(now)
    assert next_due is not None and next_due > now
    assert store.outbox_backlog() == 3
    assert not gitea.comments and not gitea.statuses
    # Only the first write of the run was tried (its marker lookup failed): the rest waited behind it.
    assert [c.method for c in gitea.api_calls()] == ["GET"]

    gitea.set_down(False)
    assert courier.deliver_due(next_due + 1) is None
    assert store.outbox_backlog() == 0
    assert [s["state"] for s in gitea.statuses[SHA]] == ["pending", "success"]
    [comment] = gitea.comments.values()
    assert "<!-- ccci:run=" in comment.body
    assert store.get_run(run.id).status_comment == comment.id


def test_the_run_comment_is_edited_in_place_and_found_again_by_its_marker(tmp_path, forge):
    gitea, client = forge
    store = Store(tmp_path / "db")
    reporter = Reporter(store, load_settings({}))
    courier = Courier(store, client, bot_login=gitea.bot_login)
    run = make_run(store)
    reporter.queued(run)
    courier.deliver_due()
    [comment] = gitea.comments.values()
    # A crash lost the comment id: the marker finds the comment again, no second one is made.
    store.update_run(run.id, status_comment=None)
    reporter.running(store.get_run(run.id), [])
    courier.deliver_due()
    assert len(gitea.comments) == 1
    assert "running" in gitea.comments[comment.id].body
    assert gitea.comments[comment.id].history  # edited, not replaced


def test_coalesced_edits_send_only_the_latest_body(tmp_path, forge):
    gitea, client = forge
    store = Store(tmp_path / "db")
    reporter = Reporter(store, load_settings({}))
    courier = Courier(store, client, bot_login=gitea.bot_login)
    run = make_run(store)
    for _ in range(5):
        reporter.running(run, [])
    reporter.queued(run)
    courier.deliver_due()
    assert len(gitea.api_calls("POST", "/comments")) == 1
    assert not gitea.api_calls("PATCH")


def test_a_permanent_refusal_is_given_up_instead_of_blocking_the_run(tmp_path, forge):
    gitea, client = forge
    store = Store(tmp_path / "db")
    courier = Courier(store, client, bot_login=gitea.bot_login)
    store.enqueue(
        "reaction", {"owner": "coop-cloud", "repo": "hello", "comment_id": 424242, "content": "eyes"}, run_id=1
    )
    store.enqueue(
        "status",
        {
            "owner": "coop-cloud",
            "repo": "hello",
            "sha": SHA,
            "state": "success",
            "description": "ok",
            "context": "ccci/testme",
        },
        run_id=1,
    )
    courier.deliver_due()
    assert store.outbox_backlog() == 0  # the 404 reaction was dropped, the status went out
    assert [s["state"] for s in gitea.statuses[SHA]] == ["success"]


def test_a_marker_someone_else_wrote_is_never_taken_for_ccci_s_comment(tmp_path, forge):
    gitea, client = forge
    store = Store(tmp_path / "db")
    reporter = Reporter(store, load_settings({}))
    courier = Courier(store, client, bot_login=gitea.bot_login)
    run = make_run(store)
    planted = gitea.post_comment("coop-cloud", "hello", 3, f"nice PR <!-- ccci:run={run.id} -->", user="mallory")
    reporter.queued(run)
    courier.deliver_due()
    assert gitea.comments[planted.id].body.startswith("nice PR") and not gitea.comments[planted.id].history
    [own] = [c for c in gitea.comments.values() if c.user == gitea.bot_login]
    assert store.get_run(run.id).status_comment == own.id


def test_a_write_the_forge_keeps_failing_is_given_up_after_max_attempts(tmp_path, forge, monkeypatch):
    from ccci import outbox

    gitea, client = forge
    monkeypatch.setattr(outbox, "MAX_ATTEMPTS", 3)
    store = Store(tmp_path / "db")
    courier = Courier(store, client, bot_login=gitea.bot_login, base_backoff=0.001)
    store.enqueue("comment", {"owner": "coop-cloud", "repo": "hello", "pr": 3, "body": "hello"}, run_id=1)
    gitea.set_down(True)
    now = time.time()
    for _ in range(3):
        now = (courier.deliver_due(now) or now) + 1
    assert store.outbox_backlog() == 0  # given up, and the run's later writes are free to go
    assert len(gitea.api_calls()) == 3  # tried three times (a first POST, then looking before a resend)
