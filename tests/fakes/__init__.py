"""The fake world tests build around ccci: webhook payloads, signed headers, a forge, git repos.

``load_payload`` and ``sign`` produce deliveries byte-for-byte like the ones Gitea and Forgejo
send (docs/protocols.md §1.1, §1.3); ``FakeGitea`` (tests/fakes/gitea.py) answers ccci's API calls
and serves clones; ``tests/fakes/gitrepo.py`` builds real recipe repositories.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
DELETE = object()  # an override value that removes the key


def load_payload(name: str, **overrides: Any) -> dict[str, Any]:
    """Load ``tests/payloads/<name>.json``, setting nested keys given as ``comment__body="…"``.

    An override of ``None`` for a key stores JSON null; ``DELETE`` removes the key.
    """
    path = PAYLOADS / (name if name.endswith(".json") else name + ".json")
    payload = json.loads(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = payload
        for key in parents:
            node = node[key]
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return payload


def sign(
    body: bytes,
    secret: str,
    *,
    forge: str = "gitea",
    event: str = "issue_comment",
    event_type: str | None = None,
    delivery: str | None = None,
) -> dict[str, str]:
    """Return the exact header set Gitea (or Forgejo) sends with ``body`` signed by ``secret``.

    ``event_type`` defaults to ``pull_request_comment`` for ``issue_comment`` (what a PR
    comment sends) and to ``event`` otherwise. An empty secret gives the empty signatures a
    hook without a secret sends.
    """
    if event_type is None:
        event_type = "pull_request_comment" if event == "issue_comment" else event
    delivery = delivery or str(uuid.uuid4())
    key = secret.encode("utf-8")
    sha256 = hmac.new(key, body, hashlib.sha256).hexdigest() if secret else ""
    sha1 = hmac.new(key, body, hashlib.sha1).hexdigest() if secret else ""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Go-http-client/1.1",
        "X-Gitea-Delivery": delivery,
        "X-Gogs-Delivery": delivery,
        "X-GitHub-Delivery": delivery,
        "X-Gitea-Event": event,
        "X-Gogs-Event": event,
        "X-GitHub-Event": event,
        "X-Gitea-Event-Type": event_type,
        "X-Gogs-Event-Type": event_type,
        "X-GitHub-Event-Type": event_type,
        "X-Gitea-Signature": sha256,
        "X-Gogs-Signature": sha256,
        "X-Hub-Signature": "sha1=" + sha1,
        "X-Hub-Signature-256": "sha256=" + sha256,
    }
    if forge == "forgejo":
        headers.update(
            {
                "X-Forgejo-Delivery": delivery,
                "X-Forgejo-Event": event,
                "X-Forgejo-Event-Type": event_type,
                "X-Forgejo-Signature": sha256,
            }
        )
    elif forge != "gitea":
        raise ValueError(f"forge must be gitea or forgejo, not {forge!r}")
    return headers


def delivery(
    name: str, secret: str, *, forge: str = "gitea", event: str = "issue_comment", **overrides: Any
) -> tuple[dict[str, str], bytes]:
    """Return ``(headers, body)`` of a signed delivery of payload ``name`` with ``overrides``."""
    body = json.dumps(load_payload(name, **overrides)).encode("utf-8")
    return sign(body, secret, forge=forge, event=event), body
