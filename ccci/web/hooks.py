"""``POST /hooks/forge``: verify, record, answer. The work happens elsewhere."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify, request

from ..intake.delivery import handle_delivery
from . import services

bp = Blueprint("hooks", __name__)


@bp.post("/hooks/forge")
def forge_hook():
    """Accept a Gitea/Forgejo webhook delivery."""
    s = services()
    outcome = handle_delivery(s.settings, s.store, s.reporter, request.headers, request.get_data(cache=False))
    if outcome.wake_worker:
        s.doorbell.ring()
    return jsonify(outcome.body), outcome.status


def init_app(app: Flask) -> None:
    """Register the webhook endpoint and JSON errors for bodies that are too large."""
    app.register_blueprint(bp)

    @app.errorhandler(413)
    def too_large(_error):
        return jsonify({"error": f"body larger than {services().settings.MAX_BODY} bytes"}), 413
