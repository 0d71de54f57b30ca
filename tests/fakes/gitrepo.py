"""Real git recipe repositories for tests, laid out the way FakeGitea serves them.

``make_recipe_repo(root, owner, name)`` creates::

    root/
    ├── <owner>/<name>.git        the bare repository FakeGitea serves at {url}/<owner>/<name>.git
    └── .work/<owner>/<name>/     a scratch clone that commits are made in and pushed from

A pull request is what Gitea makes of one: a branch ``refs/heads/<head_ref>`` plus the
mirror ref ``refs/pull/<n>/head`` in the base repository, both at the PR head commit.
Git runs with no system or global config and a fixed identity, so this works on a bare
machine and never reads the developer's settings.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RECIPE: dict[str, str] = {
    "README.md": "# custom-html\n\nA static website, served by nginx.\n",
    "compose.yml": (
        'version: "3.8"\n'
        "services:\n"
        "  app:\n"
        "    image: nginx:1.27.2\n"
        "    networks: [proxy]\n"
        "    deploy:\n"
        "      labels:\n"
        '        - "traefik.enable=true"\n'
        "networks:\n"
        "  proxy:\n"
        "    external: true\n"
    ),
    ".env.sample": "TYPE=custom-html\nDOMAIN=custom-html.example.com\nLETS_ENCRYPT_ENV=production\n",
    "abra.sh": "export NGINX_CONF_VERSION=v1\n",
}

# Commit dates advance one second per commit: shas are reproducible run to run, yet two
# commits with the same tree and parent never collapse into one.
_clock = itertools.count(1_700_000_000)


def git(*args: str, cwd: Path | str | None = None) -> str:
    """Run git with a clean, fixed environment and return its stripped stdout."""
    when = f"@{next(_clock)} +0000"
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "ccci tests",
        "GIT_AUTHOR_EMAIL": "tests@ccci.invalid",
        "GIT_COMMITTER_NAME": "ccci tests",
        "GIT_COMMITTER_EMAIL": "tests@ccci.invalid",
        "GIT_AUTHOR_DATE": when,
        "GIT_COMMITTER_DATE": when,
        "GIT_TERMINAL_PROMPT": "0",
    }
    cmd = ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


@dataclass
class RecipeRepo:
    """A recipe repository on disk: the bare repo a forge serves, and a clone to commit in."""

    owner: str
    name: str
    bare: Path
    work: Path

    def commit(
        self, files: Mapping[str, str | bytes | None], message: str = "Update recipe", *, branch: str = "main"
    ) -> str:
        """Commit ``files`` (None deletes one) on ``branch``, push it, and return the new sha."""
        self._checkout(branch)
        sha = self._commit(files, message)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)
        return sha

    def open_pr(
        self,
        number: int,
        files: Mapping[str, str | bytes | None],
        message: str = "Change the recipe",
        *,
        head_ref: str | None = None,
        base: str = "main",
    ) -> str:
        """Branch off ``base``, commit ``files``, publish it as PR ``number``, return the head sha."""
        head_ref = head_ref or f"pr-{number}"
        git("checkout", "-q", "-B", head_ref, f"origin/{base}", cwd=self.work)
        return self._publish(number, head_ref, self._commit(files, message))

    def push_pr(
        self,
        number: int,
        files: Mapping[str, str | bytes | None],
        message: str = "Address review",
        *,
        head_ref: str | None = None,
    ) -> str:
        """Add a commit to PR ``number``'s branch, publish it, and return the new head sha."""
        head_ref = head_ref or f"pr-{number}"
        self._checkout(head_ref)
        return self._publish(number, head_ref, self._commit(files, message))

    def tag(self, name: str, ref: str = "main") -> str:
        """Tag ``ref`` of the served repository as ``name`` (a release), push it, return its sha."""
        git("fetch", "-q", "origin", cwd=self.work)
        sha = git("rev-parse", f"origin/{ref}" if ref == "main" else ref, cwd=self.work)
        git("tag", "-f", name, sha, cwd=self.work)
        git("push", "-q", "-f", "origin", f"refs/tags/{name}", cwd=self.work)
        return sha

    def rev(self, ref: str) -> str:
        """Return the sha ``ref`` points at in the bare (served) repository."""
        return git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=self.bare)

    def _checkout(self, branch: str) -> None:
        git("fetch", "-q", "origin", cwd=self.work)
        if git("ls-remote", "--heads", "origin", branch, cwd=self.work):
            git("checkout", "-q", "-B", branch, f"origin/{branch}", cwd=self.work)
        else:
            git("checkout", "-q", "-B", branch, cwd=self.work)

    def _commit(self, files: Mapping[str, str | bytes | None], message: str) -> str:
        for rel, content in files.items():
            path = self.work / rel
            if content is None:
                git("rm", "-q", "--ignore-unmatch", "--", rel, cwd=self.work)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            if rel.endswith(".sh"):
                path.chmod(0o755)
            git("add", "--", rel, cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def _publish(self, number: int, head_ref: str, sha: str) -> str:
        git(
            "push",
            "-q",
            "-f",
            "origin",
            f"{sha}:refs/heads/{head_ref}",
            f"{sha}:refs/pull/{number}/head",
            cwd=self.work,
        )
        return sha


def make_recipe_repo(
    root: Path | str,
    owner: str = "coop-cloud",
    name: str = "custom-html",
    files: Mapping[str, str | bytes | None] | None = None,
) -> RecipeRepo:
    """Create a recipe repository under ``root`` with ``files`` committed on ``main``."""
    root = Path(root)
    bare = root / owner / f"{name}.git"
    work = root / ".work" / owner / name
    bare.parent.mkdir(parents=True, exist_ok=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", str(bare))
    git("clone", "-q", str(bare), str(work))
    repo = RecipeRepo(owner=owner, name=name, bare=bare, work=work)
    repo.commit(DEFAULT_RECIPE if files is None else files, "Initial recipe")
    return repo
