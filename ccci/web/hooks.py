"""``POST /hooks/forge``: verify, record, answer. The work happens elsewhere.

Every delivery leaves one log line saying what was decided — delivery id, event, repository,
HTTP status, result and reason — refused and ignored ones included, since those are the ones
an operator is looking for when a ``!testme`` seems to vanish.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from flask import Blueprint, Flask, jsonify, request

from .. import logs
from ..intake.delivery import handle_delivery
from . import services

bp = Blueprint("hooks", __name__)
log = logging.getLogger(__name__)
# What the body says when there is no "result": the refusals before any parsing.
_RESULT_OF_STATUS = {400: "malformed", 401: "unauthorized", 413: "too_large"}


@bp.post("/hooks/forge")
def forge_hook():
    """Accept a Gitea/Forgejo webhook delivery."""
    s = services()
    body = request.get_data(cache=False)
    answer = handle_delivery(s.settings, s.store, s.reporter, request.headers, body)
    if answer.wake_worker:
        s.doorbell.ring()
    _decided(answer.status, answer.body, body)
    return jsonify(answer.body), answer.status


def _decided(status: int, answer: dict[str, Any], body: bytes = b"") -> None:
    """Log the decision about this delivery, and count it by result for /metrics."""
    result = answer.get("result") or _RESULT_OF_STATUS.get(status, str(status))
    try:
        services().store.count("webhook_deliveries", result)
    except sqlite3.Error:  # a metric must never change what the forge is answered
        log.exception("counting a webhook delivery (%s) failed", result)
    reason = answer.get("reason") or answer.get("error") or answer.get("authorization") or ""
    log.info(
        "webhook",
        extra=logs.fields(
            delivery=_header("X-Gitea-Delivery", "X-Forgejo-Delivery"),
            event=_header("X-Gitea-Event-Type", "X-Forgejo-Event-Type", "X-Gitea-Event", "X-Forgejo-Event"),
            repo=_repository(body),
            status=status,
            result=result,
            reason=str(reason)[:300],
            run=answer.get("run"),
        ),
    )


def _header(*names: str) -> str:
    """Return the first of these request headers that is set (Gitea's or Forgejo's name), clipped."""
    return next((request.headers[n] for n in names if request.headers.get(n)), "")[:64]


def _repository(body: bytes) -> str:
    """Return the repository a delivery names (as it claims it: a refused one is not verified)."""
    try:
        repo = json.loads(body).get("repository") or {}
        return str(repo.get("full_name") or "")[:200]
    except (ValueError, AttributeError, RecursionError):  # what handle_delivery answered 400 to
        return ""


def init_app(app: Flask) -> None:
    """Register the webhook endpoint and JSON errors for bodies that are too large."""
    app.register_blueprint(bp)

    @app.errorhandler(413)
    def too_large(_error):
        answer = {"error": f"body larger than {services().settings.MAX_BODY} bytes"}
        if request.path == "/hooks/forge":
            _decided(413, answer)
        return jsonify(answer), 413
