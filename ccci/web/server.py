"""``ccci serve``: gunicorn serving the app, with the worker as a supervised child.

gunicorn's master forks the web workers; the ccci worker (admission, dispatch, outbox) runs
as one more child process of this one, started with PDEATHSIG so it never outlives ``serve``,
and stopped with SIGTERM when gunicorn exits. The worker starts only once gunicorn listens
(its ``when_ready`` hook): a ``serve`` that cannot have its address fails before it has swept,
adopted or started anything. gunicorn's control socket lives in STATE_DIR, one per installation.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from .. import logs
from ..config import Settings
from ..errors import CcciError
from . import create_app

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# gunicorn's access line without a timestamp of its own: ccci's format puts one in front.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms "%(a)s"'

# gunicorn forks its web workers from the main thread while the supervisor's thread may be inside
# Popen. A web worker forked then inherits Popen's error pipe and holds it open, and Popen waits
# for that web worker to exit before it returns (the worker seen dead is not restarted for as long).
# So forks and spawns take turns: every os.fork() of this process waits for a spawn in progress.
_SPAWNING = threading.RLock()  # reentrant: Popen's own fork (for preexec_fn) runs the same hooks
os.register_at_fork(before=_SPAWNING.acquire, after_in_parent=_SPAWNING.release, after_in_child=_SPAWNING.release)


class GunicornLogger(Logger):
    """gunicorn's logger writing ccci's line format, so its lines and ccci's read alike."""

    def setup(self, cfg) -> None:
        """Set gunicorn's handlers up as it does, then give them ccci's formatter."""
        super().setup(cfg)
        for handler in (*self.error_log.handlers, *self.access_log.handlers):
            handler.setFormatter(logs.Formatter())


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


class WorkerSupervisor:
    """Keeps one ``python -m ccci worker`` alive beside gunicorn, restarting it if it dies.

    The worker is spawned from this object's own long-lived thread: PDEATHSIG follows the thread
    that spawned a process, and this thread lives as long as ``serve``. A worker that dies is
    started again after a pause that grows while it keeps dying; the new worker recovers
    (adopts or reports the old one's runs) before it does anything else.
    """

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="ccci-worker-supervisor", daemon=True)

    def start(self) -> None:
        """Start the worker and keep it running."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (SIGTERM) and wait for it; nothing to do if it never started."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _supervise(self) -> None:
        pause = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            with _SPAWNING:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "ccci", "worker"], env=self.env, preexec_fn=_die_with_parent
                )
            log.info("worker started as pid %s", self.proc.pid)
            while self.proc.poll() is None and not self._stopping.wait(0.5):
                pass  # gunicorn's arbiter reaps children too, so poll rather than block in wait()
            if self._stopping.is_set():
                break
            log.error("the worker (pid %s) exited with %s; restarting it in %.0fs", self.proc.pid,
                      self.proc.returncode, pause)  # fmt: skip
            pause = 1.0 if time.monotonic() - started > 60 else min(pause * 2, 60.0)
            self._stopping.wait(pause)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass


def startup_warnings(settings: Settings) -> list[str]:
    """Return what an operator should fix before ccci can do its job, as sentences."""
    warnings = []
    if not settings.WEBHOOK_SECRET:
        warnings.append(
            "no WEBHOOK_SECRET is set: every webhook delivery will be refused (401); set CCCI_WEBHOOK_SECRET"
        )
    if not settings.ALLOWED_USERS and not settings.ALLOWED_ORGS:
        warnings.append("neither ALLOWED_USERS nor ALLOWED_ORGS is set: nobody may trigger runs")
    if not settings.FORGE_URL or not settings.FORGE_TOKEN:
        warnings.append("FORGE_URL and FORGE_TOKEN are needed to acknowledge and report on the forge")
    if not settings.ADMIN_TOKEN:
        warnings.append("no ADMIN_TOKEN is set: the admin API is closed")
    return warnings


def check_bind(bind: str) -> None:
    """Refuse, in a sentence, a HOST:PORT something else already listens on."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise CcciError(f"serve: --bind {bind!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CcciError(f"serve: cannot listen on {bind}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CcciError(
                    f"serve: {bind} is already in use (another ccci serve?); stop what listens there "
                    "or pass --bind HOST:PORT"
                ) from None
            raise CcciError(f"serve: cannot listen on {bind}: {exc.strerror}") from None


def serve(settings: Settings, *, bind: str, workers: int = 2) -> int:
    """Serve until SIGTERM/SIGINT; return 0 after a clean stop."""
    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    check_bind(bind)  # fail in a sentence, not after gunicorn's five retries
    app = create_app(settings)  # validates settings and creates the store before forking
    env = {**os.environ, **settings.to_env()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    supervisor = WorkerSupervisor(env)

    def when_ready(_arbiter) -> None:  # gunicorn listens: now the worker may start
        supervisor.start()

    log.info("serving on %s", bind)
    try:
        _Gunicorn(app, {
            "bind": bind,
            "workers": workers,
            "timeout": 30,
            "graceful_timeout": 30,
            "accesslog": "-",
            "access_log_format": ACCESS_LOG_FORMAT,
            "logger_class": GunicornLogger,
            "loglevel": settings.LOG_LEVEL,
            "control_socket": str(settings.STATE_DIR / "gunicorn.ctl"),
            "when_ready": when_ready,
        }).run()  # fmt: skip
    except SystemExit as exc:  # gunicorn exits when it cannot start; its reason is in the log above
        if exc.code not in (None, 0):
            raise CcciError(
                f"serve: gunicorn could not start on {bind} (exit {exc.code}); see the lines above"
            ) from None
    finally:
        supervisor.stop()
    return 0
