"""The chaos world: FakeGitea with three real recipe repositories, and a ``ccci serve`` that may die.

    <root>/
    ├── git/                 the bare repositories FakeGitea serves (coop-cloud/alpha, beta, gamma)
    ├── recipes/<recipe>/    RECIPES_DIR: the drill's ci.yml for each recipe
    ├── marks/apps/          heartbeats the steps write, one file per app domain (mode 1777: steps
    │                        run as SANDBOX_USER, nobody, under root)
    ├── state/  locks/       ccci's STATE_DIR and LOCK_DIR
    └── ccci.log             everything every ``ccci serve`` printed, across restarts

Every step records ``<run> <step> <nonce> start|tick|end <epoch seconds>`` lines in its app's
heartbeat file: the drill reads when each run held each app from them, and the nonce (one per
execution of a step) tells a step that ran twice. The work step prints a secret it was given
(``from_env``, ``secret: true``) and leaves it in an artifact. The secrets are new every drill.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.fakes import sign
from tests.fakes.gitea import FakeGitea
from tests.fakes.gitrepo import RecipeRepo, make_recipe_repo
from tests.support import ROOT, free_port

from .targets import Target, sigkill, wait_gone

OWNER = "coop-cloud"
RECIPES = ("alpha", "beta", "gamma")
PRS = (1, 2, 3)
USERS = ("alice", "bob", "carol")
STRANGER = "mallory"
PUBLIC_URL = "http://ccci.chaos.test"
DOMAIN = "chaos.localhost"
MAX_RUNS = 3
UP_TIMEOUT = 60.0  # seconds for a starting serve to answer /healthz on a loaded machine

STEP = """\
# {token}
STEP={name}; NONCE=$(cat /proc/sys/kernel/random/uuid)
beat() {{ printf '%s %s %s %s %s\\n' "$CCCI_RUN" "$STEP" "$NONCE" "$1" "$(date +%s.%N)" >> "{apps}/$APP_DOMAIN.log"; }}
beat start
{extra}i=0
while [ "$i" -lt {ticks} ]; do sleep 0.2; beat tick; i=$((i + 1)); done
beat end
"""
WORK_EXTRA = """\
echo "the step's secret is $CHAOS_SECRET"
echo "and again on stderr: $CHAOS_SECRET" >&2
mkdir -p .ccci/artifacts && echo "secret: $CHAOS_SECRET" > .ccci/artifacts/secret.txt
echo "::metric beats={ticks}"
"""


def ci_yml(token: str, apps: Path) -> str:
    """Return the drill's recipe CI: deploy, work (with the secret), and an undeploy teardown."""

    def step(name: str, ticks: int, timeout: int, extra: str = "", teardown: bool = False, needs: str = "") -> str:
        command = STEP.format(token=token, name=name, apps=apps, ticks=ticks, extra=extra)
        lines = [f"  - name: {name}", f"    timeout: {timeout}"]
        lines += [f"    needs: [{needs}]"] if needs else []
        lines += ["    teardown: true"] if teardown else []
        lines += ["    run: |", *("      " + line for line in command.splitlines())]
        return "\n".join(lines)

    return "\n".join([
        "# The chaos drill's recipe CI (tests/chaos/world.py): heartbeats, a secret, time to be killed in.",
        "timeout: 240",
        "env:",
        "  CHAOS_SECRET: {from_env: CHAOS_STEP_SECRET, secret: true}",
        "steps:",
        step("deploy", 5, 60),
        step("work", 15, 90, extra=WORK_EXTRA.format(ticks=15), needs="deploy"),
        step("undeploy", 3, 60, teardown=True),
        "",
    ])  # fmt: skip


