"""Fuzzing ``POST /hooks/forge`` through the real app and store: signed random and mutated deliveries.

Whatever arrives, correctly signed, the answer is never a 5xx, and a run exists only where the
answer said ``queued`` with its id.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccci.config import load_settings
from ccci.web import create_app
from tests.fakes import load_payload, sign

SECRET = "fuzz-secret-0123456789"
VALID = load_payload("gitea_pr_comment_created", comment__body="!testme", comment__user__login="alice")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["!testme", "!testme cancel", "!testme please", "alice", "open", "created"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def paths(node, prefix=()):
    """Every path to a value in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


ALL_PATHS = [p for p in paths(VALID) if p]


@st.composite
def mutated(draw):
    payload = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = payload
        try:
            for key in path[:-1]:
                node = node[key]
            if draw(st.booleans()):
                node[path[-1]] = draw(json_values)
            else:
                del node[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return json.dumps(payload).encode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    state = tmp_path_factory.mktemp("fuzz")
    app = create_app(load_settings({}, STATE_DIR=state, WEBHOOK_SECRET=SECRET, ALLOWED_USERS=("alice",),
                                   ALLOWED_ORGS=("coop-cloud",)))  # fmt: skip
    return app.test_client()


def deliver(client, body: bytes, event: str = "issue_comment"):
    store = client.application.extensions["ccci"].store
    before = len(store.list_runs(limit=100_000))
    answer = client.post("/hooks/forge", data=body, headers=sign(body, SECRET, event=event))
    after = len(store.list_runs(limit=100_000))
    assert answer.status_code < 500, (answer.status_code, body[:200])
    queued = answer.status_code == 202 and answer.is_json and answer.json.get("result") == "queued"
    assert after - before == (1 if queued else 0), (answer.status_code, answer.get_data()[:200])
    return answer


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=mutated())
def test_mutated_deliveries_never_fail_and_make_no_unexpected_run(client, body):
    deliver(client, body)


@FUZZ
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_bodies_never_fail_and_make_no_run(client, body):
    answer = deliver(client, body)
    assert answer.status_code != 202


@FUZZ
@given(event=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20), body=mutated())
def test_random_event_names_never_fail(client, event, body):
    deliver(client, body, event=event)


def test_deep_nesting_and_huge_numbers_are_400(client):
    for body in (b"[" * 50_000 + b"]" * 50_000, ('{"a": ' + "7" * 5000 + "}").encode()):
        assert deliver(client, body).status_code == 400
    for path, value in ((("comment", "id"), 2**63), (("issue", "number"), 2**64)):
        payload = copy.deepcopy(VALID)
        payload[path[0]][path[1]] = value
        assert deliver(client, json.dumps(payload).encode()).status_code == 400
