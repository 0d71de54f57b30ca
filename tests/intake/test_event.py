"""Event parsing over every payload sample and header variant."""

import json

import pytest
from werkzeug.datastructures import EnvironHeaders

from ccci.intake.event import CommentEvent, Ignored, MalformedEvent, parse_event
from tests.fakes import DELETE, load_payload, sign

GITEA = sign(b"{}", "k")
FORGEJO = sign(b"{}", "k", forge="forgejo")
BOT = "ccci-bot"


def parse(name, headers=GITEA, **overrides):
    return parse_event(headers, load_payload(name, **overrides), bot_login=BOT)


def test_gitea_pr_comment_created():
    event = parse("gitea_pr_comment_created")
    assert event == CommentEvent(
        delivery=GITEA["X-Gitea-Delivery"],
        owner="coop-cloud",
        repo="custom-html",
        full_name="coop-cloud/custom-html",
        pr=7,
        comment_id=98231,
        body="Looks good to me, let's see it deploy.\r\n\r\n!testme",
        author="alice",
        clone_url="https://git.coopcloud.tech/coop-cloud/custom-html.git",
        pr_url="https://git.coopcloud.tech/coop-cloud/custom-html/pulls/7",
        forge="gitea",
    )


def test_forgejo_pr_comment_created():
    event = parse("forgejo_pr_comment_created", FORGEJO)
    assert isinstance(event, CommentEvent)
    assert (event.forge, event.comment_id, event.body) == ("forgejo", 5521, "!testme")
    assert event.delivery == FORGEJO["X-Forgejo-Delivery"]


def test_forgejo_headers_alone():
    headers = {"X-Forgejo-Event": "issue_comment", "X-Forgejo-Delivery": "d-1"}
    event = parse("forgejo_pr_comment_created", headers)
    assert (event.forge, event.delivery) == ("forgejo", "d-1")


def test_gogs_event_header_alone_and_no_delivery():
    event = parse("gitea_pr_comment_created", {"X-Gogs-Event": "issue_comment"})
    assert (event.forge, event.delivery) == ("gitea", "")


def test_old_gitea_without_is_pull_falls_back_to_issue_pull_request():
    payload = load_payload("gitea_old_no_is_pull")
    assert "is_pull" not in payload
    event = parse_event(GITEA, payload)
    assert isinstance(event, CommentEvent) and event.comment_id == 4410


def test_old_gitea_without_is_pull_on_a_plain_issue():
    assert parse("gitea_old_no_is_pull", issue__pull_request=None) == Ignored("not a pull request comment")


def test_headers_are_case_insensitive():
    lower = {k.lower(): v for k, v in GITEA.items()}
    assert isinstance(parse("gitea_pr_comment_created", lower), CommentEvent)
    environ = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in FORGEJO.items()}
    event = parse("gitea_pr_comment_created", EnvironHeaders(environ))
    assert event.forge == "forgejo"


IGNORED = [
    ("edited", "gitea_pr_comment_edited", GITEA, {}, "action edited is ignored"),
    ("deleted", "gitea_pr_comment_created", GITEA, {"action": "deleted"}, "action deleted is ignored"),
    ("plain issue", "gitea_issue_comment_not_pr", GITEA, {}, "not a pull request comment"),
    ("closed pr", "gitea_pr_closed_comment", GITEA, {}, "pull request is closed"),
    ("push", "gitea_push", sign(b"{}", "k", event="push"), {}, "event push is ignored"),
    (
        "review comment event",
        "gitea_pr_comment_created",
        sign(b"{}", "k", event="pull_request_comment"),
        {},
        "event pull_request_comment is ignored",
    ),
    ("no event header", "gitea_pr_comment_created", {"Content-Type": "application/json"}, {}, None),
    ("bot's own login", "gitea_pr_comment_created", GITEA, {"comment__user__login": BOT}, None),
    ("bot's login other case", "gitea_pr_comment_created", GITEA, {"comment__user__login": "CCCI-Bot"}, None),
    (
        "hidden run marker",
        "gitea_pr_comment_created",
        GITEA,
        {"comment__body": "<!-- ccci:run=12 -->\n!testme"},
        "comment by ccci itself",
    ),
    ("no trigger", "gitea_pr_comment_created", GITEA, {"comment__body": "LGTM"}, "no !testme in the comment"),
]


@pytest.mark.parametrize(
    ("name", "headers", "overrides", "reason"), [r[1:] for r in IGNORED], ids=[r[0] for r in IGNORED]
)
def test_ignored(name, headers, overrides, reason):
    result = parse(name, headers, **overrides)
    assert isinstance(result, Ignored)
    if reason:
        assert result.reason == reason
    assert result.reason


