"""Keep the fake honest: the same GiteaClient calls against FakeGitea and the real Gitea agree.

One script of ``ccci.forge.GiteaClient`` calls — everything ccci does to a forge, plus the
refusals it must understand — runs against both, on the same names. The transcripts (each
call's HTTP statuses and the fields ccci reads from the answers, with ids, shas and the base
URL replaced by placeholders) must be equal. A webhook payload is compared too: the one Gitea
really sends for a comment, and the one the fake makes up for the same comment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ccci.errors import ForgeError
from ccci.forge import GiteaClient
from ccci.intake.event import CommentEvent, parse_event
from tests.fakes import sign
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import make_recipe_repo
from tests.realgitea.admin import PASSWORD, Checkout
from tests.realgitea.proxy import Proxy

REPO = "hello"
MISSING = 999


@dataclass
class Side:
    """One forge under test, and the names and objects the script needs on it."""

    name: str
    url: str
    token: str
    org: str
    hidden_org: str  # an organisation ccci's account is not in
    member: str
    outsider: str  # a user in no organisation
    pr: int
    sha: str
    human_comment: int
    second_comment: Callable[[], int]  # a person comments again; returns the id


def _script(side: Side) -> list[tuple[str, Any]]:
    """Run every kind of call ccci makes; return (step, outcome) pairs, normalized."""
    ids: dict[int, str] = {}

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(side.url, "{url}").replace(side.sha, "{sha}")
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return ids.setdefault(value, f"#{len(ids) + 1}")
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        return value

    statuses: list[int] = []
    client = GiteaClient(side.url, side.token, timeout=10, retries=0)
    client.session.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    steps: list[tuple[str, Any]] = []

    def step(name: str, call: Callable[[], Any], read: Callable[[Any], Any] = lambda r: r) -> None:
        statuses.clear()
        try:
            outcome = ("ok", norm(read(call())))
        except ForgeError as exc:
            # The message after "HTTP <status>" is Gitea's own, which ccci puts in its logs.
            outcome = ("ForgeError", exc.status, exc.transient, str(exc).partition(f"HTTP {exc.status}")[2])
        steps.append((name, {"http": list(statuses), "outcome": outcome}))

    def comments() -> list[dict[str, Any]]:
        return [{"id": c["id"], "body": c["body"], "login": c["user"]["login"]} for c in client.list_comments(
            side.org, REPO, side.pr
        )]  # fmt: skip

    with client:
        step("get_pull", lambda: client.get_pull(side.org, REPO, side.pr), lambda p: p.__dict__)
        step("get_pull missing", lambda: client.get_pull(side.org, REPO, MISSING))
        step("member", lambda: client.is_org_member(side.org, side.member))
        step("not a member", lambda: client.is_org_member(side.org, side.outsider))
        step("unknown user", lambda: client.is_org_member(side.org, "nobody-at-all"))
        step("org ccci is not in", lambda: client.is_org_member(side.hidden_org, side.member))
        step("unknown org", lambda: client.is_org_member("no-such-org", side.member))
        step("list comments", comments)
        created = client.create_comment(side.org, REPO, side.pr, "queued <!-- ccci:run=1 -->")
        steps.append(("create_comment", norm(created)))
        step("edit own comment", lambda: client.edit_comment(side.org, REPO, created, "passed <!-- ccci:run=1 -->"))
        step("edit someone else's", lambda: client.edit_comment(side.org, REPO, side.human_comment, "hijacked"))
        step("edit missing comment", lambda: client.edit_comment(side.org, REPO, 987654, "nothing"))
        side.second_comment()
        step("list after", comments)
        step("create on missing PR", lambda: client.create_comment(side.org, REPO, MISSING, "hello"))
        step("list missing PR", lambda: client.list_comments(side.org, REPO, MISSING))
        for content in ("eyes", "eyes", "confused", "eyeballs"):
            step(f"react {content}", lambda c=content: client.add_reaction(side.org, REPO, side.human_comment, c))
        step("react on missing comment", lambda: client.add_reaction(side.org, REPO, 987654, "eyes"))
        for state in ("pending", "success"):
            step(
                f"status {state}",
                lambda s=state: client.set_status(
                    side.org, REPO, side.sha, state=s, description=f"run 1 {s}", target_url="http://ci/runs/1",
                    context="ccci/testme",
                ),
            )  # fmt: skip
        fields = ("status", "description", "target_url", "context")
        step(
            "latest status",
            lambda: client.latest_status(side.org, REPO, side.sha, "ccci/testme"),
            lambda s: {k: s.get(k) for k in fields} if s else s,
        )
        step("latest status of another context", lambda: client.latest_status(side.org, REPO, side.sha, "other"))
    with GiteaClient(side.url, "0" * 40, timeout=10, retries=0) as stranger:
        stranger.session.hooks["response"].append(lambda response, *a, **k: statuses.append(response.status_code))
        step("wrong token", lambda: stranger.get_pull(side.org, REPO, side.pr))
    return steps


@pytest.fixture
def sides(real_gitea, tmp_path):
    """The same world twice: on the real Gitea, and on a FakeGitea with the same names."""
    admin, bot = real_gitea.admin, real_gitea.instance.bot_user
    org, hidden, member = real_gitea.unique("contract"), real_gitea.unique("elsewhere"), real_gitea.unique("alice")
    outsider = real_gitea.unique("mallory")
    admin.create_user(member)
    admin.create_user(outsider)
    admin.create_org(org, members={"maintainers": [member], "ci": [bot]})
    admin.create_org(hidden, members={"maintainers": [member]})
    admin.create_repo(org, REPO)
    checkout = Checkout.create(admin, org, REPO, tmp_path / "real", user=member, password=PASSWORD)
    real_sha = checkout.push_branch("feature", {"compose.yml": "services: {}\n"})
    real_pr = admin.create_pull(org, REPO, head="feature", as_user=member)
    real_comment = admin.comment(org, REPO, real_pr, "!testme", as_user=member)["id"]

    with FakeGitea(token="f" * 40, git_root=tmp_path / "git", bot_login=bot) as fake:
        (tmp_path / "git").mkdir(exist_ok=True)
        repo = make_recipe_repo(tmp_path / "git", owner=org, name=REPO)
        fake_sha = repo.open_pr(real_pr, {"compose.yml": "services: {}\n"}, head_ref="feature")
        fake.open_pr(org, REPO, real_pr, fake_sha, head_ref="feature", user=member)
        fake.add_member(org, member)
        fake.add_member(hidden, member)
        fake.hide_members(hidden)
        fake_comment = fake.post_comment(org, REPO, real_pr, "!testme", user=member).id
        yield (
            Side(
                "real", real_gitea.url, real_gitea.instance.bot_token, org, hidden, member, outsider, real_pr, real_sha,
                real_comment, lambda: admin.comment(org, REPO, real_pr, "one more", as_user=member)["id"],
            ),
            Side(
                "fake", fake.url, fake.token, org, hidden, member, outsider, real_pr, fake_sha, fake_comment,
                lambda: fake.post_comment(org, REPO, real_pr, "one more", user=member).id,
            ),
        )  # fmt: skip


def test_the_fake_answers_giteaclient_as_gitea_does(sides):
    real, fake = sides
    real_steps, fake_steps = _script(real), _script(fake)
    differences = [(r[0], r[1], f[1]) for r, f in zip(real_steps, fake_steps, strict=True) if r != f]
    assert not differences, "\n".join(f"{name}:\n  real {r}\n  fake {f}" for name, r, f in differences)


class _Receiver(Proxy):
    """Takes webhook deliveries and answers 200 itself: a Proxy whose upstream is never asked."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", name="receiver")
        self.headers: list[dict[str, str]] = []

    def _relay(self, method, target, headers, body):
        with self._cond:
            self.headers.append(headers)
        return 200, [], b"{}"


