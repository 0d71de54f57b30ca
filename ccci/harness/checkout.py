"""The recipe checkout: exactly the pinned commit of a pull request, fetched with real git.

The PR head is fetched from the *base* repository as ``refs/pull/<n>/head`` (Gitea and
Forgejo publish every PR there, forks included), together with the base repository's tags — a
recipe's releases (``<recipe-version>+<upstream-version>``), which the upgrade check deploys
first — then the pinned sha is checked out detached and verified.
A token for the forge is handed to git through ``GIT_CONFIG_*`` variables, never
on a command line where ``ps`` would show it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PermanentInfraError, TransientInfraError
from ..names import is_sha
from ..pipeline.stop import Stop

GIT_TIMEOUT = 300
STOP_POLL = 0.1  # seconds between looks at the run's stop switch while git works


def checkout_pull(
    clone_url: str, pr: int, sha: str, dest: Path, *, forge_url: str = "", token: str = "", stop: Stop | None = None
) -> None:
    """Fetch ``refs/pull/<pr>/head`` from ``clone_url`` into ``dest`` and check out ``sha``.

    A stop requested while git fetches kills it and raises ``Stopped``.
    """
    if not is_sha(sha):
        raise PermanentInfraError(f"refusing to check out {sha!r}: not a commit id (40-hex, or 64-hex for SHA-256)")
    dest.mkdir(parents=True, exist_ok=True)
    env = _git_env(clone_url, forge_url, token)
    _git(["init", "-q", str(dest)], env)
    ref = f"refs/pull/{int(pr)}/head"
    _git(
        ["-C", str(dest), "fetch", "-q", "--no-tags", clone_url, f"+{ref}:refs/ccci/pr", "+refs/tags/*:refs/tags/*"],
        env,
        what=f"fetching {ref} from {_safe_url(clone_url)}",
        transient=True,
        stop=stop,
    )
    try:
        _git(["-C", str(dest), "checkout", "-q", "--detach", sha], env)
    except PermanentInfraError:
        raise PermanentInfraError(
            f"commit {sha[:10]} is not in {ref} any more (the PR head moved and the old commit is gone); "
            "comment !testme again to test the current head"
        ) from None
    head = _git(["-C", str(dest), "rev-parse", "HEAD"], env).strip()
    if head != sha:
        raise PermanentInfraError(f"checked out {head} instead of {sha}")


def head_commit(checkout: Path) -> str:
    """Return the commit a local checkout has checked out, or '' when it is not a git checkout."""
    if not (checkout / ".git").exists():
        return ""
    try:
        return _git(["-C", str(checkout), "rev-parse", "HEAD"], _git_env("", "", "")).strip()
    except PermanentInfraError:
        return ""  # an empty repository: nothing to name


def copy_source(source: Path, dest: Path) -> None:
    """Copy a local recipe checkout (``ccci test --source``), .git included."""
    if not source.is_dir():
        raise PermanentInfraError(f"source {source} is not a directory")
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)


def _git_env(clone_url: str, forge_url: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_ASKPASS": "/bin/false"})
    # Only ever send the token to the forge it belongs to.
    if token and forge_url and urlparse(clone_url).netloc == urlparse(forge_url).netloc:
        env.update(
            {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: token {token}",
            }
        )
    return env


def _git(
    args: list[str], env: dict[str, str], *, what: str = "", transient: bool = False, stop: Stop | None = None
) -> str:
    what = what or " ".join(args[:3])
    proc = subprocess.Popen(["git", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + GIT_TIMEOUT
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=STOP_POLL)
            break
        except subprocess.TimeoutExpired:
            if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                if stop is not None:
                    stop.check()
                raise TransientInfraError(f"git timed out while {what}") from None
    if proc.returncode != 0:
        error = TransientInfraError if transient else PermanentInfraError
        detail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise error(f"git failed while {what}: {detail[0]}")
    return stdout


def _safe_url(url: str) -> str:
    parsed = urlparse(url)
    return parsed._replace(netloc=parsed.hostname or "").geturl() if parsed.password else url
