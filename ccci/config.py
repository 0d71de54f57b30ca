"""Settings: code defaults < TOML file (``CCCI_CONFIG``) < ``CCCI_*`` environment.

Every key is one field of ``Settings``, with its type, its default and its one-line meaning in
``metadata["doc"]``; the same meanings document ``deploy/config.example.toml`` (a test keeps the
two in step). Values are validated when settings are loaded, and every error names the key at
fault. Types are strict: a whole number is never a fraction, a path is text, durations are
whole seconds or carry units (``90s``, ``30m``, ``1h30m``).

Paths are made absolute once, here: relative paths in the TOML file are relative to that file,
relative paths in the environment to the directory ccci was started in. Children get the
absolute paths (``to_env``), so no process depends on its working directory. ``STATE_DIR``
defaults to the user's XDG state directory (``$XDG_STATE_HOME/ccci``, else
``~/.local/state/ccci``); the shipped systemd units set ``/var/lib/ccci``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError
from .logs import FORMATS, LEVELS
from .names import is_app_domain, is_login, is_repo_name

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ENV_PREFIX = "CCCI_"
SECRET_KEYS = ("FORGE_TOKEN", "WEBHOOK_SECRET", "ADMIN_TOKEN", "DRONE_TOKEN")
# CCCI_* variables that are not settings: the harness' parameters, what steps get, test knobs.
OWN_VARIABLES = frozenset(
    {
        "CCCI_CONFIG",
        "CCCI_RUN",
        "CCCI_RECIPE",
        "CCCI_CLONE_URL",
        "CCCI_PR",
        "CCCI_SHA",
        "CCCI_STEP",
        "CCCI_SERVER",
        "CCCI_VM_ACCEL",
        "CCCI_TEST_VM_CACHE",
        "CCCI_SOAK_CYCLES",
    }
)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return the per-user state directory: ``$XDG_STATE_HOME/ccci``, else ``~/.local/state/ccci``."""
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative one
        return Path(xdg) / "ccci"
    return _home(environ) / ".local" / "state" / "ccci"


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME", "")
    return Path(home) if home and Path(home).is_absolute() else Path.home()


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one ccci installation, immutable once loaded."""

    FORGE_URL: str = field(default="", metadata={"doc": "Base URL of the Gitea/Forgejo forge"})
    FORGE_TOKEN: str = field(
        default="",
        repr=False,
        metadata={
            "doc": "API token of ccci's forge account (scopes: write:issue, write:repository, read:organization)"
        },
    )
    WEBHOOK_SECRET: str = field(
        default="",
        repr=False,
        metadata={"doc": "Shared secret of the forge webhook; with none, every delivery is refused"},
    )
    ADMIN_TOKEN: str = field(
        default="", repr=False, metadata={"doc": "Bearer token for /admin; with none, the admin API is closed"}
    )
    BOT_LOGIN: str = field(
        default="", metadata={"doc": "ccci's own forge login, so that its own comments are never taken as commands"}
    )
    STATE_DIR: Path = field(
        default_factory=default_state_dir,
        metadata={
            "doc": "Where the database, run directories, images and logs live "
            "(default: $XDG_STATE_HOME/ccci, else ~/.local/state/ccci)"
        },
    )
    PUBLIC_URL: str = field(
        default="", metadata={"doc": "How people reach this server, for links in comments and statuses"}
    )
    TRIGGER: str = field(default="!testme", metadata={"doc": "The comment command that starts a run"})
    ALLOWED_USERS: tuple[str, ...] = field(
        default=(), metadata={"doc": "Logins that may trigger runs (comma-separated in the environment)"}
    )
    ALLOWED_ORGS: tuple[str, ...] = field(
        default=(), metadata={"doc": "Members of these forge organisations may trigger runs"}
    )
    DISPATCH: str = field(
        default="local", metadata={"doc": "Where runs execute: local (this host) or drone (Drone CI runners)"}
    )
    DRONE_URL: str = field(default="", metadata={"doc": "Base URL of the Drone server (DISPATCH=drone)"})
    DRONE_TOKEN: str = field(default="", repr=False, metadata={"doc": "Drone API token (DISPATCH=drone)"})
    DRONE_REPO: str = field(
        default="", metadata={"doc": "owner/name of the Drone repository whose recipe-ci pipeline runs the harness"}
    )
    EXECUTOR: str = field(
        default="auto", metadata={"doc": "How steps run: auto, qemu (microVM forks) or bwrap (the process sandbox)"}
    )
    MAX_RUNS: int = field(default=2, metadata={"doc": "How many runs the local worker executes at once"})
    LOCK_DIR: Path = field(default=Path("/run/lock/ccci"), metadata={"doc": "Directory of the per-app lock files"})
    LOCK_WAIT: int = field(
        default=1800, metadata={"doc": "How long a run waits for a busy app before giving up", "duration": True}
    )
    LOCK_LEAK_AFTER: int = field(
        default=7200,
        metadata={"doc": "How long an app lock may be held before it is flagged as a possible leak", "duration": True},
    )
    RUN_TIMEOUT: int = field(default=3600, metadata={"doc": "Default deadline of a whole run", "duration": True})
    RUNS_PER_HOUR: int = field(default=20, metadata={"doc": "How many runs one user may start per hour"})
    RECIPES_DIR: Path = field(
        default=PACKAGE_DIR / "recipes",
        metadata={
            "doc": "Directory holding <recipe>/ci.yml for every recipe ccci knows (default: the recipes ccci ships)"
        },
    )
    ABRA_HOME: Path = field(
        default_factory=lambda: _home(os.environ) / ".abra",
        metadata={
            "doc": "The operator's abra directory, whose servers/ and catalogue/ every run shares (default: ~/.abra)"
        },
    )
    DOMAIN: str = field(default="ci.localhost", metadata={"doc": "Test apps are deployed at <recipe>.<DOMAIN>"})
    MAX_BODY: int = field(default=1024 * 1024, metadata={"doc": "Largest webhook body accepted, in bytes"})
    KEEP_ABRA_DIR: bool = field(
        default=False,
        metadata={"doc": "Keep each run's ABRA_DIR (STATE_DIR/runs/<id>/abra) after it ends, for debugging"},
    )
    SANDBOX_WRITABLE: tuple[str, ...] = field(
        default=(), metadata={"doc": "Host paths steps may write besides their checkout and ABRA_DIR (process sandbox)"}
    )
    SANDBOX_USER: str = field(
        default="nobody",
        metadata={"doc": "The user steps run as in the process sandbox when ccci runs as root (never root itself)"},
    )
    ADMIT_TIMEOUT: int = field(
        default=1800,
        metadata={
            "doc": "How long a run may wait to be admitted (the forge unreachable) before it ends with an error",
            "duration": True,
        },
    )
    RUN_GRACE: int = field(
        default=900,
        metadata={
            "doc": "How long past RUN_TIMEOUT the worker lets a harness tear down before it kills it",
            "duration": True,
        },
    )
    VM_MEMORY_MB: int = field(
        default=0,
        metadata={"doc": "Guest RAM of QEMU machines in MiB; 0: the image's own default (tiny 256, docker 1024)"},
    )
    VM_TB_SIZE_MB: int = field(
        default=256,
        metadata={
            "doc": "TCG translation buffer of each QEMU in MiB (QEMU's own default, 1024, is mostly private memory)"
        },
    )
    ABRA_BIN: str = field(
        default="",
        metadata={
            "doc": "The abra executable put into the docker image as /usr/local/bin/abra (scripts/abra builds one)"
        },
    )
    IMAGE_FILES: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "More files put into the docker image, as GUEST_PATH=HOST_PATH (e.g. /etc/motd=/opt/motd)"},
    )
    IMAGE_PACKAGES: tuple[str, ...] = field(default=(), metadata={"doc": "Extra Debian packages for the docker image"})
    REGISTRY_MIRROR: str = field(
        default="",
        metadata={"doc": "Registry Docker forks pull through: HOST:PORT or http(s)://HOST:PORT (127.0.0.1: this host)"},
    )
    DOCKER_PRELOAD: tuple[str, ...] = field(
        default=(), metadata={"doc": "Image archives (docker save or OCI tarballs) loaded into the docker warm base"}
    )
    DOCKER_SLOTS: int = field(
        default=0,
        metadata={"doc": "Runs that may hold Docker machines at once on this host; 0: one per CPU core; the rest wait"},
    )
    LOG_LEVEL: str = field(
        default="info", metadata={"doc": "Which log lines are written: debug, info, warning or error"}
    )
    LOG_FORMAT: str = field(default="text", metadata={"doc": "Log lines as text, or as one JSON object a line (json)"})
    WORKER_STALE_AFTER: int = field(
        default=300,
        metadata={
            "doc": "/healthz is unhealthy when the worker has not completed a pass for this long",
            "duration": True,
        },
    )
    OUTBOX_STALE_AFTER: int = field(
        default=1800,
        metadata={
            "doc": "/healthz is unhealthy when a forge write has waited this long to be delivered",
            "duration": True,
        },
    )

    def __post_init__(self) -> None:
        # Settings built in code (tests, replace()) get the same absolute paths as loaded ones.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path) and not value.is_absolute():
                object.__setattr__(self, f.name, Path(os.path.abspath(value)))

    @property
    def db_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.STATE_DIR / "ccci.db"

    @property
    def runs_dir(self) -> Path:
        """The parent of every run's own directory (ABRA_DIR, log, report)."""
        return self.STATE_DIR / "runs"

    def secrets(self) -> list[str]:
        """Return every configured secret value, for redaction."""
        return [v for v in (getattr(self, key) for key in SECRET_KEYS) if v]

    def to_env(self, *, secrets: bool = True) -> dict[str, str]:
        """Render these settings as ``CCCI_*`` variables, for a child process (without the tokens)."""
        env = {}
        for f in fields(self):
            if not secrets and f.name in SECRET_KEYS:
                continue
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


