"""The admin API: ``GET /admin/runs`` and ``POST /admin/runs/<id>/cancel`` behind a bearer token."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from functools import wraps

from flask import Blueprint, Flask, jsonify, request

from ..harness.applock import list_locks
from ..names import MAX_ID, is_id
from ..store import STATES
from . import services

bp = Blueprint("admin", __name__, url_prefix="/admin")


def require_admin(view):
    """Refuse the request with 401 unless it carries ``Authorization: Bearer <ADMIN_TOKEN>``."""

    @wraps(view)
    def guarded(*args, **kwargs):
        token = services().settings.ADMIN_TOKEN
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # With no ADMIN_TOKEN configured the admin API is closed, never open.
        if not token or scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            return jsonify({"error": "a valid admin bearer token is required"}), 401
        return view(*args, **kwargs)

    return guarded


@bp.get("/runs")
@require_admin
def list_runs():
    """List runs, newest first; filter with ?state=, ?recipe=, ?repo=owner/name, ?pr=."""
    s = services()
    states = tuple(x for x in request.args.getlist("state") if x)
    unknown = [x for x in states if x not in STATES]
    if unknown:
        return jsonify({"error": f"unknown state {unknown[0]!r}; one of {', '.join(STATES)}"}), 400
    owner = repo = None
    if request.args.get("repo"):
        owner, _, repo = request.args["repo"].partition("/")
    try:
        pr = _number("pr")
        limit = min(_number("limit") or 100, 1000)
    except ValueError as exc:
        return jsonify({"error": str(exc)}), 400
    runs = s.store.list_runs(
        states=states or None,
        recipe=request.args.get("recipe"),
        owner=owner,
        repo=repo or None,
        pr=pr,
        limit=limit,
    )
    locks = [_lock(lock.to_dict()) for lock in list_locks(s.settings.LOCK_DIR, s.settings.LOCK_LEAK_AFTER)]
    return jsonify({"runs": [summary(r) for r in runs], "locks": locks})


@bp.post("/runs/<int:run_id>/cancel")
@require_admin
def cancel_run(run_id: int):
    """Cancel a queued or running run: 202 accepted, 404 unknown, 409 already finished."""
    s = services()
    run = s.store.get_run(run_id)
    if run is None or run.state == "refused":
        return jsonify({"error": f"no run {run_id}"}), 404
    by = request.args.get("by") or "an operator"
    if not s.store.request_cancel(run_id, by):
        return jsonify({"error": f"run {run_id} already finished ({run.state})"}), 409
    s.doorbell.ring()
    return jsonify({"result": "cancel requested", "run": run_id}), 202


def _number(name: str) -> int | None:
    """Return query parameter ``name`` as a positive number, None when absent; ValueError when malformed."""
    raw = request.args.get(name, "")
    if not raw:
        return None
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else 0
    if not is_id(value):
        raise ValueError(f"{name} must be a whole number from 1 to {MAX_ID}, got {raw[:40]!r}")
    return value


# Columns SQLite keeps as 0/1 and epoch seconds, shown as booleans and ISO-8601 times.
FLAGS = ("authorized", "admitted", "cancel_requested")
TIMES = ("created_at", "started_at", "finished_at")


def summary(run) -> dict:
    """Return a run for people and tools: ISO-8601 times (UTC), booleans, the verdict, no report."""
    data = run.to_dict()
    report = data.pop("report")
    data["passed"] = report.get("passed") if report else None
    for key in FLAGS:
        data[key] = bool(data[key])
    for key in TIMES:
        data[key] = iso_time(data[key])
    return data


def iso_time(epoch: float | None) -> str | None:
    """Return epoch seconds as ISO-8601 in UTC (``2026-11-24T10:00:00.123+00:00``), None as None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _lock(data: dict) -> dict:
    if data.get("holder"):
        data["holder"] = {**data["holder"], "started_at": iso_time(data["holder"].get("started_at") or None)}
    return data


def init_app(app: Flask) -> None:
    """Register the admin API."""
    app.register_blueprint(bp)
