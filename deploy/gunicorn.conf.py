"""gunicorn settings for ccci's web app: ``gunicorn -c deploy/gunicorn.conf.py app:app`` from the repo root.

The web app only verifies, records and answers (the worker does the work), so every request is
short and CPU-light: plain sync workers, a few per core. Override any setting without editing
this file through ``GUNICORN_CMD_ARGS`` (e.g. ``--bind 0.0.0.0:9000 --workers 3``).
"""

import os

from ccci.config import default_state_dir, load_settings
from ccci.errors import ConfigError

# Behind the reverse proxy (deploy/nginx.conf) on loopback only.
bind = "127.0.0.1:8080"

# Sync workers: a request holds its worker for a few milliseconds (a webhook is an HMAC, a parse
# and one SQLite transaction), so a handful of processes serve far more than a forge sends.
# 2 x cores + 1 is gunicorn's rule of thumb; the cap keeps a big host from opening dozens of
# SQLite connections that would only queue on the database's single write lock.
workers = min(2 * (os.cpu_count() or 1) + 1, 9)
worker_class = "sync"

# The webhook answers in milliseconds; a worker silent for 30 s is stuck, and gunicorn replaces it.
timeout = 30
# On SIGHUP or SIGTERM, workers finish the request in hand for up to this long before being killed.
graceful_timeout = 30
# nginx holds the client connections; sync workers close theirs after each request anyway.
keepalive = 2

# Load the app once in the master before forking: a configuration error stops gunicorn at start
# with the key at fault, instead of every worker crashing in a loop. This is safe because
# ccci's Store opens its SQLite connections per process, lazily (ccci/store.py); the one the
# master opened to create the schema is closed before the first fork (when_ready below).
# The price: SIGHUP re-reads this file and replaces the workers, but the code and ccci's
# settings stay those the master loaded. Change either with a restart (see deploy/README.md).
preload_app = True

# Recycle workers now and then so a slow leak cannot grow without bound; the jitter keeps them
# from all restarting at the same moment.
max_requests = 2000
max_requests_jitter = 200

# Webhook deliveries carry about ten short headers; refuse anything far outside that early.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# The proxy on loopback is trusted to say who the client was (X-Forwarded-For, -Proto).
forwarded_allow_ips = "127.0.0.1,::1"

# The workers' heartbeat files live in memory, so a slow disk cannot make them look stuck.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# Logs to stderr, which systemd's journal collects. The access log names the peer and the real
# client (the proxy's X-Real-IP), the request, status, size and time taken in milliseconds;
# headers such as the webhook signature or the admin token are never logged.
# Lines are in ccci's format (time with zone, pid, level, logger; LOG_FORMAT = "json" for JSON),
# the same as the worker's, so the journal of both units reads as one log.
accesslog = "-"
errorlog = "-"
loglevel = "info"
access_log_format = '%(h)s %({x-real-ip}i)s "%(r)s" %(s)s %(B)s %(M)sms "%(a)s"'
logger_class = "ccci.web.server.GunicornLogger"

# gunicorn's control socket defaults to $XDG_RUNTIME_DIR or $HOME/.gunicorn, shared by every
# gunicorn of the user (and read-only under the systemd unit). It gets the unit's own runtime
# directory, which systemd names in $RUNTIME_DIRECTORY, and otherwise ccci's STATE_DIR.
if os.environ.get("RUNTIME_DIRECTORY"):
    control_socket = os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "gunicorn.ctl")
else:
    try:
        control_socket = str(load_settings().STATE_DIR / "gunicorn.ctl")
    except ConfigError:  # loading the app reports it, naming the key
        control_socket = str(default_state_dir() / "gunicorn.ctl")

proc_name = "ccci-web"


def when_ready(server):
    """Close the master's store connection before the first fork, so no worker inherits it."""
    if server.cfg.preload_app:  # otherwise the master never loaded the app
        server.app.wsgi().extensions["ccci"].store.close()
