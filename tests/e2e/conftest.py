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


class SplitCcci:
    """ccci the way deploy/ runs it: gunicorn serving ``app:app``, and ``python -m ccci worker`` as
    a process of its own, so that a test can kill and restart the worker alone, at once."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def start(self) -> SplitCcci:
        """Start the web app and the worker; wait until /healthz answers."""
        with (self.log_dir / "web.log").open("ab") as log:
            self.web = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "app:app"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.start_worker()
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.web.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not come up:\n{(self.log_dir / 'web.log').read_text()[-3000:]}")
            time.sleep(0.05)  # a port opening has no event to wait on from here

    def start_worker(self) -> subprocess.Popen:
        """Start (again) the worker process."""
        with (self.log_dir / "worker.log").open("ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "ccci", "worker"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self.worker

    def kill_worker(self) -> int:
        """SIGKILL the worker alone (its harnesses are in sessions of their own); return its pid."""
        assert self.worker is not None
        pid = self.worker.pid
        self.worker.kill()
        self.worker.wait()
        return pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the web app and the worker and reap them."""
        for proc in (self.worker, self.web):
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.web = self.worker = None


@dataclass
class World:
    """Everything one e2e test talks to."""

    gitea: FakeGitea
    repo: RecipeRepo
    ccci: CcciServer | SplitCcci
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
        "CCCI_EXECUTOR": "bwrap",
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


@pytest.fixture
def make_split_world(tmp_path: Path) -> Iterator:
    """Like ``make_world``, with the web app and the worker as separate processes (``SplitCcci``)."""
    made: list[World] = []

    def make(**extra: str) -> World:
        gitea = FakeGitea(git_root=tmp_path / "git").start()
        repo = make_recipe_repo(tmp_path / "git", owner=OWNER, name=REPO, files={"README.md": "hello recipe\n"})
        env = world_env(tmp_path, gitea, **extra)
        world = World(gitea, repo, SplitCcci(env, tmp_path), tmp_path / "state", env)
        made.append(world)
        world.ccci.start()
        return world

    yield make
    for world in made:
        world.ccci.stop()
        world.gitea.close()


def wait_until(predicate, timeout=60.0, what="condition"):
    """Wait for a condition that has no event to wait on (files written by other processes)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def final_comment(world, number: int, word: str, timeout: float = 60):
    return world.gitea.wait_for(
        lambda g: next((c for c in world.ccci_comments(number) if word in "\n".join(c.body.splitlines()[:2])), None),
        timeout=timeout,
    )


def settled(world) -> None:
    """Wait until ccci has delivered everything it meant to say to the forge."""
    metrics = world.ccci.url + "/metrics"
    wait_until(
        lambda: "ccci_outbox_backlog 0.0\n" in requests.get(metrics, timeout=10).text, what="the outbox to drain"
    )