@dataclass(frozen=True)
class Secrets:
    """Every secret value of one drill: none may appear anywhere ccci writes or serves."""

    forge_token: str
    webhook_secret: str
    admin_token: str
    step_secret: str

    @classmethod
    def fresh(cls) -> Secrets:
        """Return new random secrets."""
        return cls(*(f"chaos-{name}-{secrets.token_hex(16)}" for name in ("forge", "hook", "admin", "step")))

    def named(self) -> dict[str, str]:
        """Return the secrets by name."""
        return {
            "forge token": self.forge_token,
            "webhook secret": self.webhook_secret,
            "admin token": self.admin_token,
            "step secret": self.step_secret,
        }


class Serve:
    """``python -m ccci serve`` in its own session, on one port for its whole life, restartable."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        """The master's pid (the serve process is gunicorn's arbiter)."""
        assert self.proc is not None, "serve is not started"
        return self.proc.pid

    def start(self) -> None:
        """Start serving and wait until /healthz answers; try again while the port is still taken."""
        for _attempt in range(5):
            with self.log_path.open("ab") as log:
                log.write(f"\n==== chaos drill: starting ccci serve (start {self.starts + 1})\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "ccci", "serve", "--bind", f"127.0.0.1:{self.port}", "--workers", "2"],
                    cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            if self._wait_up():
                self.starts += 1
                return
            self.proc.wait()
        raise RuntimeError(f"ccci serve would not start; see {self.log_path}")

    def _wait_up(self) -> bool:
        deadline = time.monotonic() + UP_TIMEOUT
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return True
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                return False
            time.sleep(delay)  # a port opening has no event to wait on from here
            delay = min(delay * 2, 0.5)
        return False

    def up(self) -> bool:
        """Tell whether the current master is alive."""
        return self.proc is not None and self.proc.poll() is None

    def restart_after(self, web_workers: list[Target]) -> None:
        """Collect a master that died, stop the web workers it left, and start serving again.

        The web workers of a dead arbiter notice only at their next wake-up (up to 15 s) and hold
        the port until then; ``deploy/systemd/ccci-web.service`` (KillMode=mixed) SIGKILLs what is
        left of the unit once its main process died, and so does this. The ccci worker and its
        harnesses are left alone: PDEATHSIG stops the worker, and harnesses tear down on their own.
        """
        assert self.proc is not None
        self.proc.wait()
        for target in web_workers:
            sigkill(target)
        for target in web_workers:
            wait_gone(target, 30)
        self.start()

    def stop(self) -> int | None:
        """Stop serving (SIGTERM to the master: gunicorn stops its workers, serve its ccci worker)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _quiet_hang_ups(gitea: FakeGitea) -> None:
    """Keep a forge client that was killed mid-request (a drill's daily bread) out of the output."""
    server = gitea._server
    report = server.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            report(request, client_address)

    server.handle_error = handle_error


