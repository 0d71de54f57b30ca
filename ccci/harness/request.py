"""The run request: what one run tests — one typed object, validated once, in every form it travels.

    worker's Run ──from_run──▶ RunRequest ──to_argv──▶ ``ccci run --run-id … --sha …``  (local)
                                    │      └─to_params─▶ Drone build parameters CCCI_RUN, …
                                    └◀── from_args ◀── the harness' command line, or CCCI_* (Drone)

A forge run names a recipe at a pinned commit of a pull request; ``ccci test`` names a recipe and
a local checkout (``source``). Every value reaches a path, a URL or a command line, so the one
validation (in ``__post_init__``) refuses anything that could escape one, with all the problems in
one sentence, before anything is started or sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ..errors import CcciError
from ..names import RUN_ID, URL_CHARS, is_id, is_recipe, is_sha

PARAMS = ("CCCI_RUN", "CCCI_RECIPE", "CCCI_CLONE_URL", "CCCI_PR", "CCCI_SHA")  # Drone's build parameters


class RunLike(Protocol):
    """The fields of a stored run that a request is made of (``store.Run``)."""

    id: int
    recipe: str
    clone_url: str
    pr: int
    sha: str | None
    private: int


@dataclass(frozen=True)
class RunRequest:
    """What one run tests: a recipe at a pinned commit (from a forge) or a local checkout."""

    run_id: str
    recipe: str
    clone_url: str = ""
    pr: int = 0
    sha: str = ""
    private: bool = False  # the repository is private: the checkout sends the forge token
    source: Path | None = None  # ``ccci test``: copy this directory instead of cloning
    ci_file: Path | None = None  # ``ccci test <dir>``: this ci.yml instead of RECIPES_DIR's
    parent_pid: int | None = None  # who started the harness; the run ends if it dies
    gate: bool = False  # wait for "start" on stdin: the starter records the run's dispatch first

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.run_id, str) or not RUN_ID.fullmatch(self.run_id):
            problems.append(f"run id {self.run_id!r} is not a plain identifier")
        if not is_recipe(self.recipe):
            problems.append(f"recipe {self.recipe!r} is not a recipe name (lowercase letters, digits, . _ -)")
        if self.source is None:  # a forge run: its id, commit, PR and clone URL reach git and a shell
            if not (isinstance(self.run_id, str) and self.run_id.isdigit() and is_id(int(self.run_id))):
                problems.append(f"run id {self.run_id!r} is not a positive integer")
            if not is_sha(self.sha):
                problems.append(f"sha {self.sha!r} is not a commit id (40-hex, or 64-hex for SHA-256)")
            if not is_id(self.pr):
                problems.append(f"pull request {self.pr!r} is not a positive integer")
            if not plain_url(self.clone_url):
                problems.append(f"clone URL {self.clone_url!r} is not a plain http(s) URL")
        if problems:
            raise CcciError("; ".join(problems))

    @classmethod
    def from_run(cls, run: RunLike, *, parent_pid: int | None = None, gate: bool = False) -> RunRequest:
        """Return the request of a stored run, as the worker dispatches it."""
        return cls(run_id=str(run.id), recipe=run.recipe, clone_url=run.clone_url, pr=run.pr, sha=run.sha or "",
                   private=bool(run.private), parent_pid=parent_pid, gate=gate)  # fmt: skip

    @classmethod
    def from_args(cls, args: Any, environ: Mapping[str, str]) -> RunRequest:
        """Return the request ``ccci run`` was given: its options, else Drone's ``CCCI_*`` parameters."""

        def given(option: str, param: str) -> str:
            value = getattr(args, option, None)
            return str(value) if value not in (None, "") else environ.get(param, "")

        values = {o: given(o, p) for o, p in zip(("run_id", "recipe", "clone_url", "pr", "sha"), PARAMS, strict=True)}
        missing = [o for o, v in values.items() if not v]
        if missing:
            raise CcciError(f"run: missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
        pr = int(values["pr"]) if values["pr"].isascii() and values["pr"].isdigit() else -1
        private = bool(getattr(args, "private", False)) or environ.get("CCCI_PRIVATE") == "1"
        return cls(run_id=values["run_id"], recipe=values["recipe"], clone_url=values["clone_url"], pr=pr,
                   sha=values["sha"], private=private, parent_pid=getattr(args, "parent_pid", None),
                   gate=bool(getattr(args, "gate", False)))  # fmt: skip

    def to_argv(self) -> list[str]:
        """Return the ``ccci run`` options that carry this request (after ``python -m ccci run``)."""
        argv = ["--run-id", self.run_id, "--recipe", self.recipe, "--clone-url", self.clone_url,
                "--pr", str(self.pr), "--sha", self.sha]  # fmt: skip
        if self.private:
            argv.append("--private")
        if self.parent_pid is not None:
            argv += ["--parent-pid", str(self.parent_pid)]
        if self.gate:
            argv.append("--gate")
        return argv

    def to_params(self) -> dict[str, str]:
        """Return the Drone build parameters that carry this request (the step reads them as CCCI_*)."""
        params = dict(zip(PARAMS, (self.run_id, self.recipe, self.clone_url, str(self.pr), self.sha), strict=True))
        if self.private:
            params["CCCI_PRIVATE"] = "1"
        return params


def plain_url(url: str) -> bool:
    """Tell whether ``url`` is a plain http(s) URL with a host, no credentials and no shell characters."""
    parsed = urlparse(url)
    return (
        parsed.scheme in ("http", "https")
        and bool(parsed.hostname)
        and "@" not in parsed.netloc  # credentials would show in a build page and in ps
        and URL_CHARS.fullmatch(url) is not None
    )
