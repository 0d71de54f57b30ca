"""``python -m ccci serve``: gunicorn serving the app, with the worker as a supervised child.

gunicorn's master forks the web workers; the ccci worker (admission, dispatch, outbox) runs
as one more child process of this one, started with PDEATHSIG so it never outlives ``serve``,
and stopped with SIGTERM when gunicorn exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from gunicorn.app.base import BaseApplication

from ..config import Settings
from . import create_app

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class _Gunicorn(BaseApplication):
    def __init__(self, app, options: dict):
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(settings: Settings, *, bind: str, workers: int = 2) -> int:
    """Serve until SIGTERM/SIGINT; return 0 after a clean stop."""
    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)  # validates settings and creates the store before forking
    env = {**os.environ, **settings.to_env()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    worker = subprocess.Popen([sys.executable, "-m", "ccci", "worker"], env=env, preexec_fn=_die_with_parent)
    log.info("worker started as pid %s; serving on %s", worker.pid, bind)
    try:
        _Gunicorn(
            app,
            {
                "bind": bind,
                "workers": workers,
                "timeout": 30,
                "graceful_timeout": 30,
                "accesslog": "-",
            },
        ).run()
    finally:
        worker.terminate()
        worker.wait()
    return 0
