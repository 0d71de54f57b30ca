"""GiteaClient against FakeGitea over real HTTP, and the fake forge's own promises (git included)."""

import socket
import subprocess
import threading

import pytest
import requests

from ccci.errors import ForgeError
from ccci.forge import Forge, GiteaClient, PullRequest, repo_web_url
from ccci.intake.event import CommentEvent, parse_event
from tests.fakes import sign
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import git, make_recipe_repo

TOKEN = "tok-7f3a9c-SECRET"
OWNER, REPO = "coop-cloud", "custom-html"
SHA = "a" * 40


@pytest.fixture
def gitea(tmp_path):
    root = tmp_path / "git"
    root.mkdir()
    with FakeGitea(token=TOKEN, git_root=root) as fake:
        yield fake


@pytest.fixture
def client(gitea):
    with GiteaClient(gitea.url, TOKEN, timeout=5, backoff=0.01) as c:
        yield c


def test_client_satisfies_the_protocol(client):
    forge: Forge = client
    assert callable(forge.get_pull)
    assert TOKEN not in repr(client)


def test_get_pull(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA, head_ref="bump-nginx")
    assert client.get_pull(OWNER, REPO, 7) == PullRequest(
        number=7,
        state="open",
        merged=False,
        head_sha=SHA,
        head_ref="bump-nginx",
        base_clone_url=f"{gitea.url}/{OWNER}/{REPO}.git",
        html_url=f"{gitea.url}/{OWNER}/{REPO}/pulls/7",
    )
    gitea.close_pr(OWNER, REPO, 7, merged=True)
    pull = client.get_pull(OWNER, REPO, 7)
    assert (pull.state, pull.merged) == ("closed", True)


def test_get_pull_missing_is_a_permanent_error(client):
    with pytest.raises(ForgeError) as info:
        client.get_pull(OWNER, REPO, 99)
    assert (info.value.status, info.value.transient) == (404, False)


def test_names_are_quoted_into_one_path_segment(gitea, client):
    with pytest.raises(ForgeError):
        client.get_pull("a/b", "c?d", 1)
    assert gitea.calls[-1].path == "/api/v1/repos/a%2Fb/c%3Fd/pulls/1"


def test_org_membership(gitea, client):
    gitea.add_member("coop-cloud", "Alice")
    assert client.is_org_member("coop-cloud", "alice") is True
    assert client.is_org_member("coop-cloud", "mallory") is False
    assert client.is_org_member("elsewhere", "alice") is False


def test_redirect_is_not_membership(gitea, client):
    gitea.add_member("coop-cloud", "alice")
    gitea.hide_members("coop-cloud")
    # Following the redirect would reach public_members, which says 204 here.
    assert (
        requests.get(
            f"{gitea.url}/api/v1/orgs/coop-cloud/members/alice", headers={"Authorization": f"token {TOKEN}"}
        ).status_code
        == 204
    )
    assert client.is_org_member("coop-cloud", "alice") is False
    assert gitea.calls[-1].path == "/api/v1/orgs/coop-cloud/members/alice"
    assert gitea.calls[-1].status == 303


def test_membership_check_when_down_raises_transient(gitea, client):
    gitea.add_member("coop-cloud", "alice")
    gitea.set_down(True)
    with pytest.raises(ForgeError) as info:
        client.is_org_member("coop-cloud", "alice")
    assert (info.value.status, info.value.transient) == (503, True)


def test_bad_token_raises_without_leaking_it(gitea):
    wrong = "tok-WRONG-do-not-print"
    with GiteaClient(gitea.url, wrong, backoff=0.01) as c, pytest.raises(ForgeError) as info:
        c.is_org_member("coop-cloud", "alice")
    assert (info.value.status, info.value.transient) == (401, False)
    assert wrong not in str(info.value) and wrong not in repr(info.value.args)


