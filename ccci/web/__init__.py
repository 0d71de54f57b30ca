"""The Flask application: webhook intake, run pages, admin API, health and metrics."""

from __future__ import annotations

from flask import Flask, current_app

from .. import logs
from ..config import Settings, load_settings
from ..doorbell import Doorbell
from ..forge import repo_web_url
from ..reporter import Reporter
from ..store import Store


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app for ``settings`` (loaded from the environment when omitted)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    # Werkzeug answers 413 itself when a body is larger than this, before any view runs.
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_BODY
    app.extensions["ccci"] = Services(settings)
    app.add_template_filter(repo_web_url, "repo_url")  # the run page links back to the PR and commit
    logs.setup(settings.LOG_LEVEL, settings.LOG_FORMAT)  # gunicorn app:app has no ccci main() to do it

    from . import admin, health, hooks, runs

    for module in (hooks, runs, admin, health):
        module.init_app(app)
    return app


class Services:
    """What views share: the settings, the store, the reporter and the worker's doorbell."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.db_path)
        self.reporter = Reporter(self.store, settings)
        self.doorbell = Doorbell(settings.STATE_DIR / "worker.sock")


def services() -> Services:
    """Return the current app's services."""
    return current_app.extensions["ccci"]
