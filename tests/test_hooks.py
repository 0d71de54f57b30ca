"""``POST /hooks/forge`` through the real Flask app and store: every refusal, every ignore."""

from __future__ import annotations

import json

import pytest

from ccci.config import load_settings
from ccci.store import Store
from ccci.web import create_app
from tests.fakes import DELETE, delivery, load_payload, sign

SECRET = "hook-secret-0123456789"


@pytest.fixture
def app_factory(tmp_path):
    def make(**settings):
        values = {"STATE_DIR": tmp_path / "state", "WEBHOOK_SECRET": SECRET, "ALLOWED_USERS": ("alice",), **settings}
        return create_app(load_settings({}, **values))

    return make


@pytest.fixture
def client(app_factory):
    return app_factory().test_client()


def post(client, headers, body):
    return client.post("/hooks/forge", data=body, headers=headers)


def store_of(client) -> Store:
    return client.application.extensions["ccci"].store


def as_alice(name: str, **overrides):
    return delivery(name, SECRET, comment__user__login="alice", sender__login="alice", **overrides)


def test_a_signed_testme_is_queued_with_its_run_id_and_acknowledgement(client):
    headers, body = as_alice("gitea_pr_comment_created", comment__body="!testme")
    answer = post(client, headers, body)
    assert answer.status_code == 202
    run = store_of(client).get_run(answer.json["run"])
    assert answer.json["result"] == "queued" and run.requester == "alice" and run.state == "queued"
    assert [i.kind for i in store_of(client).pending_outbox()] == ["reaction", "run_comment"]


def test_forgejo_headers_are_accepted(client):
    headers, body = as_alice("forgejo_pr_comment_created", forge="forgejo", comment__body="!testme")
    headers = {k: v for k, v in headers.items() if not k.startswith("X-Gitea")}  # Forgejo's own names only
    assert post(client, headers, body).status_code == 202


def test_without_a_configured_secret_every_delivery_is_refused(app_factory):
    client = app_factory(WEBHOOK_SECRET="").test_client()
    for secret in ("", SECRET):
        headers, body = as_alice("gitea_pr_comment_created", comment__body="!testme")
        headers = sign(body, secret)
        answer = post(client, headers, body)
        assert answer.status_code == 401 and "WEBHOOK_SECRET" in answer.json["error"]
    assert store_of(client).list_runs() == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, b: ({k: v for k, v in h.items() if "Signature" not in k}, b),  # unsigned
        lambda h, b: (h, b + b" "),  # body changed after signing
        lambda h, b: ({**h, "X-Gitea-Signature": "0" * 64}, b),  # a forged header beside good ones
    ],
)
def test_bad_signatures_are_401_and_record_nothing(client, mutate):
    headers, body = mutate(*as_alice("gitea_pr_comment_created", comment__body="!testme"))
    assert post(client, headers, body).status_code == 401
    assert store_of(client).list_runs() == [] and store_of(client).outbox_backlog() == 0


