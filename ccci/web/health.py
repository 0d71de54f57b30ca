"""``GET /healthz`` (is ccci doing its job?) and ``GET /metrics`` (Prometheus text format).

Health is more than "the process answers": ``/healthz`` answers 503 when the store cannot be
read, when the worker has not completed a pass for ``WORKER_STALE_AFTER`` (it is stuck, dead,
or was never started), or when a forge write has waited ``OUTBOX_STALE_AFTER`` (the forge has
been refusing or unreachable for that long). The JSON body names each check and what it found.
"""

from __future__ import annotations

import sqlite3
import time

from flask import Blueprint, Flask, Response, jsonify

from ..metrics import CONTENT_TYPE, exposition
from . import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Answer 200 when every check passes, else 503; the body says what each check found."""
    s = services()
    checks: dict[str, str] = {}
    try:
        beat = s.store.heartbeat("worker")
        oldest = s.store.outbox_stats()["oldest_pending"]
        checks["store"] = "ok"
    except sqlite3.Error as exc:
        return jsonify({"ok": False, "checks": {"store": f"the store cannot be read: {exc}"}}), 503
    now = time.time()
    stale = s.settings.WORKER_STALE_AFTER
    if beat is None:
        checks["worker"] = "the worker has never completed a pass (is ccci-worker running?)"
    elif now - beat > stale:
        checks["worker"] = f"the worker has not completed a pass for {now - beat:.0f} s (limit {stale} s)"
    else:
        checks["worker"] = "ok"
    waited = now - oldest if oldest is not None else 0.0
    if waited > s.settings.OUTBOX_STALE_AFTER:
        checks["outbox"] = (
            f"the oldest forge write has waited {waited:.0f} s (limit {s.settings.OUTBOX_STALE_AFTER} s); "
            "is the forge reachable?"
        )
    else:
        checks["outbox"] = "ok"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"ok": ok, "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
def metrics():
    """Expose runs, durations, webhook deliveries, the outbox and forge errors, read from the store now."""
    return Response(exposition(services().store), content_type=CONTENT_TYPE)


def init_app(app: Flask) -> None:
    """Register health and metrics."""
    app.register_blueprint(bp)
