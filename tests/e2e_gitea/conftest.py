"""The real-forge world: a real Gitea sending its own webhooks to ``ccci serve`` (gunicorn + worker).

    Gitea (the session's, tests/realgitea) ──webhook──▶ hook gate ──▶ ccci serve
        ▲                                              (sees each delivery and ccci's answer;
        └──────────── forge proxy ◀── ccci's API calls   can hold deliveries)
                      (counts them by kind)

Each test gets its own organisation (a "maintainers" team with the member, a "ci" team with
ccci's bot), people (member, outsider, forker), a ``hello`` recipe repository whose first
commit was pushed over Gitea's git HTTP, an organisation webhook for PR comments with the
secret, and its own ccci. The recipe CI is tiny: it checks the checkout, then holds its "work"
step until the test releases the run, so a test can look at Gitea while a run is mid-step.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from tests.e2e.conftest import ROOT, CcciServer
from tests.realgitea.admin import PASSWORD, Checkout, GiteaAdmin
from tests.realgitea.fixture import RealGitea, real_gitea  # noqa: F401  (the session fixture)
from tests.realgitea.proxy import Exchange, Proxy

T = TypeVar("T")
SECRET = "e2e-gitea-webhook-secret-0123456789"
ADMIN = "e2e-gitea-admin-token-0123456789"
REPO = "hello"
HELD_CI = """\
timeout: 120
steps:
  - name: checkout
    timeout: 20
    run: |
      head=$(git rev-parse HEAD)
      echo "HEAD is $head"
      test "$head" = "$CCCI_SHA"
  - name: work
    needs: [checkout]
    timeout: 90
    run: |
      touch "$MARKS/started-$CCCI_RUN"
      exec python3 -c 'import os, sys, time
      while not any(os.path.exists(p) for p in sys.argv[1:]): time.sleep(0.02)
      ' "$MARKS/release-$CCCI_RUN" "$MARKS/release"
  - name: teardown
    teardown: true
    run: touch "$MARKS/teardown-$CCCI_RUN"
