"""Settings: code defaults < TOML file (``CCCI_CONFIG``) < ``CCCI_*`` environment.

Every key is declared once in ``FIELDS`` with its type, default and a one-line meaning; the
same table documents ``deploy/config.example.toml`` (a test keeps the two in step). Values are
validated when settings are loaded, and every error names the key at fault.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "CCCI_"
DURATION_KEYS = ("RUN_TIMEOUT", "LOCK_WAIT", "LOCK_LEAK_AFTER")


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one ccci installation, immutable once loaded."""

    FORGE_URL: str = ""
    FORGE_TOKEN: str = field(default="", repr=False)
    WEBHOOK_SECRET: str = field(default="", repr=False)
    ADMIN_TOKEN: str = field(default="", repr=False)
    BOT_LOGIN: str = ""
    STATE_DIR: Path = Path("./var")
    PUBLIC_URL: str = ""
    TRIGGER: str = "!testme"
    ALLOWED_USERS: tuple[str, ...] = ()
    ALLOWED_ORGS: tuple[str, ...] = ()
    DISPATCH: str = "local"
    DRONE_URL: str = ""
    DRONE_TOKEN: str = field(default="", repr=False)
    DRONE_REPO: str = ""
    EXECUTOR: str = "auto"
    MAX_RUNS: int = 2
    LOCK_DIR: Path = Path("/run/lock/ccci")
    LOCK_WAIT: int = 1800
    LOCK_LEAK_AFTER: int = 7200
    RUN_TIMEOUT: int = 3600
    RUNS_PER_HOUR: int = 20
    RECIPES_DIR: Path = REPO_ROOT / "recipes"
    ABRA_HOME: Path = Path.home() / ".abra"
    DOMAIN: str = "ci.localhost"
    MAX_BODY: int = 1024 * 1024
    KEEP_SANDBOX: bool = False
    SANDBOX_WRITABLE: tuple[str, ...] = ()
    # Guest machines (issue 11): images, warm bases, Docker forks.
    VM_MEMORY_MB: int = 0
    VM_TB_SIZE_MB: int = 256
    IMAGE_FILES: tuple[str, ...] = ()
    IMAGE_PACKAGES: tuple[str, ...] = ()
    REGISTRY_MIRROR: str = ""
    DOCKER_PRELOAD: tuple[str, ...] = ()
    DOCKER_SLOTS: int = 0

    @property
    def db_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.STATE_DIR / "ccci.db"

    @property
    def runs_dir(self) -> Path:
        """The parent of every run's own directory (sandbox, log, report)."""
        return self.STATE_DIR / "runs"

    def secrets(self) -> list[str]:
        """Return every configured secret value, for redaction."""
        return [v for v in (self.FORGE_TOKEN, self.WEBHOOK_SECRET, self.ADMIN_TOKEN, self.DRONE_TOKEN) if v]

    def to_env(self) -> dict[str, str]:
        """Render these settings as ``CCCI_*`` variables, for a child process."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[ENV_PREFIX + f.name] = str(value)
        return env

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and validated."""
        return _validated(replace(self, **changes))


DESCRIPTIONS = {
    "FORGE_URL": "Base URL of the Gitea/Forgejo forge, e.g. https://git.coopcloud.tech",
    "FORGE_TOKEN": "API token of ccci's forge account (scopes: write:issue, write:repository, read:organization)",
    "WEBHOOK_SECRET": "Shared secret of the forge webhook; with none, every delivery is refused",
    "ADMIN_TOKEN": "Bearer token for /admin; with none, the admin API is closed",
    "BOT_LOGIN": "ccci's own forge login, so that its own comments are never taken as commands",
    "STATE_DIR": "Where the database, run directories, images and logs live",
    "PUBLIC_URL": "How people reach this server, for links in comments and statuses",
    "TRIGGER": "The comment command that starts a run",
    "ALLOWED_USERS": "Logins that may trigger runs (comma-separated in the environment)",
    "ALLOWED_ORGS": "Members of these forge organisations may trigger runs",
    "DISPATCH": "Where runs execute: local (this host) or drone (Drone CI runners)",
    "DRONE_URL": "Base URL of the Drone server (DISPATCH=drone)",
    "DRONE_TOKEN": "Drone API token (DISPATCH=drone)",
    "DRONE_REPO": "owner/name of the Drone repository whose recipe-ci pipeline runs the harness",
    "EXECUTOR": "How steps run: auto, qemu (microVM forks) or local (process sandbox)",
    "MAX_RUNS": "How many runs the local worker executes at once",
    "LOCK_DIR": "Directory of the per-app lock files",
    "LOCK_WAIT": "Seconds a run waits for a busy app before giving up",
    "LOCK_LEAK_AFTER": "Seconds after which a held app lock is flagged as a possible leak",
    "RUN_TIMEOUT": "Default deadline of a whole run, in seconds",
    "RUNS_PER_HOUR": "How many runs one user may start per hour",
    "RECIPES_DIR": "Directory holding <recipe>/ci.yml for every recipe ccci knows",
    "ABRA_HOME": "The operator's canonical abra directory (servers/ and catalogue/ are shared from it)",
    "DOMAIN": "Test apps are deployed at <recipe>.<DOMAIN>",
    "MAX_BODY": "Largest webhook body accepted, in bytes",
    "KEEP_SANDBOX": "Keep each run's sandbox after it ends, for debugging",
    "SANDBOX_WRITABLE": "Host paths steps may write besides their checkout and ABRA_DIR (process sandbox)",
    "VM_MEMORY_MB": "Guest RAM of QEMU machines in MiB; 0: the image's own default (tiny 256, docker 1024)",
    "VM_TB_SIZE_MB": "TCG translation buffer of each QEMU in MiB (QEMU's own default, 1024, is mostly private memory)",
    "IMAGE_FILES": "Files put into the docker image, as GUEST_PATH=HOST_PATH (e.g. /usr/local/bin/abra=/opt/abra)",
    "IMAGE_PACKAGES": "Extra Debian packages for the docker image",
    "REGISTRY_MIRROR": "Registry Docker forks pull through: HOST:PORT or http(s)://HOST:PORT (127.0.0.1: this host)",
    "DOCKER_PRELOAD": "Image archives (docker save or OCI tarballs) loaded into the docker warm base",
    "DOCKER_SLOTS": "Runs that may hold Docker machines at once on this host; 0: one per CPU core; the rest wait",
}