def test_the_fakes_webhook_payload_parses_like_gitea_s(real_gitea, tmp_path):
    admin, org, member = real_gitea.admin, real_gitea.unique("payload"), real_gitea.unique("alice")
    admin.create_user(member)
    admin.create_org(org, members={"maintainers": [member]})
    admin.create_repo(org, REPO)
    Checkout.create(admin, org, REPO, tmp_path / "real", user=member, password=PASSWORD).push_branch("f", {"a": "1"})
    pr = admin.create_pull(org, REPO, head="f", as_user=member)
    with _Receiver() as receiver:
        admin.create_org_hook(org, f"{receiver.url}/hooks/forge", "contract-secret")
        comment = admin.comment(org, REPO, pr, "Looks good.\n\n!testme", as_user=member)
        [delivery] = receiver.wait_for(lambda r: r.exchanges("POST"), timeout=30)
        [headers] = receiver.headers
    real_payload = json.loads(delivery.request_body)
    assert headers["X-Gitea-Signature"] == sign(delivery.request_body, "contract-secret")["X-Gitea-Signature"]
    fake_headers = sign(delivery.request_body, "contract-secret")
    assert {k for k in fake_headers if k.startswith("X-")} <= set(headers), "the fake sends headers Gitea does not"
    assert {k: headers[k] for k in ("X-Gitea-Event", "X-Gitea-Event-Type")} == {
        "X-Gitea-Event": fake_headers["X-Gitea-Event"],
        "X-Gitea-Event-Type": fake_headers["X-Gitea-Event-Type"],
    }

    with FakeGitea(bot_login=real_gitea.instance.bot_user) as fake:
        fake.open_pr(org, REPO, pr, "a" * 40, user=member)
        fake_comment = fake.post_comment(org, REPO, pr, comment["body"], user=member)
        fake_payload = fake.comment_payload(fake_comment.id)
        fake_url = fake.url
    real_event = parse_event(headers, real_payload, bot_login=real_gitea.instance.bot_user)
    fake_event = parse_event(fake_headers, fake_payload, bot_login=real_gitea.instance.bot_user)
    assert isinstance(real_event, CommentEvent) and isinstance(fake_event, CommentEvent)
    same = {"delivery": "", "comment_id": 0}
    real_fields = {**real_event.__dict__, **same}
    fake_fields = {**fake_event.__dict__, **same}
    fake_fields = {k: v.replace(fake_url, real_gitea.url) if isinstance(v, str) else v for k, v in fake_fields.items()}
    assert real_fields == fake_fields
    assert _shape(fake_payload, real_payload) == [], "the fake's payload differs from Gitea's in shape"


def _shape(fake: Any, real: Any, path: str = "") -> list[str]:
    """Return where ``fake`` has a key Gitea does not send, or a value of another JSON type."""
    if isinstance(fake, dict) and isinstance(real, dict):
        problems = []
        for key, value in fake.items():
            if key not in real:
                problems.append(f"{path}.{key}: Gitea does not send it")
            else:
                problems += _shape(value, real[key], f"{path}.{key}")
        return problems
    if fake is None or real is None or type(fake) is type(real):
        return []
    return [f"{path}: fake {type(fake).__name__}, Gitea {type(real).__name__}"]
