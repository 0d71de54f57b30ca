"""``GET /healthz`` and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, jsonify

from ..store import STATES
from . import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Answer 200 when the store answers."""
    s = services()
    s.store.state_counts()
    return jsonify({"ok": True})


@bp.get("/metrics")
def metrics():
    """Expose run counts by state and the outbox backlog."""
    s = services()
    counts = s.store.state_counts()
    lines = [
        "# HELP ccci_runs Runs by state.",
        "# TYPE ccci_runs gauge",
        *(f'ccci_runs{{state="{state}"}} {counts.get(state, 0)}' for state in STATES),
        "# HELP ccci_outbox_backlog Forge writes not yet delivered.",
        "# TYPE ccci_outbox_backlog gauge",
        f"ccci_outbox_backlog {s.store.outbox_backlog()}",
    ]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def init_app(app: Flask) -> None:
    """Register health and metrics."""
    app.register_blueprint(bp)