_CHOICES = {"DISPATCH": ("local", "drone"), "EXECUTOR": ("auto", "qemu", "local")}
_LOGIN = re.compile(r"^[A-Za-z0-9_.-]+$")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Load settings from defaults, the ``CCCI_CONFIG`` file and ``CCCI_*`` variables."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_file = environ.get("CCCI_CONFIG")
    if config_file:
        raw.update(_read_toml(Path(config_file)))
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != "CCCI_CONFIG":
            name = key[len(ENV_PREFIX) :]
            if name in _FIELD_TYPES:
                raw[name] = value
    raw.update(overrides)
    return _validated(Settings(**{k: _coerce(k, v) for k, v in raw.items()}))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("CCCI_CONFIG", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("CCCI_CONFIG", f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {path}")
    return data


_FIELD_TYPES = {f.name: f.type for f in fields(Settings)}


def _coerce(key: str, value: Any) -> Any:
    if key not in _FIELD_TYPES:
        raise ConfigError(key, "unknown setting")
    kind = _FIELD_TYPES[key]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected a whole number")
            return int(value)
        if kind == "Path":
            return Path(str(value)).expanduser()
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {type(value).__name__}")
        return value.strip()
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from None


def _validated(s: Settings) -> Settings:
    for key, choices in _CHOICES.items():
        if getattr(s, key) not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {getattr(s, key)!r}")
    for key in ("FORGE_URL", "PUBLIC_URL", "DRONE_URL"):
        url = getattr(s, key)
        if url and (urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc):
            raise ConfigError(key, f"must be an http(s) URL, got {url!r}")
    for key in ("MAX_RUNS", "RUN_TIMEOUT", "MAX_BODY", "RUNS_PER_HOUR", "LOCK_LEAK_AFTER"):
        if getattr(s, key) < 1:
            raise ConfigError(key, "must be at least 1")
    for path in s.SANDBOX_WRITABLE:
        if not path.startswith("/"):
            raise ConfigError("SANDBOX_WRITABLE", f"{path!r} is not an absolute path")
    if s.LOCK_WAIT < 0:
        raise ConfigError("LOCK_WAIT", "must not be negative")
    if not s.TRIGGER.startswith("!") or any(c.isspace() for c in s.TRIGGER) or len(s.TRIGGER) < 2:
        raise ConfigError("TRIGGER", f"must be one word starting with '!', got {s.TRIGGER!r}")
    for key in ("ALLOWED_USERS", "ALLOWED_ORGS"):
        for login in getattr(s, key):
            if not _LOGIN.fullmatch(login):
                raise ConfigError(key, f"{login!r} is not a forge login")
    if s.DRONE_REPO and not re.fullmatch(r"[\w.-]+/[\w.-]+", s.DRONE_REPO):
        raise ConfigError("DRONE_REPO", f"must be owner/name, got {s.DRONE_REPO!r}")
    if s.DISPATCH == "drone":
        for key in ("DRONE_URL", "DRONE_TOKEN", "DRONE_REPO"):
            if not getattr(s, key):
                raise ConfigError(key, "is required when DISPATCH is drone")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", s.DOMAIN):
        raise ConfigError("DOMAIN", f"must be a DNS name, got {s.DOMAIN!r}")
    return s