def test_own_comment_reason():
    assert parse("gitea_pr_comment_created", comment__user__login=BOT) == Ignored("comment by ccci itself")


def test_no_bot_login_configured_still_skips_marked_comments():
    payload = load_payload("gitea_pr_comment_created", comment__body="<!-- ccci:run=1 --> !testme")
    assert parse_event(GITEA, payload) == Ignored("comment by ccci itself")
    assert isinstance(parse_event(GITEA, load_payload("gitea_pr_comment_created")), CommentEvent)


def test_trigger_prefilter_is_case_insensitive_and_configurable():
    assert isinstance(parse("gitea_pr_comment_created", comment__body="!TESTME"), CommentEvent)
    payload = load_payload("gitea_pr_comment_created", comment__body="!ci")
    assert isinstance(parse_event(GITEA, payload, trigger="!ci"), CommentEvent)
    assert parse_event(GITEA, payload) == Ignored("no !testme in the comment")


def test_long_event_name_is_cut_in_the_reason():
    result = parse("gitea_push", {"X-Gitea-Event": "x" * 500})
    assert len(result.reason) < 80


MALFORMED = [
    ("no action", {"action": DELETE}),
    ("action not a string", {"action": 1}),
    ("no issue", {"issue": DELETE}),
    ("issue is a list", {"issue": []}),
    ("no issue number", {"issue__number": DELETE}),
    ("issue number a string", {"issue__number": "7"}),
    ("issue number a bool", {"issue__number": True}),
    ("issue number zero", {"issue__number": 0}),
    ("no issue state", {"issue__state": DELETE}),
    ("no comment", {"comment": None}),
    ("no comment id", {"comment__id": DELETE}),
    ("comment id negative", {"comment__id": -3}),
    ("comment id float", {"comment__id": 3.0}),
    ("no comment body", {"comment__body": DELETE}),
    ("comment body null", {"comment__body": None}),
    ("no comment user", {"comment__user": DELETE}),
    ("comment user login a number", {"comment__user__login": 41}),
    ("login with a space", {"comment__user__login": "al ice"}),
    ("no repository", {"repository": DELETE}),
    ("no owner", {"repository__owner": DELETE}),
    ("owner is a string", {"repository__owner": "coop-cloud"}),
    ("repo name missing", {"repository__name": DELETE}),
    ("repo name with slash", {"repository__name": "a/b", "repository__full_name": "coop-cloud/a/b"}),
    ("repo name dot-dot", {"repository__name": "..", "repository__full_name": "coop-cloud/.."}),
    ("repo name option-like", {"repository__name": "-x", "repository__full_name": "coop-cloud/-x"}),
    ("owner with url chars", {"repository__owner__login": "a?b", "repository__full_name": "a?b/custom-html"}),
    ("full name mismatch", {"repository__full_name": "other/custom-html"}),
    ("clone url ext transport", {"repository__clone_url": "ext::sh -c touch% /tmp/pwned"}),
    ("clone url file", {"repository__clone_url": "file:///etc"}),
    ("clone url missing", {"repository__clone_url": DELETE}),
    ("is_pull a string", {"is_pull": "true"}),
    ("pull_request a string", {"issue__pull_request": "yes"}),
]


@pytest.mark.parametrize("overrides", [r[1] for r in MALFORMED], ids=[r[0] for r in MALFORMED])
def test_malformed(overrides):
    with pytest.raises(MalformedEvent):
        parse("gitea_pr_comment_created", **overrides)


@pytest.mark.parametrize("payload", [[], "x", None, 3])
def test_payload_not_an_object(payload):
    with pytest.raises(MalformedEvent):
        parse_event(GITEA, payload)


def test_malformed_even_when_it_would_be_ignored():
    with pytest.raises(MalformedEvent):
        parse("gitea_pr_comment_edited", comment__id="x")


def test_other_events_are_not_validated():
    assert parse_event(sign(b"{}", "k", event="push"), []) == Ignored("event push is ignored")


def test_malformed_is_a_value_error():
    assert issubclass(MalformedEvent, ValueError)


@pytest.mark.parametrize(
    "name",
    [
        "gitea_pr_comment_created",
        "forgejo_pr_comment_created",
        "gitea_old_no_is_pull",
        "gitea_pr_comment_edited",
        "gitea_issue_comment_not_pr",
        "gitea_pr_closed_comment",
    ],
)
def test_every_comment_sample_survives_a_json_round_trip(name):
    payload = json.loads(json.dumps(load_payload(name)))
    assert isinstance(parse_event(GITEA, payload, bot_login=BOT), (CommentEvent, Ignored))


def test_event_is_frozen():
    event = parse("gitea_pr_comment_created")
    with pytest.raises(AttributeError):
        event.pr = 8
