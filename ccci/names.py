"""The shapes of the names ccci puts into paths, URLs and command lines, defined once.

A recipe name becomes a directory under ABRA_DIR and RECIPES_DIR, part of an app domain and a
Drone build parameter; a sha becomes a git argument. Every check uses ``fullmatch``: ``$`` in a
``match`` would let a trailing newline through.
"""

from __future__ import annotations

import re

RECIPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA = re.compile(r"[0-9a-f]{40}")
MAX_ID = 2**63 - 1  # forge ids (comments, PRs) are int64, and so are SQLite's integers


def is_recipe(name: str) -> bool:
    """Tell whether ``name`` is a recipe name: lowercase letters, digits, ``. _ -``, at most 64."""
    return isinstance(name, str) and RECIPE.fullmatch(name) is not None


def is_sha(text: str) -> bool:
    """Tell whether ``text`` is a full commit id: exactly 40 lowercase hex digits."""
    return isinstance(text, str) and SHA.fullmatch(text) is not None


def is_id(value: object) -> bool:
    """Tell whether ``value`` is a forge id or number: an int from 1 to 2^63 - 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID
