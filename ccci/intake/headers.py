"""A delivery's HTTP headers as intake reads them: every value of a name, whatever its case.

The webhook view passes werkzeug's ``Headers`` and the tests pass plain dicts; both have
``items()``, which is all intake uses, so a repeated name (a client that sent both
``X-Gitea-Signature`` and ``x-gitea-signature``) is seen in full rather than shadowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Headers(Protocol):
    """Anything with header (name, value) pairs: werkzeug's Headers, or a dict."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def values_by_name(headers: Headers) -> dict[str, list[str]]:
    """Collect header values by lower-cased name, keeping every value of a repeated name."""
    out: dict[str, list[str]] = {}
    for name, value in headers.items():
        out.setdefault(str(name).lower(), []).append(str(value))
    return out


def first_value(headers: Headers, *names: str) -> str:
    """Return the first non-empty value among ``names``, whatever the case of the keys."""
    values = values_by_name(headers)
    for name in names:
        for value in values.get(name.lower(), ()):
            if value.strip():
                return value.strip()
    return ""
