"""The e2e world: a fake Gitea with a real recipe repository, and ccci served by real gunicorn.

world.gitea      FakeGitea (real HTTP, git smart HTTP, records every call)
world.repo       the recipe repository it serves (coop-cloud/hello: recipes/hello/ci.yml)
world.ccci       `python -m ccci serve` (gunicorn + worker) as a child process group
world.deliver()  sign and POST a webhook delivery the way Gitea does
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.fakes import sign
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import RecipeRepo, make_recipe_repo
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-webhook-secret-0123456789"
ADMIN = "e2e-admin-token-0123456789"
OWNER, REPO = "coop-cloud", "hello"


class CcciServer:
    """``python -m ccci serve`` in its own process group, stopped (and reaped) by ``stop``."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = ROOT):
        self.env = env
        self.log_path = log_path
        self.cwd = cwd  # where `ccci serve` is started; nothing may depend on it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> CcciServer:
        """Start serving and wait until /healthz answers."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ccci", "serve", "--bind", f"127.0.0.1:{self.port}", "--workers", "2"],
                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ccci serve did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)  # a port opening has no event to wait on from here

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (gunicorn, its workers, ccci's worker) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@dataclass
class World:
    """Everything one e2e test talks to."""

    gitea: FakeGitea
    repo: RecipeRepo
    ccci: CcciServer
    state_dir: Path
    env: dict[str, str]

    def deliver(
        self, payload: dict, *, secret: str = SECRET, forge: str = "gitea", **headers: str
    ) -> requests.Response:
        """POST ``payload`` to /hooks/forge, signed as the forge would sign it."""
        body = json.dumps(payload).encode()
        sent = {**sign(body, secret, forge=forge), **headers}
        return requests.post(self.ccci.url + "/hooks/forge", data=body, headers=sent, timeout=10)

    def comment(self, number: int, body: str, *, user: str = "alice") -> tuple[int, dict]:
        """Post a comment on the fake forge; return its id and the webhook payload it makes."""
        comment = self.gitea.post_comment(OWNER, REPO, number, body, user=user)
        return comment.id, self.gitea.comment_payload(comment.id)

    def open_pr(self, number: int, files: dict[str, str] | None = None) -> str:
        """Open PR ``number`` with a real commit; return its head sha."""
        sha = self.repo.open_pr(number, files or {f"pr-{number}.txt": f"change {number}\n"})
        self.gitea.open_pr(OWNER, REPO, number, sha)
        return sha

    def admin(self, method: str, path: str, **kwargs) -> requests.Response:
        """Call the admin API with the admin token."""
        headers = {"Authorization": f"Bearer {ADMIN}", **kwargs.pop("headers", {})}
        return requests.request(method, self.ccci.url + path, headers=headers, timeout=10, **kwargs)

    def ccci_comments(self, number: int) -> list:
        """Return the comments ccci made on PR ``number``."""
        return [c for c in self.gitea.comments_on(OWNER, REPO, number) if c.user == self.gitea.bot_login]


def world_env(tmp: Path, gitea: FakeGitea, **extra: str) -> dict[str, str]:
    """Return the environment of a ccci talking to ``gitea``, everything under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "CCCI_STATE_DIR": str(tmp / "state"),
        "CCCI_LOCK_DIR": str(tmp / "locks"),
        "CCCI_ABRA_HOME": str(tmp / "abra"),
        "CCCI_FORGE_URL": gitea.url,
        "CCCI_FORGE_TOKEN": gitea.token,
        "CCCI_WEBHOOK_SECRET": SECRET,
        "CCCI_ADMIN_TOKEN": ADMIN,
        "CCCI_ALLOWED_USERS": "alice",
        "CCCI_BOT_LOGIN": gitea.bot_login,
        "CCCI_PUBLIC_URL": "http://ccci.example.test",
        "CCCI_EXECUTOR": "local",
        **extra,
    })  # fmt: skip
    return env


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator:
    """Return a factory of worlds (extra CCCI_* settings as keywords); tear everything down after."""
    made: list[World] = []

    def make(**extra: str) -> World:
        gitea = FakeGitea(git_root=tmp_path / "git").start()
        repo = make_recipe_repo(tmp_path / "git", owner=OWNER, name=REPO, files={"README.md": "hello recipe\n"})
        env = world_env(tmp_path, gitea, **extra)
        world = World(gitea, repo, CcciServer(env, tmp_path / "ccci.log"), tmp_path / "state", env)
        made.append(world)
        world.ccci.start()
        return world

    yield make
    for world in made:
        world.ccci.stop()
        world.gitea.close()