class ChaosWorld:
    """The forge, the recipe repositories and ccci, all under one directory."""

    def __init__(self, root: Path):
        self.root = root
        self.secrets = Secrets.fresh()
        self.token = f"chaos-token-{uuid.uuid4().hex}"  # in every step's command line
        self.marks = root / "marks"
        self.apps = self.marks / "apps"
        self.state_dir = root / "state"
        self.lock_dir = root / "locks"
        self.recipes_dir = root / "recipes"
        self.log_path = root / "ccci.log"
        self.gitea = FakeGitea(token=self.secrets.forge_token, git_root=root / "git")
        self.repos: dict[str, RecipeRepo] = {}
        self.env: dict[str, str] = {}
        self.serve: Serve | None = None
        self.needles: list[str] = []  # what a process of this drill's runs has in its command line

    def start(self) -> None:
        """Make the repositories, open every pull request, write the CI and start serving."""
        for d in (self.apps, self.recipes_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.marks, self.apps):
            d.chmod(0o1777)  # steps write here as SANDBOX_USER
        self.gitea.start()
        _quiet_hang_ups(self.gitea)
        self.needles = [f"{self.root}/", f"{self.gitea.url}/", self.token]  # "/": no other port or dir
        for recipe in RECIPES:
            self.repos[recipe] = make_recipe_repo(self.root / "git", owner=OWNER, name=recipe,
                                                  files={"README.md": f"{recipe} recipe\n"})  # fmt: skip
            (self.recipes_dir / recipe).mkdir()
            (self.recipes_dir / recipe / "ci.yml").write_text(ci_yml(self.token, self.apps))
            for pr in PRS:
                sha = self.repos[recipe].open_pr(pr, {f"pr-{pr}.txt": f"change {pr} of {recipe}\n"})
                self.gitea.open_pr(OWNER, recipe, pr, sha)
        self.env = self._env()
        self.serve = Serve(self.env, self.log_path)
        self.serve.start()

    def close(self) -> None:
        """Stop serving and close the forge."""
        if self.serve is not None:
            self.serve.stop()
        self.gitea.close()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCCI_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "CCCI_STATE_DIR": str(self.state_dir),
            "CCCI_LOCK_DIR": str(self.lock_dir),
            "CCCI_ABRA_HOME": str(self.root / "abra"),
            "CCCI_FORGE_URL": self.gitea.url,
            "CCCI_FORGE_TOKEN": self.secrets.forge_token,
            "CCCI_WEBHOOK_SECRET": self.secrets.webhook_secret,
            "CCCI_ADMIN_TOKEN": self.secrets.admin_token,
            "CCCI_ALLOWED_USERS": ",".join(USERS),
            "CCCI_BOT_LOGIN": self.gitea.bot_login,
            "CCCI_PUBLIC_URL": PUBLIC_URL,
            "CCCI_EXECUTOR": "bwrap",
            "CCCI_RECIPES_DIR": str(self.recipes_dir),
            "CCCI_SANDBOX_WRITABLE": str(self.marks),
            "CCCI_DOMAIN": DOMAIN,
            "CCCI_MAX_RUNS": str(MAX_RUNS),
            "CCCI_RUNS_PER_HOUR": "100000",
            "CCCI_RUN_TIMEOUT": "300",
            "CCCI_RUN_GRACE": "60",
            # Not a CCCI_* setting: an operator's variable that the recipe CI reads with from_env.
            "CHAOS_STEP_SECRET": self.secrets.step_secret,
        })  # fmt: skip
        return env

    # -- the forge side ----------------------------------------------------------------------------

    def comment(self, recipe: str, pr: int, body: str, user: str) -> tuple[int, dict[str, Any]]:
        """Post a comment on the fake forge; return its id and the webhook payload it makes."""
        comment = self.gitea.post_comment(OWNER, recipe, pr, body, user=user)
        return comment.id, self.gitea.comment_payload(comment.id)

    def signed(self, body: bytes, secret: str | None = None) -> dict[str, str]:
        """Return the headers Gitea sends with ``body`` (a new delivery id every time)."""
        return sign(body, self.secrets.webhook_secret if secret is None else secret)

    def post_hook(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        """POST one delivery to the current serve."""
        assert self.serve is not None
        return requests.post(self.serve.url + "/hooks/forge", data=body, headers=headers, timeout=15)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call the admin API with the admin token."""
        assert self.serve is not None
        headers = {"Authorization": f"Bearer {self.secrets.admin_token}"}
        return requests.request(method, self.serve.url + path, headers=headers, timeout=15, **kwargs)

    def ccci(self, *args: str) -> subprocess.CompletedProcess:
        """Run ``python -m ccci <args>`` with this world's settings."""
        return subprocess.run([sys.executable, "-m", "ccci", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip

    def runs(self) -> list[dict[str, Any]]:
        """Return every run in the store (``ccci runs --json``), each with its report from its run page."""
        done = self.ccci("runs", "--json", "--limit", "1000000")
        if done.returncode != 0:
            raise RuntimeError(f"ccci runs failed: {done.stderr[-2000:]}")
        runs = json.loads(done.stdout)
        assert self.serve is not None
        for run in runs:
            page = requests.get(
                f"{self.serve.url}/runs/{run['id']}", headers={"Accept": "application/json"}, timeout=15
            )
            run["report"] = page.json().get("report") if page.ok else None
        return runs