def test_comments_create_edit_list(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    human = gitea.post_comment(OWNER, REPO, 7, "!testme", user="alice")
    cid = client.create_comment(OWNER, REPO, 7, "queued <!-- ccci:run=1 -->")
    assert cid != human.id
    client.edit_comment(OWNER, REPO, cid, "running <!-- ccci:run=1 -->")
    client.edit_comment(OWNER, REPO, cid, "passed <!-- ccci:run=1 -->")
    comment = gitea.comments[cid]
    assert (comment.user, comment.body) == ("ccci", "passed <!-- ccci:run=1 -->")
    assert comment.history == ["queued <!-- ccci:run=1 -->", "running <!-- ccci:run=1 -->"]
    listed = client.list_comments(OWNER, REPO, 7)
    assert [(c["id"], c["body"]) for c in listed] == [(human.id, "!testme"), (cid, "passed <!-- ccci:run=1 -->")]
    assert listed[1]["user"]["login"] == "ccci"


def test_list_comments_is_one_request_for_every_comment(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    ids = [gitea.post_comment(OWNER, REPO, 7, f"comment {i}").id for i in range(120)]
    assert [c["id"] for c in client.list_comments(OWNER, REPO, 7)] == ids
    [call] = gitea.api_calls("GET", r"/comments$")
    assert call.query == {}


def test_fake_comment_list_has_no_paging_only_since_and_before(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    old, new = gitea.post_comment(OWNER, REPO, 7, "old"), gitea.post_comment(OWNER, REPO, 7, "new")
    old.created = old.updated = 1_700_000_000
    url = f"{gitea.url}/api/v1/repos/{OWNER}/{REPO}/issues/7/comments"
    auth = {"Authorization": f"token {TOKEN}"}

    def ids(**params):
        answer = requests.get(url, params=params, headers=auth, timeout=5)
        assert answer.status_code == 200, answer.text
        return [c["id"] for c in answer.json()]

    assert ids() == ids(page=2, limit=1) == [old.id, new.id]  # like Gitea: paging is ignored
    assert ids(since="2023-11-14T22:13:21Z") == [new.id]  # one second after the old comment
    assert ids(before="2023-11-14T22:13:20Z") == [old.id]
    assert requests.get(url, params={"since": "yesterday"}, headers=auth, timeout=5).status_code == 422


def test_comment_on_missing_pr_and_editing_missing_comment(client):
    with pytest.raises(ForgeError) as info:
        client.create_comment(OWNER, REPO, 404, "hello")
    assert (info.value.status, info.value.transient) == (500, True)  # as Gitea answers a missing issue
    with pytest.raises(ForgeError) as info:
        client.edit_comment(OWNER, REPO, 123456, "hello")
    assert info.value.status == 404


def test_reactions_new_and_existing_are_both_fine(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    human = gitea.post_comment(OWNER, REPO, 7, "!testme")
    client.add_reaction(OWNER, REPO, human.id, "eyes")
    client.add_reaction(OWNER, REPO, human.id, "eyes")
    client.add_reaction(OWNER, REPO, human.id, "confused")
    assert gitea.reactions[human.id] == [("ccci", "eyes"), ("ccci", "confused")]
    assert [c.status for c in gitea.api_calls("POST", r"/reactions$")] == [201, 200, 201]


def test_reaction_outside_the_allowlist_is_refused(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    human = gitea.post_comment(OWNER, REPO, 7, "!testme")
    with pytest.raises(ForgeError) as info:
        client.add_reaction(OWNER, REPO, human.id, "eyeballs")
    assert (info.value.status, info.value.transient) == (403, False)


def test_statuses_in_order(gitea, client):
    for state in ("pending", "success"):
        client.set_status(
            OWNER,
            REPO,
            SHA,
            state=state,
            description=f"run 1 {state}",
            target_url="http://ci/runs/1",
            context="ccci/testme",
        )
    assert [(s["state"], s["context"], s["target_url"]) for s in gitea.statuses[SHA]] == [
        ("pending", "ccci/testme", "http://ci/runs/1"),
        ("success", "ccci/testme", "http://ci/runs/1"),
    ]


@pytest.mark.parametrize(("state", "sha"), [("passed", SHA), ("success", "HEAD"), ("success", "a" * 39)])
def test_bad_status_arguments_never_reach_the_forge(gitea, client, state, sha):
    with pytest.raises(ValueError):
        client.set_status(OWNER, REPO, sha, state=state, description="", target_url="", context="ccci/testme")
    assert gitea.calls == []


def test_503_get_is_retried_then_transient(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    gitea.set_down(True)
    with GiteaClient(gitea.url, TOKEN, retries=2, backoff=0.01) as c, pytest.raises(ForgeError) as info:
        c.get_pull(OWNER, REPO, 7)
    assert (info.value.status, info.value.transient) == (503, True)
    assert len(gitea.api_calls("GET")) == 3


def test_503_patch_recovers_within_retries(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    with GiteaClient(gitea.url, TOKEN, retries=3, backoff=0.05) as c:
        cid = c.create_comment(OWNER, REPO, 7, "one")
        gitea.set_down(True)
        # Bring the forge back as soon as the first PATCH has been refused.
        up = threading.Thread(target=lambda: (gitea.wait_for(lambda g: g.api_calls("PATCH")), gitea.set_down(False)))
        up.start()
        c.edit_comment(OWNER, REPO, cid, "two")
        up.join()
    assert gitea.comments[cid].body == "two"
    assert [x.status for x in gitea.api_calls("PATCH")][-1] == 200


def test_post_comment_is_never_blindly_retried(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    gitea.set_down(True)
    with GiteaClient(gitea.url, TOKEN, retries=3, backoff=0.01) as c, pytest.raises(ForgeError) as info:
        c.create_comment(OWNER, REPO, 7, "hello")
    assert info.value.transient
    assert len(gitea.api_calls("POST")) == 1


def test_connection_refused_is_transient_and_token_free():
    with FakeGitea(token=TOKEN) as gone:
        url = gone.url
    with GiteaClient(url, TOKEN, retries=1, backoff=0.01) as c, pytest.raises(ForgeError) as info:
        c.get_pull(TOKEN, REPO, 1)  # the token even in the path must not come back
    assert (info.value.status, info.value.transient) == (None, True)
    assert TOKEN not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_error_text_never_contains_the_token(gitea, client):
    with pytest.raises(ForgeError) as info:
        client.get_pull(TOKEN, REPO, 1)
    assert info.value.status == 404
    assert TOKEN not in str(info.value) and "***" in str(info.value)


def test_a_silent_server_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts into the backlog, never answers
        host, port = listener.getsockname()
        with (
            GiteaClient(f"http://{host}:{port}", TOKEN, timeout=0.3, retries=0) as c,
            pytest.raises(ForgeError) as info,
        ):
            c.get_pull(OWNER, REPO, 1)
    assert info.value.transient and info.value.status is None


# -- the fake itself ---------------------------------------------------------------------------


def test_fake_requires_the_token(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    url = f"{gitea.url}/api/v1/repos/{OWNER}/{REPO}/pulls/7"
    assert requests.get(url).status_code == 401
    assert requests.get(url, headers={"Authorization": "token nope"}).status_code == 401
    assert requests.get(url, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 401
    assert requests.get(url, headers={"Authorization": f"token {TOKEN}"}).status_code == 200
    assert requests.get(f"{gitea.url}/api/v1/nowhere", headers={"Authorization": f"token {TOKEN}"}).status_code == 404


def test_fake_records_calls_with_bodies(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    client.create_comment(OWNER, REPO, 7, "hi")
    call = gitea.calls[-1]
    assert (call.method, call.path, call.json, call.status) == (
        "POST",
        f"/api/v1/repos/{OWNER}/{REPO}/issues/7/comments",
        {"body": "hi"},
        201,
    )
    assert call.time > 0


def test_wait_for_wakes_on_a_call_and_times_out(gitea, client):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    worker = threading.Thread(target=client.create_comment, args=(OWNER, REPO, 7, "from a thread"))
    worker.start()
    comments = gitea.wait_for(lambda g: [c for c in g.comments_on(OWNER, REPO, 7) if c.user == "ccci"], timeout=5)
    worker.join()
    assert comments[0].body == "from a thread"
    with pytest.raises(TimeoutError):
        gitea.wait_for(lambda g: False, timeout=0.05)


def test_comment_payload_parses_as_an_event(gitea):
    gitea.open_pr(OWNER, REPO, 7, SHA)
    human = gitea.post_comment(OWNER, REPO, 7, "!testme", user="alice")
    event = parse_event(sign(b"{}", "k"), gitea.comment_payload(human.id), bot_login=gitea.bot_login)
    assert isinstance(event, CommentEvent)
    assert (event.owner, event.repo, event.pr, event.comment_id, event.author) == (OWNER, REPO, 7, human.id, "alice")
    assert event.clone_url == gitea.clone_url(OWNER, REPO)


def test_git_clone_and_pull_refs_over_http(gitea, tmp_path):
    repo = make_recipe_repo(gitea.git_root, OWNER, REPO)
    head = repo.open_pr(7, {"compose.yml": "services: {}\n"})
    gitea.open_pr(OWNER, REPO, 7, head)
    checkout = tmp_path / "checkout"
    git("clone", "-q", gitea.clone_url(OWNER, REPO), str(checkout))
    assert git("rev-parse", "HEAD", cwd=checkout) == repo.rev("main")
    git("fetch", "-q", "origin", "refs/pull/7/head", cwd=checkout)
    assert git("rev-parse", "FETCH_HEAD", cwd=checkout) == head
    # A push to the PR moves refs/pull/7/head; fetching the new sha by id works too.
    newer = repo.push_pr(7, {"README.md": "changed\n"})
    gitea.move_head(OWNER, REPO, 7, newer)
    git("fetch", "-q", "origin", newer, cwd=checkout)
    git("checkout", "-q", newer, cwd=checkout)
    assert (checkout / "README.md").read_text() == "changed\n"
    assert gitea.calls and any(c.path.endswith("/git-upload-pack") for c in gitea.calls)


def test_fake_pull_ref_follows_move_head(gitea):
    repo = make_recipe_repo(gitea.git_root, OWNER, REPO)
    first = repo.open_pr(3, {"a": "1"})
    second = repo.push_pr(3, {"a": "2"})
    gitea.open_pr(OWNER, REPO, 3, first)
    assert repo.rev("refs/pull/3/head") == first
    gitea.move_head(OWNER, REPO, 3, second)
    assert repo.rev("refs/pull/3/head") == second
    with pytest.raises(RuntimeError):
        gitea.move_head(OWNER, REPO, 3, "b" * 40)  # a sha the repository does not have


def test_unknown_git_repo_is_404(gitea):
    result = subprocess.run(
        ["git", "ls-remote", gitea.clone_url("nobody", "nothing")],
        capture_output=True,
        env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0


@pytest.mark.parametrize(
    "clone_url, page",
    [
        ("https://git.coopcloud.tech/coop-cloud/hello.git", "https://git.coopcloud.tech/coop-cloud/hello"),
        ("http://127.0.0.1:3000/o/r.git", "http://127.0.0.1:3000/o/r"),
        ("https://user:secret@git.example/o/r.git", "https://git.example/o/r"),  # never a credential
        ("git@git.example:o/r.git", ""),
        ("", ""),
    ],
)
def test_the_repository_page_comes_from_its_clone_url(clone_url, page):
    assert repo_web_url(clone_url) == page


def test_failed_requests_are_told_to_on_error_by_kind():
    kinds: list[str] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket is closed
    client = GiteaClient(f"http://127.0.0.1:{closed}", "tok", retries=0, on_error=kinds.append)
    with pytest.raises(ForgeError):
        client.get_pull("o", "r", 1)
    with FakeGitea() as gitea:
        client = GiteaClient(gitea.url, gitea.token, retries=0, on_error=kinds.append)
        with pytest.raises(ForgeError):
            client.get_pull("o", "r", 404)  # no such pull request
    assert kinds == ["unreachable", "client_error"]


def test_a_failing_counter_never_replaces_the_forge_error(caplog):
    def broken(_kind):
        raise RuntimeError("the store is locked")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ForgeError):
        GiteaClient(f"http://127.0.0.1:{closed}", "tok", retries=0, on_error=broken).get_pull("o", "r", 1)
    assert "counting a forge error (unreachable) failed" in caplog.text
