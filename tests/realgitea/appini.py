"""The app.ini of a test Gitea: everything it needs to run headless, offline, on loopback.

Keys are the ones research/real-gitea.md §1.4–1.5 checked against Gitea's source, and what
the suite relies on: a fixed loopback port (ROOT_URL, so clone URLs and webhook payloads name
it), SQLite under the instance's directory, webhooks allowed to loopback with a delivery
timeout long enough for a test to hold one on its way, no mailer, no update checker, no
avatars from outside, the root override only when running as root, and secrets of its own.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path


def write_app_ini(directory: Path, static_root: Path, port: int) -> Path:
    """Write the app.ini of an instance serving ``directory`` on ``port``; return its path."""
    ini = directory / "custom" / "conf" / "app.ini"
    root_section = "I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true\n" if os.geteuid() == 0 else ""
    jwt = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    ini.write_text(
        f"""; written by tests/realgitea/appini.py for ccci's tests: throwaway, loopback only
APP_NAME = ccci-test
RUN_MODE = prod
WORK_PATH = {directory}
{root_section}
[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = {port}
ROOT_URL = http://127.0.0.1:{port}/
LOCAL_ROOT_URL = http://127.0.0.1:{port}/
STATIC_ROOT_PATH = {static_root}
APP_DATA_PATH = {directory}/data
DISABLE_SSH = true
START_SSH_SERVER = false
LFS_START_SERVER = false
OFFLINE_MODE = true
GRACEFUL_HAMMER_TIME = 5s

[database]
DB_TYPE = sqlite3
PATH = {directory}/data/gitea.db
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT = {directory}/data/repos
DEFAULT_BRANCH = main

[security]
INSTALL_LOCK = true
SECRET_KEY = {secrets.token_hex(32)}
INTERNAL_TOKEN = {secrets.token_hex(32)}
PASSWORD_CHECK_PWN = false

[oauth2]
ENABLED = false
JWT_SECRET = {jwt}

[service]
DISABLE_REGISTRATION = true
REQUIRE_SIGNIN_VIEW = false
DEFAULT_ALLOW_CREATE_ORGANIZATION = true
ENABLE_NOTIFY_MAIL = false
ENABLE_CAPTCHA = false

[mailer]
ENABLED = false

[webhook]
ALLOWED_HOST_LIST = loopback
DELIVER_TIMEOUT = 20

[queue]
TYPE = channel

[indexer]
ISSUE_INDEXER_TYPE = db
REPO_INDEXER_ENABLED = false

[actions]
ENABLED = false

[packages]
ENABLED = false

[cron.update_checker]
ENABLED = false

[picture]
DISABLE_GRAVATAR = true
ENABLE_FEDERATED_AVATAR = false

[api]
ENABLE_SWAGGER = false

[log]
MODE = console
LEVEL = Info
ROOT_PATH = {directory}/log
logger.router.MODE =
"""
    )
    return ini
