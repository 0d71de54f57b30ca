"""The shapes of the names ccci puts into paths, URLs and command lines, defined once.

A recipe name becomes a directory under ABRA_DIR and RECIPES_DIR, part of an app domain and a
Drone build parameter; a sha becomes a git argument; a repository name and a login become URL
path segments; an app domain names a lock file. Intake, the harness, dispatch and the settings
all check against these, so a name the webhook accepts is a name every later stage accepts too.
Every check uses ``fullmatch``: ``$`` in a ``match`` would let a trailing newline through.
"""

from __future__ import annotations

import re
from typing import TypeGuard

RECIPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A commit id: SHA-1 (40 hex digits) or, for repositories in git's SHA-256 object format, 64.
SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Gitea's names are [A-Za-z0-9_.-]; refusing a leading '.' or '-' keeps "..", option-like
# arguments ("-x") and hidden paths out of the URLs and paths these become.
REPO_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
LOGIN = re.compile(r"[A-Za-z0-9_.-]{1,100}")
APP_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# What a URL handed to git and to a runner's shell may contain: nothing a shell gives a meaning to.
URL_CHARS = re.compile(r"[A-Za-z0-9._~:/%+-]+")
MAX_ID = 2**63 - 1  # forge ids (comments, PRs) are int64, and so are SQLite's integers


def is_recipe(name: object) -> bool:
    """Tell whether ``name`` is a recipe name: lowercase letters, digits, ``. _ -``, at most 64."""
    return isinstance(name, str) and RECIPE.fullmatch(name) is not None


def is_sha(text: object) -> bool:
    """Tell whether ``text`` is a full commit id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits."""
    return isinstance(text, str) and SHA.fullmatch(text) is not None


def is_id(value: object) -> TypeGuard[int]:
    """Tell whether ``value`` is a forge id or number: an int from 1 to 2^63 - 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def is_repo_name(name: object) -> bool:
    """Tell whether ``name`` is safe as a repository owner or name (a URL path segment)."""
    return isinstance(name, str) and REPO_NAME.fullmatch(name) is not None


def is_login(login: object) -> bool:
    """Tell whether ``login`` is a forge login."""
    return isinstance(login, str) and LOGIN.fullmatch(login) is not None


def is_app_domain(domain: object) -> bool:
    """Tell whether ``domain`` is an app domain: a lowercase DNS name."""
    return isinstance(domain, str) and APP_DOMAIN.fullmatch(domain) is not None
