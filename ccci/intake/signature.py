"""The webhook signature: proof that a delivery comes from the forge that knows our secret.

Gitea and Forgejo sign the raw request body with HMAC-SHA256 under the hook's secret and send
the same digest in several headers (docs/protocols.md §1.1, §1.3)::

    X-Gitea-Signature:   <hex>          (Gitea, Forgejo)
    X-Forgejo-Signature: <hex>          (Forgejo)
    X-Gogs-Signature:    <hex>          (Gitea, Forgejo)
    X-Hub-Signature-256: sha256=<hex>   (Gitea, Forgejo)
    X-Hub-Signature:     sha1=<hex>     (Gitea, Forgejo; HMAC-SHA1, legacy)

The rule, chosen so that no extra or forged header can tip the answer:

* no secret configured → every delivery is refused (fail closed; Atlantis fails open here);
* at least one SHA-256 header must be present, and *every* signature header present —
  the SHA-1 one included — must be well formed and match the body; one bad header refuses
  the delivery even if another is good;
* a SHA-1 header alone is never enough;
* hex digits may be upper or lower case (they decode to the same digest); anything but
  exactly the digest's length in hex, after the ``sha256=``/``sha1=`` prefix where the header
  has one, is malformed;
* every comparison is constant-time (``hmac.compare_digest`` over the decoded bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from .headers import Headers, values_by_name

# lower-cased header name -> the prefix before its hex digest
_SHA256_HEADERS = {
    "x-gitea-signature": "",
    "x-forgejo-signature": "",
    "x-gogs-signature": "",
    "x-hub-signature-256": "sha256=",
}
_SHA1_HEADER = ("x-hub-signature", "sha1=")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_HEX40 = re.compile(r"[0-9A-Fa-f]{40}")


def verify_signature(headers: Headers, body: bytes, secret: str) -> bool:
    """Return True only if every signature header present matches ``body`` under ``secret``."""
    if not secret:
        return False
    values = values_by_name(headers)
    key = secret.encode("utf-8")
    sha256_seen = False
    for name, prefix in _SHA256_HEADERS.items():
        for value in values.get(name, ()):
            sha256_seen = True
            if not _matches(value, prefix, _HEX64, hmac.new(key, body, hashlib.sha256).digest()):
                return False
    name, prefix = _SHA1_HEADER
    for value in values.get(name, ()):
        if not _matches(value, prefix, _HEX40, hmac.new(key, body, hashlib.sha1).digest()):
            return False
    return sha256_seen


def _matches(value: str, prefix: str, shape: re.Pattern[str], expected: bytes) -> bool:
    value = value.strip()
    if not value.startswith(prefix):
        return False
    digest = value[len(prefix) :]
    if not shape.fullmatch(digest):
        return False
    return hmac.compare_digest(bytes.fromhex(digest), expected)