"""


@dataclass
class GiteaWorld:
    """Everything one real-forge test talks to."""

    gitea: RealGitea
    admin: GiteaAdmin
    org: str
    member: str
    outsider: str
    forker: str
    checkout: Checkout
    hook_id: int
    hook_gate: Proxy  # Gitea → ccci
    forge_proxy: Proxy  # ccci → Gitea
    ccci: CcciServer
    marks: Path
    tmp: Path

    @property
    def bot(self) -> str:
        """ccci's login on Gitea."""
        return self.gitea.instance.bot_user

    # -- acting on Gitea ---------------------------------------------------------------------------

    def open_pr(self, branch: str, files: dict[str, str] | None = None) -> tuple[int, str]:
        """Push ``branch`` with a commit and open a PR of it as the member; return (number, head sha)."""
        sha = self.checkout.push_branch(branch, files or {f"{branch}.txt": f"change on {branch}\n"})
        return self.admin.create_pull(self.org, REPO, head=branch, as_user=self.member), sha

    def comment(self, number: int, body: str, *, as_user: str | None = None) -> int:
        """Comment on PR ``number`` (as the member unless told); return the comment id."""
        return self.admin.comment(self.org, REPO, number, body, as_user=as_user or self.member)["id"]

    def release(self, run_id: int | None = None) -> None:
        """Let run ``run_id`` (every run, without one) finish its held step."""
        (self.marks / (f"release-{run_id}" if run_id else "release")).touch()

    # -- what ccci did -----------------------------------------------------------------------------

    def deliveries(self, comment_id: int, action: str = "created", count: int = 1, timeout: float = 30) -> list:
        """Wait until ccci has answered ``count`` of Gitea's deliveries about ``comment_id``; return them."""

        def answered(gate: Proxy) -> list[Exchange]:
            found = []
            for exchange in gate.exchanges("POST", r"^/hooks/forge$"):
                payload = json.loads(exchange.request_body)
                if payload.get("comment", {}).get("id") == comment_id and payload.get("action") == action:
                    found.append(exchange)
            return found if len(found) >= count else []

        return self.hook_gate.wait_for(answered, timeout=timeout)

    def delivery(self, comment_id: int, action: str = "created") -> Exchange:
        """Wait for Gitea's (first) delivery about ``comment_id`` to have been answered; return it."""
        return self.deliveries(comment_id, action)[0]

    def run_of(self, comment_id: int) -> int:
        """Return the run ccci started for ``comment_id`` (from its answer to Gitea's delivery)."""
        answer = json.loads(self.delivery(comment_id).response_body)
        assert answer.get("result") == "queued", answer
        return int(answer["run"])

    def bot_comments(self, number: int) -> list[dict[str, Any]]:
        """Return the comments ccci's bot has on PR ``number``, as Gitea shows them."""
        return self.admin.comments_by(self.org, REPO, number, self.bot)

    def until(self, predicate: Callable[[], T], what: str, timeout: float = 60) -> T:
        """Wait until ``predicate()`` (which reads Gitea) is truthy, waking on each request ccci makes."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            # ccci's requests are the events; Gitea's own background work (a PR head moving
            # after a push) has none we can see, hence the bound on each wait.
            self.forge_proxy.wait_next(0.2)

    def bot_comment_with(self, number: int, text: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until ccci's comment on PR ``number`` shows ``text``; return it."""
        return self.until(
            lambda: next((c for c in self.bot_comments(number) if text in c["body"]), None),
            f"ccci's comment on #{number} to show {text!r}",
            timeout,
        )

    def bot_comment_saying(self, number: int, state: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the heading of ccci's comment on PR ``number`` says ``state`` (queued, passed…)."""
        heading = re.compile(rf"^### \S+ {re.escape(state)}\b", re.MULTILINE)
        return self.until(
            lambda: next((c for c in self.bot_comments(number) if heading.search(c["body"])), None),
            f"ccci's comment on #{number} to say {state!r}",
            timeout,
        )

    def status_becomes(self, sha: str, state: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until the latest commit status of ``sha`` is ``state``; return all of them, oldest first."""

        def latest() -> list[dict[str, Any]]:
            statuses = self.admin.statuses(self.org, REPO, sha)
            return statuses if statuses and statuses[-1]["status"] == state else []

        return self.until(latest, f"the status of {sha[:10]} to become {state}", timeout)

    def started(self, run_id: int, timeout: float = 60) -> None:
        """Wait until run ``run_id`` is in its held step."""
        self.until(lambda: (self.marks / f"started-{run_id}").exists(), f"run {run_id} to start", timeout)

    def runs(self) -> list[dict[str, Any]]:
        """Return ccci's runs, newest first (its admin API)."""
        answer = requests.get(self.ccci.url + "/admin/runs", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        answer.raise_for_status()
        return answer.json()["runs"]

    def run_json(self, run_id: int) -> dict[str, Any]:
        """Return ccci's run page as JSON."""
        answer = requests.get(f"{self.ccci.url}/runs/{run_id}", headers={"Accept": "application/json"}, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def settled(self, timeout: float = 60) -> None:
        """Wait until ccci has delivered everything it meant to say to Gitea."""
        metrics = self.ccci.url + "/metrics"
        self.until(lambda: "ccci_outbox_backlog 0.0\n" in requests.get(metrics, timeout=10).text, "the outbox", timeout)


@pytest.fixture
def gitea_world(real_gitea: RealGitea, tmp_path: Path) -> Iterator[Callable[..., GiteaWorld]]:  # noqa: F811
    """Return a factory of worlds (``hook_secret=``, extra CCCI_* settings as keywords)."""
    made: list[GiteaWorld] = []
    proxies: list[Proxy] = []

    def make(*, hook_secret: str = SECRET, **extra: str) -> GiteaWorld:
        admin = real_gitea.admin
        org, member = real_gitea.unique("recipes"), real_gitea.unique("alice")
        outsider, forker = real_gitea.unique("mallory"), real_gitea.unique("bob")
        for login in (member, outsider, forker):
            admin.create_user(login)
        admin.create_org(org, members={"maintainers": [member], "ci": [real_gitea.instance.bot_user]})
        admin.create_repo(org, REPO)
        checkout = Checkout.create(admin, org, REPO, tmp_path / "checkout", user=member, password=PASSWORD)

        marks = tmp_path / "marks"
        recipes = tmp_path / "recipes" / REPO
        marks.mkdir()
        marks.chmod(0o1777)  # steps run as SANDBOX_USER (nobody) when the suite runs as root
        recipes.mkdir(parents=True)
        (recipes / "ci.yml").write_text(HELD_CI.replace("$MARKS", str(marks)))

        forge_proxy = Proxy(real_gitea.url, name="forge-proxy").start()
        proxies.append(forge_proxy)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "CCCI_STATE_DIR": str(tmp_path / "state"),
            "CCCI_LOCK_DIR": str(tmp_path / "locks"),
            "CCCI_ABRA_HOME": str(tmp_path / "abra"),
            "CCCI_RECIPES_DIR": str(recipes.parent),
            "CCCI_SANDBOX_WRITABLE": str(marks),
            "CCCI_FORGE_URL": forge_proxy.url,
            "CCCI_FORGE_TOKEN": real_gitea.instance.bot_token,
            "CCCI_BOT_LOGIN": real_gitea.instance.bot_user,
            "CCCI_WEBHOOK_SECRET": SECRET,
            "CCCI_ADMIN_TOKEN": ADMIN,
            "CCCI_ALLOWED_ORGS": org,
            "CCCI_EXECUTOR": "bwrap",
            **extra,
        })  # fmt: skip
        ccci = CcciServer(env, tmp_path / "ccci.log")
        env["CCCI_PUBLIC_URL"] = ccci.url
        hook_gate = Proxy(ccci.url, name="hook-gate").start()
        proxies.append(hook_gate)
        hook_id = admin.create_org_hook(org, f"{hook_gate.url}/hooks/forge", hook_secret)
        world = GiteaWorld(
            real_gitea, admin, org, member, outsider, forker, checkout, hook_id, hook_gate, forge_proxy, ccci,
            marks, tmp_path,
        )  # fmt: skip
        made.append(world)
        ccci.start()
        return world

    yield make
    for world in made:
        world.release()  # a held run must not keep ccci's teardown waiting
        world.ccci.stop()
    for proxy in proxies:
        proxy.close()