def test_a_body_over_the_limit_is_413(app_factory):
    client = app_factory(MAX_BODY=2048).test_client()
    payload = load_payload("gitea_pr_comment_created", comment__body="!testme\n" + "x" * 4096)
    body = json.dumps(payload).encode()
    answer = post(client, sign(body, SECRET), body)
    assert answer.status_code == 413 and "2048" in answer.json["error"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", "é".encode("latin-1")])
def test_malformed_bodies_are_400(client, body):
    assert post(client, sign(body, SECRET), body).status_code == 400


def test_an_issue_comment_missing_fields_is_400(client):
    headers, body = delivery("gitea_pr_comment_created", SECRET, comment=DELETE)
    assert post(client, headers, body).status_code == 400


@pytest.mark.parametrize(
    "name, overrides, event, reason",
    [
        ("gitea_push", {}, "push", "push"),
        ("gitea_pr_comment_edited", {"comment__body": "!testme"}, "issue_comment", "edited"),
        ("gitea_issue_comment_not_pr", {"comment__body": "!testme"}, "issue_comment", "not a pull request"),
        ("gitea_pr_closed_comment", {"comment__body": "!testme"}, "issue_comment", "closed"),
        ("gitea_pr_comment_created", {"comment__body": "> !testme"}, "issue_comment", "no command"),
        ("gitea_pr_comment_created", {"comment__body": "!testmexyz"}, "issue_comment", "no command"),
        ("gitea_pr_comment_created", {"comment__body": "<!-- ccci:run=4 -->\n!testme"}, "issue_comment", "ccci"),
    ],
)
def test_everything_else_is_2xx_ignored_with_a_reason(client, name, overrides, event, reason):
    headers, body = delivery(name, SECRET, event=event, **overrides)
    answer = post(client, headers, body)
    assert answer.status_code == 200 and answer.json["result"] == "ignored"
    assert reason in answer.json["reason"]
    assert store_of(client).list_runs() == [] and store_of(client).outbox_backlog() == 0


def test_unknown_arguments_get_a_usage_reply_once(client):
    headers, body = as_alice("gitea_pr_comment_created", comment__body="!testme please")
    assert post(client, headers, body).json["result"] == "replied"
    assert post(client, headers, body).json["result"] == "ignored"  # redelivered: no second reply
    comments = [i for i in store_of(client).pending_outbox() if i.kind == "comment"]
    assert len(comments) == 1 and "!testme cancel" in comments[0].payload["body"]
    assert store_of(client).list_runs() == []


def test_run_artifacts_are_served_and_paths_cannot_escape(client, tmp_path):
    from ccci.harness.runfiles import RunFiles

    store = store_of(client)
    _, run = store.claim_comment(owner="o", repo="hello", comment_id=9, action="test",
                                 run={"pr": 1, "recipe": "hello", "requester": "alice"})  # fmt: skip
    files = RunFiles(tmp_path / "state" / "runs", run.id)
    (files.artifacts / "shots").mkdir(parents=True)
    (files.artifacts / "shots" / "home.png").write_bytes(b"\x89PNG fake")
    (files.dir / "report.json").write_text('{"secret": "not an artifact"}')
    with client.get(f"/runs/{run.id}/artifacts/shots/home.png") as served:  # closes the file it streams
        assert served.data == b"\x89PNG fake"
    assert client.get(f"/runs/{run.id}/artifacts/../report.json").status_code == 404
    assert client.get(f"/runs/{run.id}/artifacts/%2e%2e/report.json").status_code == 404
    assert client.get(f"/runs/{run.id + 1}/artifacts/shots/home.png").status_code == 404


def test_admin_runs_flags_a_lock_held_too_long_and_leaves_it_held(app_factory, tmp_path):
    import fcntl
    import os
    import time
    from dataclasses import asdict

    from ccci.harness.applock import LockHolder, lock_path
    from ccci.pids import process_start_time

    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    client = app_factory(ADMIN_TOKEN="admin-token-0123456789", LOCK_DIR=lock_dir, LOCK_LEAK_AFTER=3600).test_client()
    path = lock_path(lock_dir, "hello.ci.localhost")
    holder = LockHolder("hello.ci.localhost", "12", "hello", os.getpid(), process_start_time(os.getpid()),
                        time.time() - 2 * 3600)  # fmt: skip
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by a live process (this one) for two hours
        os.write(fd, json.dumps(asdict(holder)).encode())
        answer = client.get("/admin/runs", headers={"Authorization": "Bearer admin-token-0123456789"})
        [lock] = answer.json["locks"]
        assert lock["held"] and lock["possible_leak"] and lock["holder"]["run_id"] == "12"
        assert lock["reason"]
        assert path.exists()  # flagged, never stolen
    finally:
        os.close(fd)


def decisions(caplog) -> list:
    """Return the webhook decision records logged so far."""
    return [r for r in caplog.records if r.name == "ccci.web.hooks" and r.getMessage() == "webhook"]


def test_every_delivery_leaves_one_line_saying_what_was_decided(client, caplog):
    caplog.set_level("INFO", logger="ccci.web.hooks")
    headers, body = as_alice("gitea_pr_comment_created", comment__body="!testme")
    queued = post(client, headers, body).json["run"]
    post(client, {**headers, "X-Gitea-Signature": "0" * 64, "X-Hub-Signature-256": "sha256=" + "0" * 64}, body)
    post(client, *as_alice("gitea_pr_comment_created", comment__body="just a remark"))
    first, refused, ignored = decisions(caplog)
    assert first.fields["result"] == "queued" and first.fields["status"] == 202 and first.run == queued
    assert first.fields["event"] == "pull_request_comment" and first.fields["delivery"] == headers["X-Gitea-Delivery"]
    assert first.fields["repo"] == json.loads(body)["repository"]["full_name"]
    assert (refused.fields["status"], refused.fields["result"]) == (401, "unauthorized")
    assert refused.fields["reason"] == "bad or missing signature"
    assert ignored.fields["result"] == "ignored" and ignored.fields["reason"]


def test_a_body_over_the_limit_is_logged_too(app_factory, caplog):
    caplog.set_level("INFO", logger="ccci.web.hooks")
    client = app_factory(MAX_BODY=2048).test_client()
    client.post("/hooks/forge", data=b"x" * 4096, headers={"X-Gitea-Delivery": "d-1"})
    [line] = decisions(caplog)
    assert line.fields["status"] == 413 and line.fields["result"] == "too_large" and line.fields["delivery"] == "d-1"


def test_a_delivery_is_answered_even_when_counting_it_fails(client, monkeypatch, caplog):
    import sqlite3

    def locked(*_args, **_kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store_of(client), "count", locked)
    headers, body = as_alice("gitea_pr_comment_created", comment__body="!testme")
    assert post(client, headers, body).status_code == 202
    assert "counting a webhook delivery (queued) failed" in caplog.text
