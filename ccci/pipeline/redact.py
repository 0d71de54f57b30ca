"""Redaction: secret values replaced by a fixed marker before any text leaves ccci.

Every secret is redacted, however short: a one-character secret destroys the output it is
redacted from, but a leak is worse. Short secrets are refused where they are configured instead
(``spec.MIN_SECRET`` for ci.yml env marked secret). Longer secrets are replaced first, so that a
secret containing another one is replaced whole. Text that was cut (bounded output, comment
limits) can end inside a secret; ``strip_partial`` removes such a dangling piece at a cut edge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MARKER = "[redacted]"


class Redactor:
    """Replaces the known secret values in text and bytes; every output path shares one."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets: tuple[str, ...] = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        # One alternation, longest first: the regex engine tries alternatives in order, so at
        # any position the longest matching secret wins.
        self._text = re.compile("|".join(re.escape(s) for s in self.secrets)) if self.secrets else None
        self._bytes = re.compile(b"|".join(re.escape(s.encode()) for s in self.secrets)) if self.secrets else None

    def __call__(self, text: str) -> str:
        """Return ``text`` with every secret replaced by the marker."""
        return self._text.sub(MARKER, text) if self._text else text

    def redact_bytes(self, data: bytes) -> bytes:
        """Return ``data`` with every secret's UTF-8 encoding replaced by the marker."""
        return self._bytes.sub(MARKER.encode(), data) if self._bytes else data

    def strip_partial(self, text: str, *, at_end: bool) -> str:
        """Drop a piece of a secret left at the cut end (``at_end``) or cut start of ``text``."""
        for secret in self.secrets:
            for k in range(len(secret) - 1, 0, -1):
                if at_end and text.endswith(secret[:k]):
                    text = text[: len(text) - k]
                    break
                if not at_end and text.startswith(secret[-k:]):
                    text = text[k:]
                    break
        return text

    def extend(self, secrets: Iterable[str]) -> Redactor:
        """Return a redactor that also knows ``secrets``."""
        return Redactor((*self.secrets, *secrets))
