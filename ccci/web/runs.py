"""Run pages: ``GET /runs/<id>`` (HTML, or JSON on request) and ``GET /runs/<id>/log``."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, abort, jsonify, render_template, request, send_from_directory

from ..harness.runfiles import RunFiles
from ..pipeline.redact import Redactor
from . import services

bp = Blueprint("runs", __name__, template_folder="templates")


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def _visible_run(run_id: int):
    """Return the run, or answer 404 (refused requests are not runs anyone can look at)."""
    run = services().store.get_run(run_id)
    if run is None or run.state == "refused":
        abort(404)
    return run


@bp.get("/runs/<int:run_id>")
def run_page(run_id: int):
    """Show one run: verdict, steps, metrics, durations and the log."""
    s = services()
    run = _visible_run(run_id)
    report = run.report_dict() or RunFiles(s.settings.runs_dir, run_id).read_report()
    if _wants_json():
        data = run.to_dict()
        data["report"] = report
        return jsonify(data)
    return render_template("run.html", run=run, report=report, public_url=s.settings.PUBLIC_URL)


@bp.get("/runs/<int:run_id>/log")
def run_log(run_id: int):
    """Return the run's log as plain text (the part written so far while it runs)."""
    s = services()
    run = _visible_run(run_id)
    offset = request.args.get("offset", default=0, type=int)
    text, end = RunFiles(s.settings.runs_dir, run_id).read_log(offset=max(offset, 0))
    text = Redactor(s.settings.secrets())(text)  # the harness never held the web's own secrets
    return Response(text, mimetype="text/plain", headers={"X-Log-Offset": str(end), "X-Run-State": run.state})


@bp.get("/runs/<int:run_id>/artifacts/<path:name>")
def run_artifact(run_id: int, name: str):
    """Serve one artifact the run's steps kept (a report, a screenshot) as a download.

    A PR wrote it: it is never a page of ccci's origin. It is served as an attachment, with no
    sniffing, and under a sandbox policy that stops any script in it from running here.
    """
    _visible_run(run_id)
    # send_from_directory refuses paths that escape the directory (.., absolute paths).
    response = send_from_directory(RunFiles(services().settings.runs_dir, run_id).artifacts, name, as_attachment=True)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "sandbox"
    return response


def init_app(app: Flask) -> None:
    """Register the run pages."""
    app.register_blueprint(bp)
