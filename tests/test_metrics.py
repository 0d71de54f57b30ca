"""``/metrics``, ``/healthz`` and the admin list through the real Flask app and store."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ccci import __version__
from ccci.config import load_settings
from ccci.store import Store
from ccci.web import create_app
from tests.fakes import delivery

SECRET = "hook-secret-0123456789"
ADMIN = "admin-token-0123456789"


@pytest.fixture
def client(tmp_path):
    settings = load_settings({}, STATE_DIR=tmp_path / "state", WEBHOOK_SECRET=SECRET, ALLOWED_USERS=("alice",),
                             ADMIN_TOKEN=ADMIN, LOCK_DIR=tmp_path / "locks")  # fmt: skip
    return create_app(settings).test_client()


def store_of(client) -> Store:
    return client.application.extensions["ccci"].store


def samples(client) -> dict[tuple[str, tuple], float]:
    """Scrape /metrics and return {(sample name, sorted labels): value}, checking the format parses."""
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.content_type.startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def finished_run(store: Store, comment_id: int, state: str, wait: float, took: float) -> int:
    _, run = store.claim_comment(owner="o", repo="r", comment_id=comment_id, action="test",
                                 run={"pr": comment_id, "recipe": "r", "requester": "alice"})  # fmt: skip
    now = time.time()
    store.update_run(run.id, state=state, created_at=now - wait - took, started_at=now - took, finished_at=now)
    return run.id


def test_metrics_are_read_from_the_store_at_scrape_time(client):
    store = store_of(client)
    finished_run(store, 1, "passed", wait=2, took=40)
    finished_run(store, 2, "failed", wait=100, took=700)
    headers, body = delivery("gitea_pr_comment_created", SECRET, comment__body="!testme",
                             comment__user__login="alice", sender__login="alice")  # fmt: skip
    client.post("/hooks/forge", data=body, headers=headers)
    client.post("/hooks/forge", data=body, headers={})
    store.count("forge_errors", "unreachable", by=2)
    store.beat("worker", at=1234.5)
    m = samples(client)
    [(info, value)] = [(dict(labels), v) for (name, labels), v in m.items() if name == "ccci_build_info"]
    assert value == 1 and info["version"] == __version__ and info["python"].startswith("3.")
    assert m[("ccci_runs_finished_total", (("outcome", "passed"),))] == 1
    assert m[("ccci_runs_finished_total", (("outcome", "timed_out"),))] == 0  # known outcomes start at 0
    assert m[("ccci_runs_active", (("state", "queued"),))] == 1  # the delivery's run
    assert m[("ccci_run_duration_seconds_bucket", (("le", "60"),))] == 1
    assert m[("ccci_run_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert m[("ccci_run_duration_seconds_count", ())] == 2 and m[("ccci_run_duration_seconds_sum", ())] == 740
    assert m[("ccci_run_queue_wait_seconds_bucket", (("le", "5"),))] == 1
    assert m[("ccci_webhook_deliveries_total", (("result", "queued"),))] == 1
    assert m[("ccci_webhook_deliveries_total", (("result", "unauthorized"),))] == 1
    assert m[("ccci_forge_request_errors_total", (("kind", "unreachable"),))] == 2
    assert m[("ccci_forge_request_errors_total", (("kind", "server_error"),))] == 0
    assert m[("ccci_outbox_backlog", ())] == 2  # the acknowledgement: a reaction and the comment
    assert m[("ccci_outbox_retries_total", ())] == 0 and m[("ccci_outbox_oldest_pending_age_seconds", ())] >= 0
    assert m[("ccci_worker_last_pass_timestamp_seconds", ())] == 1234.5


def test_healthz_says_which_check_failed(client):
    store = store_of(client)
    answer = client.get("/healthz")
    assert answer.status_code == 503 and "never completed a pass" in answer.json["checks"]["worker"]
    store.beat("worker")
    answer = client.get("/healthz")
    assert answer.status_code == 200 and answer.json == {"ok": True, "checks": {"store": "ok", "worker": "ok",
                                                                                "outbox": "ok"}}  # fmt: skip
    store.beat("worker", at=time.time() - 600)  # WORKER_STALE_AFTER is 5 minutes
    answer = client.get("/healthz")
    assert answer.status_code == 503 and "not completed a pass for 600 s" in answer.json["checks"]["worker"]
    store.beat("worker")
    store.enqueue("comment", {"body": "x"})
    with store._tx() as db:  # a write the forge has refused for an hour
        db.execute("UPDATE outbox SET created_at = ?", (time.time() - 3600,))
    answer = client.get("/healthz")
    assert answer.status_code == 503 and answer.json["checks"]["worker"] == "ok"
    assert "oldest forge write has waited 3600 s" in answer.json["checks"]["outbox"]


def test_the_admin_list_has_iso_times_and_booleans(client):
    run_id = finished_run(store_of(client), 1, "passed", wait=1, took=2)
    [run] = client.get("/admin/runs", headers={"Authorization": f"Bearer {ADMIN}"}).json["runs"]
    assert run["id"] == run_id
    assert run["authorized"] is False and run["admitted"] is False and run["cancel_requested"] is False
    for key in ("created_at", "started_at", "finished_at"):
        assert run[key].endswith("+00:00") and run[key][10] == "T", run[key]
    finished = datetime.fromisoformat(run["finished_at"]).timestamp()
    assert abs(finished - time.time()) < 60 and datetime.fromisoformat(run["created_at"]).timestamp() < finished
