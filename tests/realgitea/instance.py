"""A running Gitea: one headless instance per directory, found again by its pid file.

    DIR/
    ├── custom/conf/app.ini   written by appini.py: loopback port, SQLite, webhooks allowed to
    │                         loopback, no mailer, no update checker, offline
    ├── data/                 the SQLite database, repositories, sessions, git's HOME
    ├── log/web.log           what `gitea web` prints
    ├── gitea.pid             "<pid> <start time>" of `gitea web`
    └── credentials.json      the URL, users, tokens (and the admin's password, for web pages)

``start`` goes in the order Gitea needs: ``migrate`` → the admin user → ccci's bot user → their
tokens → ``gitea web`` in its own session, then waits until ``/api/v1/version`` answers.
``stop`` ends that process, waits for it, makes sure nothing it started lives on, and removes
the files above (only those: DIR may be anything the caller chose).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .appini import write_app_ini
from .build import Build

ADMIN_USER = "ccci-admin"
BOT_USER = "ccci-bot"
# Exactly the scopes ccci's README asks of its forge account.
BOT_SCOPES = ("write:issue", "write:repository", "read:organization")
OWN_FILES = ("custom", "data", "log", "gitea.pid", "credentials.json")
MARKER = "CCCI_GITEA_DIR"  # in the environment of every process of an instance: no straggler hides
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


class GiteaInstanceError(RuntimeError):
    """Gitea could not be started or stopped; the message says why and what to look at."""


@dataclass(frozen=True)
class Instance:
    """A Gitea serving from ``directory``: where it answers, and the accounts made for ccci."""

    directory: str
    url: str
    admin_user: str
    admin_password: str
    admin_token: str
    bot_user: str
    bot_token: str
    pid: int

    def json_line(self) -> str:
        """Return the one JSON line ``scripts/gitea start`` prints."""
        keys = ("url", "admin_user", "admin_token", "bot_user", "bot_token")
        return json.dumps({k: getattr(self, k) for k in keys})


def start(directory: Path | str, build: Build) -> Instance:
    """Start a fresh Gitea with its database under ``directory``; return once its API answers."""
    directory = Path(directory).resolve()
    running = _running_pid(directory)
    if running is not None:
        raise GiteaInstanceError(
            f"a Gitea started from {directory} is still running (pid {running}): "
            f"stop it first with scripts/gitea stop {directory}"
        )
    _remove_own_files(directory)  # what a killed instance left: start from nothing
    for sub in ("custom/conf", "data/home", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    env = _environment(directory)
    port = _free_port()
    ini = write_app_ini(directory, build.static_root, port)
    gitea = [str(build.binary), "--work-path", str(directory), "--config", str(ini)]

    _run([*gitea, "migrate"], env, "create Gitea's database")
    admin_password = secrets.token_urlsafe(18)
    admin_token = _create_user(gitea, env, ADMIN_USER, admin_password, admin=True, scopes=("all",))
    bot_token = _create_user(gitea, env, BOT_USER, secrets.token_urlsafe(18), admin=False, scopes=BOT_SCOPES)

    for _attempt in range(3):
        url = f"http://127.0.0.1:{port}"
        pid = _serve(gitea, env, directory, url)
        if pid is not None:
            break
        port = _free_port()  # someone took the port between our look and Gitea's bind
        ini = write_app_ini(directory, build.static_root, port)
    else:
        raise GiteaInstanceError(f"Gitea could not bind a free port three times:\n{_log_tail(directory)}")
    instance = Instance(str(directory), url, ADMIN_USER, admin_password, admin_token, BOT_USER, bot_token, pid)
    creds = directory / "credentials.json"
    creds.touch(mode=0o600)
    creds.write_text(json.dumps(asdict(instance), indent=2) + "\n")
    return instance


def load(directory: Path | str) -> Instance:
    """Return the instance started from ``directory``, as ``start`` recorded it."""
    path = Path(directory).resolve() / "credentials.json"
    try:
        return Instance(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise GiteaInstanceError(f"no Gitea was started from {path.parent} ({exc})") from None


def stop(directory: Path | str) -> bool:
    """End the Gitea started from ``directory`` and remove its files; return whether one ran."""
    directory = Path(directory).resolve()
    pid = _running_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, STOP_TIMEOUT)
    # Anything it started (git, hooks) and left behind carries the marker: end it too.
    for straggler in stragglers(directory):
        try:
            os.kill(straggler, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(straggler, STOP_TIMEOUT)
    _remove_own_files(directory)
    return pid is not None


def stragglers(directory: Path | str) -> list[int]:
    """Return the pids of live processes belonging to the instance of ``directory``."""
    needle = f"{MARKER}={Path(directory).resolve()}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes() and _start_time(int(entry.name)) is not None:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# -- starting ------------------------------------------------------------------------------------


def _environment(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITEA_", "GIT_"))}
    env.update(
        {
            "GITEA_WORK_DIR": str(directory),
            "GITEA_CUSTOM": str(directory / "custom"),
            "HOME": str(directory / "data" / "home"),  # never the developer's ~/.gitconfig
            MARKER: str(directory),
        }
    )
    return env


def _create_user(gitea: list[str], env: dict[str, str], name: str, password: str, *, admin: bool, scopes) -> str:
    """Create user ``name`` with an access token of ``scopes``; return the token."""
    cmd = [
        *gitea, "admin", "user", "create", "--username", name, "--password", password,
        "--email", f"{name}@ccci.invalid", "--must-change-password=false",
        "--access-token", "--access-token-name", f"{name}-token", "--access-token-scopes", ",".join(scopes),
    ]  # fmt: skip
    if admin:
        cmd.append("--admin")
    out = _run(cmd, env, f"create the user {name}")
    match = re.search(r"^Access token was successfully created\.\.\. ([0-9a-f]{40})$", out, re.MULTILINE)
    if match is None:
        raise GiteaInstanceError(f"`gitea admin user create` made no token for {name}; it said:\n{out[-2000:]}")
    return match.group(1)


def _serve(gitea: list[str], env: dict[str, str], directory: Path, url: str) -> int | None:
    """Start ``gitea web`` in its own session; return its pid once ready, or None if its port was taken."""
    log_path = directory / "log" / "web.log"
    # posix_spawn, not Popen: the process outlives this call (and scripts/gitea itself), owned by
    # its pid file rather than by an object that would complain it was never waited for.
    pid = os.posix_spawn(
        gitea[0],
        gitea,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    (directory / "gitea.pid").write_text(f"{pid} {_start_time(pid)}\n")
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.02
    while True:
        # Readiness is the API answering, not a guess at how long booting takes.
        try:
            with urllib.request.urlopen(f"{url}/api/v1/version", timeout=2) as answer:
                if answer.status == 200 and json.load(answer).get("version"):
                    return pid
        except (urllib.error.URLError, OSError, ValueError):
            pass
        exited, status = os.waitpid(pid, os.WNOHANG)
        if exited:
            (directory / "gitea.pid").unlink(missing_ok=True)
            if "address already in use" in log_path.read_text(errors="replace"):
                log_path.rename(log_path.with_suffix(f".{pid}.log"))
                return None
            code = os.waitstatus_to_exitcode(status)
            raise GiteaInstanceError(f"gitea web exited with code {code}:\n{_log_tail(directory)}")
        if time.monotonic() > deadline:
            stop(directory)
            raise GiteaInstanceError(f"gitea web did not answer {url} within {READY_TIMEOUT:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _run(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise GiteaInstanceError(
            f"could not {what}: `gitea {' '.join(cmd[5:7])}` exited with code {proc.returncode}:\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(directory: Path, lines: int = 30) -> str:
    try:
        return "\n".join((directory / "log" / "web.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- stopping ------------------------------------------------------------------------------------


def _running_pid(directory: Path) -> int | None:
    """Return the pid in ``directory``'s pid file if that very process still runs."""
    try:
        pid_text, start_text = (directory / "gitea.pid").read_text().split()
        pid, started = int(pid_text), int(start_text)
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == started else None  # a reused pid has another start time


def _start_time(pid: int) -> int | None:
    """Return when ``pid`` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited, on its pidfd (an event, not a poll); return whether it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(timeout * 1000):
            _reap(pid)
            return True
        return False
    finally:
        os.close(fd)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (the pytest fixture's case)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _remove_own_files(directory: Path) -> None:
    for name in OWN_FILES:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
