"""Who may trigger runs, decided by Gitea's real organisation members API; and a PR from a fork."""

from __future__ import annotations

from tests.e2e_gitea.conftest import REPO
from tests.realgitea.admin import PASSWORD, Checkout


def test_a_member_is_admitted_and_an_outsider_refused_with_one_explanation(gitea_world):
    world = gitea_world()  # ALLOWED_ORGS is the world's organisation; ALLOWED_USERS is empty
    world.release()
    pr, _ = world.open_pr("membership")

    first = world.comment(pr, "!testme", as_user=world.outsider)
    refusal = world.bot_comment_with(pr, "only maintainers")
    assert f"@{world.outsider}" in refusal["body"]
    world.until(lambda: (world.bot, "confused") in world.admin.reactions(world.org, REPO, first), "confused")
    again = world.comment(pr, "!testme", as_user=world.outsider)
    world.until(lambda: (world.bot, "confused") in world.admin.reactions(world.org, REPO, again), "confused again")

    run = world.run_of(world.comment(pr, "!testme"))
    world.bot_comment_saying(pr, "passed")
    world.settled()
    bodies = [c["body"] for c in world.bot_comments(pr)]
    assert sum("only maintainers" in b for b in bodies) == 1, bodies  # one explanation, however often asked
    assert len(bodies) == 2 and f"ccci:run={run}" in bodies[1]

    members = {
        c.path.rsplit("/", 1)[-1]: c.status
        for c in world.forge_proxy.exchanges("GET", rf"^/api/v1/orgs/{world.org}/members/")
    }
    assert members == {world.outsider: 404, world.member: 204}
    states = {r["requester"]: r["state"] for r in world.runs() if r["state"] != "refused"}
    assert states == {world.member: "passed"}


def test_a_pr_from_a_fork_tests_the_fork_head(gitea_world):
    world = gitea_world()
    world.release()
    world.admin.fork(world.org, REPO, as_user=world.forker)
    fork = Checkout.create(world.admin, world.forker, REPO, world.tmp / "fork", user=world.forker, password=PASSWORD)
    sha = fork.push_branch("from-a-fork", {"fork.txt": "a change from outside\n"})
    pr = world.admin.create_pull(world.org, REPO, head=f"{world.forker}:from-a-fork", as_user=world.forker)
    pull = world.admin.pull(world.org, REPO, pr)
    assert pull["head"]["repo"]["full_name"] == f"{world.forker}/{REPO}"
    assert pull["base"]["repo"]["full_name"] == f"{world.org}/{REPO}"
    assert pull["head"]["sha"] == sha

    run = world.run_of(world.comment(pr, "!testme"))
    final = world.bot_comment_saying(pr, "passed")
    assert f"at [`{sha[:10]}`]" in final["body"]
    report = world.run_json(run)["report"]
    assert report["sha"] == sha
    checkout = next(s for s in report["steps"] if s["name"] == "checkout")
    assert f"HEAD is {sha}" in checkout["stdout"]
    world.status_becomes(sha, "success")