def doc(key: str) -> str:
    """Return the one-line meaning of setting ``key``."""
    return _FIELDS[key].metadata["doc"]


_CHOICES = {
    "DISPATCH": ("local", "drone"),
    "EXECUTOR": ("auto", "qemu", "bwrap"),
    "LOG_LEVEL": LEVELS,
    "LOG_FORMAT": FORMATS,
}
# Names an older ccci used, still read, with a warning that says the new one. "sandbox" now means
# only the process sandbox, and "local" only where a run is dispatched (DISPATCH=local).
RENAMED_KEYS = {"KEEP_SANDBOX": "KEEP_ABRA_DIR"}
RENAMED_VALUES = {("EXECUTOR", "local"): "bwrap"}
_WHOLE = re.compile(r"^[+-]?[0-9]+$")
_DURATION = re.compile(r"^(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?$")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Load settings from defaults, the ``CCCI_CONFIG`` file and ``CCCI_*`` variables."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {"STATE_DIR": default_state_dir(environ), "ABRA_HOME": _home(environ) / ".abra"}
    config_file = environ.get("CCCI_CONFIG")
    if config_file:
        raw.update(_read_toml(Path(config_file)))
    unknown = []
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in OWN_VARIABLES:
            continue
        name = key[len(ENV_PREFIX) :]
        if name in RENAMED_KEYS:
            new = RENAMED_KEYS[name]
            log.warning("the environment variable %s is now %s%s; please rename it", key, ENV_PREFIX, new)
            if ENV_PREFIX + new not in environ:
                raw[new] = value
        elif name in _FIELDS:
            raw[name] = value
        else:
            unknown.append(key)
    for key in sorted(unknown):
        guess = difflib.get_close_matches(key, [ENV_PREFIX + n for n in _FIELDS], n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        log.warning("ignoring the environment variable %s: ccci has no such setting%s", key, hint)
    raw.update(overrides)
    for (key, old), new in RENAMED_VALUES.items():
        if isinstance(raw.get(key), str) and raw[key].strip() == old:
            log.warning("%s=%s is now %s=%s; please change it", key, old, key, new)
            raw[key] = new
    return _validated(Settings(**{k: _coerce(k, v) for k, v in raw.items()}))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("CCCI_CONFIG", f"file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("CCCI_CONFIG", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("CCCI_CONFIG", f"{path} is not valid TOML: {exc}") from None
    for old, new in RENAMED_KEYS.items():
        if old in data:
            log.warning("%s: the key %s is now %s; please rename it", path, old, new)
            value = data.pop(old)
            data.setdefault(new, value)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        guess = difflib.get_close_matches(unknown[0], list(_FIELDS), n=1)
        raise ConfigError(unknown[0], f"unknown key in {path}" + (f"; did you mean {guess[0]}?" if guess else ""))
    for key, value in data.items():
        # A relative path in the file means relative to the file, wherever ccci is started.
        if _FIELDS[key].type == "Path" and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            data[key] = str(path.resolve().parent / value)
    return data


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(key: str, value: Any) -> Any:
    if key not in _FIELDS:
        raise ConfigError(key, "unknown setting")
    f = _FIELDS[key]
    try:
        if f.metadata.get("duration"):
            return _seconds(value)
        if f.type == "bool":
            return _bool(value)
        if f.type == "int":
            return _int(value)
        if f.type == "Path":
            if not isinstance(value, str | os.PathLike) or not str(value).strip():
                raise ValueError(f"must be a path (text), got {_shown(value)}")
            return Path(os.path.abspath(Path(str(value).strip()).expanduser()))
        if f.type == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"must be a list of text, got {_shown(value)}")
            return tuple(i.strip() for i in items if i.strip())
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {_shown(value)}")
        return value.strip()
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {_shown(value)}")


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        return int(value)
    raise ValueError(f"must be a whole number, got {_shown(value)}")


def _seconds(value: Any) -> int:
    """Read a duration: whole seconds (3600), or a number with units (90s, 30m, 1h, 1h30m, 2d)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if _WHOLE.fullmatch(text):
            return int(text)
        match = _DURATION.fullmatch(text)
        if text and match:
            return sum(int(n) * _UNIT_SECONDS[unit] for unit, n in match.groupdict().items() if n)
    raise ValueError(
        f"must be a duration in whole seconds (3600) or with units (90s, 30m, 1h, 1h30m), got {_shown(value)}"
    )


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else repr(value)


def _validated(s: Settings) -> Settings:
    for key, choices in _CHOICES.items():
        if getattr(s, key) not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {getattr(s, key)!r}")
    for key in ("FORGE_URL", "PUBLIC_URL", "DRONE_URL"):
        url = getattr(s, key)
        if url and (urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc):
            raise ConfigError(key, f"must be an http(s) URL, got {url!r}")
    for key in (
        "MAX_RUNS", "RUN_TIMEOUT", "MAX_BODY", "RUNS_PER_HOUR", "LOCK_LEAK_AFTER", "WORKER_STALE_AFTER",
        "OUTBOX_STALE_AFTER", "ADMIT_TIMEOUT",
    ):  # fmt: skip
        if getattr(s, key) < 1:
            raise ConfigError(key, "must be at least 1")
    if s.ABRA_BIN and not os.path.isabs(os.path.expanduser(s.ABRA_BIN)):
        raise ConfigError("ABRA_BIN", f"{s.ABRA_BIN!r} is not an absolute path")
    for path in s.SANDBOX_WRITABLE:
        if not path.startswith("/"):
            raise ConfigError("SANDBOX_WRITABLE", f"{path!r} is not an absolute path")
    for key in ("LOCK_WAIT", "RUN_GRACE"):
        if getattr(s, key) < 0:
            raise ConfigError(key, "must not be negative")
    if s.SANDBOX_USER in ("root", "0") or not is_login(s.SANDBOX_USER):
        raise ConfigError("SANDBOX_USER", f"must be a user other than root, got {s.SANDBOX_USER!r}")
    if not s.TRIGGER.startswith("!") or any(c.isspace() for c in s.TRIGGER) or len(s.TRIGGER) < 2:
        raise ConfigError("TRIGGER", f"must be one word starting with '!', got {s.TRIGGER!r}")
    for key in ("ALLOWED_USERS", "ALLOWED_ORGS"):
        for login in getattr(s, key):
            if not is_login(login):
                raise ConfigError(key, f"{login!r} is not a forge login")
    owner, slash, name = s.DRONE_REPO.partition("/")
    if s.DRONE_REPO and not (slash and is_repo_name(owner) and is_repo_name(name)):
        raise ConfigError("DRONE_REPO", f"must be owner/name, got {s.DRONE_REPO!r}")
    if s.DISPATCH == "drone":
        for key in ("DRONE_URL", "DRONE_TOKEN", "DRONE_REPO"):
            if not getattr(s, key):
                raise ConfigError(key, "is required when DISPATCH is drone")
    if not is_app_domain(s.DOMAIN):
        raise ConfigError("DOMAIN", f"must be a DNS name, got {s.DOMAIN!r}")
    return s
