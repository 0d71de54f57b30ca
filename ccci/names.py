"""The shapes of the names ccci puts into paths, URLs and command lines, defined once.

A recipe name becomes a directory under ABRA_DIR and RECIPES_DIR, part of an app domain and a
Drone build parameter; a sha becomes a git argument. Every check uses ``fullmatch``: ``$`` in a
``match`` would let a trailing newline through.
"""

from __future__ import annotations

import re

RECIPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA = re.compile(r"[0-9a-f]{40}")


def is_recipe(name: str) -> bool:
    """Tell whether ``name`` is a recipe name: lowercase letters, digits, ``. _ -``, at most 64."""
    return isinstance(name, str) and RECIPE.fullmatch(name) is not None


def is_sha(text: str) -> bool:
    """Tell whether ``text`` is a full commit id: exactly 40 lowercase hex digits."""
    return isinstance(text, str) and SHA.fullmatch(text) is not None
