"""Authorization: allow-listed users, org members via the forge, and fail-closed on doubt."""

import pytest

from ccci.errors import ForgeError
from ccci.intake.policy import Decision, authorize, refusal_text


class Members:
    """An is_org_member callback that records its calls; raises ``error`` when set."""

    def __init__(self, members=(), error=None, answers=None):
        self.members = {(o.lower(), u.lower()) for o, u in members}
        self.error = error
        self.answers = answers or {}
        self.calls = []

    def __call__(self, org, login):
        self.calls.append((org, login))
        if org in self.answers:
            return self.answers[org]
        if self.error:
            raise self.error
        return (org.lower(), login.lower()) in self.members


def test_allowed_user():
    check = Members()
    d = authorize("alice", allowed_users=["alice"], allowed_orgs=["coop-cloud"], is_org_member=check)
    assert d == Decision(True, "alice is in ALLOWED_USERS")
    assert check.calls == []  # no forge round-trip needed


@pytest.mark.parametrize("login", ["Alice", "ALICE", "alice"])
def test_allowed_user_case_insensitive(login):
    assert authorize(login, allowed_users=["aLiCe"], allowed_orgs=[], is_org_member=Members()).allowed


def test_org_member():
    check = Members(members=[("coop-cloud", "bob")])
    d = authorize("bob", allowed_users=["alice"], allowed_orgs=["other", "coop-cloud"], is_org_member=check)
    assert d == Decision(True, "bob is a member of coop-cloud")
    assert check.calls == [("other", "bob"), ("coop-cloud", "bob")]


def test_not_member():
    d = authorize("mallory", allowed_users=["alice"], allowed_orgs=["coop-cloud"], is_org_member=Members())
    assert not d.allowed
    assert "mallory" in d.reason and "coop-cloud" in d.reason


def test_nothing_configured_allows_nobody():
    check = Members(members=[("coop-cloud", "alice")])
    d = authorize("alice", allowed_users=[], allowed_orgs=[], is_org_member=check)
    assert not d.allowed
    assert "no ALLOWED_ORGS" in d.reason
    assert check.calls == []


@pytest.mark.parametrize(
    "error",
    [
        ForgeError("GET /orgs/x/members/y: HTTP 503", status=503, transient=True),
        ConnectionError("down"),
        KeyError("x"),
    ],
)
def test_org_check_raising_is_no(error):
    d = authorize("bob", allowed_users=[], allowed_orgs=["coop-cloud"], is_org_member=Members(error=error))
    assert not d.allowed
    assert "membership check in coop-cloud failed" in d.reason
    assert type(error).__name__ in d.reason


def test_one_org_failing_another_confirming_is_allowed():
    check = Members(members=[("b", "bob")], error=ForgeError("boom", 500, True))
    check.answers = {"b": True}
    d = authorize("bob", allowed_users=[], allowed_orgs=["a", "b"], is_org_member=check)
    assert d.allowed


@pytest.mark.parametrize("answer", [1, "yes", None, object()])
def test_only_a_real_true_counts(answer):
    check = Members(answers={"coop-cloud": answer})
    assert not authorize("bob", allowed_users=[], allowed_orgs=["coop-cloud"], is_org_member=check).allowed


def test_empty_login_is_never_allowed():
    check = Members(answers={"coop-cloud": True})
    assert not authorize("", allowed_users=[""], allowed_orgs=["coop-cloud"], is_org_member=check).allowed


def test_generators_are_accepted():
    check = Members(members=[("o", "bob")])
    assert authorize("bob", allowed_users=iter(()), allowed_orgs=(o for o in ["o"]), is_org_member=check).allowed


def test_refusal_text():
    text = refusal_text("mallory", "!ci")
    assert text.startswith("@mallory")
    assert "`!ci`" in text
    assert len(text) < 300
