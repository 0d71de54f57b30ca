"""The policy: who may start or cancel a run.

Fail closed, like cc-ci and yunorunner: a login is allowed if it is in ``ALLOWED_USERS``
(compared case-insensitively, as Gitea compares logins) or the forge confirms it is a member
of one of ``ALLOWED_ORGS``. Nothing configured means nobody; a membership check that fails
(forge down, token refused, anything raised) counts as "not a member", and the reason says so
for the log. ``author_association``-style hints in the payload are never trusted. A refusal that
only a transient failure caused (the forge was down) says so, ``uncertain``, so that the worker
can ask again later instead of refusing someone it simply could not check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Whether a login may trigger ccci, and a reason fit for the log."""

    allowed: bool
    reason: str
    uncertain: bool = False  # refused only because a check could not be made (forge down): ask again


def in_allowed_users(login: str, allowed_users: Iterable[str]) -> bool:
    """Tell whether ``login`` is on the allowlist (forge logins compare case-insensitively)."""
    wanted = login.casefold()
    return bool(login) and any(user.casefold() == wanted for user in allowed_users)


def authorize(
    login: str,
    *,
    allowed_users: Iterable[str],
    allowed_orgs: Iterable[str],
    is_org_member: Callable[[str, str], bool],
) -> Decision:
    """Decide whether ``login`` may trigger runs; any doubt means no."""
    if not login:
        return Decision(False, "no login")
    if in_allowed_users(login, allowed_users):
        return Decision(True, f"{login} is in ALLOWED_USERS")
    orgs = list(allowed_orgs)
    failures = []
    uncertain = False
    for org in orgs:
        try:
            member = is_org_member(org, login)
        except Exception as exc:  # fail closed on anything the check raises, and say what
            failures.append(f"membership check in {org} failed ({type(exc).__name__}: {exc})")
            uncertain = uncertain or bool(getattr(exc, "transient", False))
            continue
        if member is True:
            return Decision(True, f"{login} is a member of {org}")
    if not orgs and not failures:
        reason = f"{login} is not in ALLOWED_USERS and no ALLOWED_ORGS are configured"
    else:
        reason = f"{login} is not in ALLOWED_USERS nor a confirmed member of {', '.join(orgs)}"
    if failures:
        reason += "; " + "; ".join(failures)
    return Decision(False, reason, uncertain)


def refusal_text(login: str, trigger: str = "!testme") -> str:
    """Return the one comment that tells ``login`` why their command was not run."""
    return (
        f"@{login}, only maintainers of this recipe can start tests with `{trigger}`, so I have "
        f"not run anything. A maintainer can comment `{trigger}` to test this pull request."
    )


def limit_text(login: str, runs_per_hour: int, trigger: str = "!testme") -> str:
    """Return the one comment that tells ``login`` they reached the hourly limit of runs."""
    return (
        f"@{login}, you have started {runs_per_hour} runs in the last hour, which is the limit here. "
        f"Please try `{trigger}` again in a while."
    )


def not_a_recipe_text(repo: str) -> str:
    """Return the one comment that says why a repository's pull requests cannot be tested."""
    return (
        f"This repository's name, `{repo}`, cannot be a Co-op Cloud recipe name (lowercase letters, digits, "
        "`.`, `_` and `-`, at most 64 characters), so ccci cannot test it. Rename the repository to test it here."
    )
