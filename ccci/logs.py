"""Log lines: one format for every ccci process and for gunicorn, naming the run a line is about.

    2026-11-24T10:00:00.123+00:00 [4242] INFO ccci.worker run=12: finished: passed
    {"time": "2026-11-24T10:00:00.123+00:00", "pid": 4242, "level": "INFO", "logger": "ccci.worker",
     "run": 12, "message": "finished: passed"}

``setup`` gives the root logger this format (``LOG_FORMAT`` text or json) at ``LOG_LEVEL``;
gunicorn's error and access logs use the same ``Formatter`` (``ccci.web.server.GunicornLogger``),
so the journal of one host reads as one log. A line is about a run when it is logged through
``for_run(log, run_id)``, or from a process that is one run — the harness calls ``bind_run``.
``fields(...)`` adds key=value pairs to a line (keys of their own in JSON), quoted so that a
value from a request can never forge a line of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
_PLAIN = re.compile(r"^[\w.:/@+-]{1,200}$")

_state: dict[str, Any] = {"format": "text", "run": None}


class Formatter(logging.Formatter):
    """Renders a record as ccci's text line or JSON object, whichever ``setup`` chose."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line."""
        when = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
        run = getattr(record, "run", None) or _state["run"]
        extra = getattr(record, "fields", None) or {}
        message = record.getMessage()
        error = self.formatException(record.exc_info) if record.exc_info else ""
        if _state["format"] == "json":
            data: dict[str, Any] = {"time": when, "pid": record.process, "level": record.levelname,
                                    "logger": record.name}  # fmt: skip
            if run is not None:
                data["run"] = run
            data["message"] = message
            data.update({k: v for k, v in extra.items() if k not in data})
            if error:
                data["exception"] = error
            return json.dumps(data, default=str)
        about = f" run={run}" if run is not None else ""
        pairs = "".join(f" {k}={_quoted(v)}" for k, v in extra.items())
        line = f"{when} [{record.process}] {record.levelname} {record.name}{about}: {message}{pairs}"
        return f"{line}\n{error}" if error else line


def _quoted(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class _OurHandler(logging.StreamHandler):
    """The handler ``setup`` installs, so that calling it again replaces it instead of adding one."""


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) in ccci's format at ``level``; calling it again reconfigures."""
    _state["format"] = fmt if fmt in FORMATS else "text"
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(stream or sys.stderr)
    handler.setFormatter(Formatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if level in LEVELS else "INFO")


def bind_run(run_id: str | int | None) -> None:
    """Say that every line this process logs from now on is about run ``run_id`` (the harness)."""
    _state["run"] = run_id


def for_run(logger: logging.Logger, run_id: str | int | None) -> logging.LoggerAdapter:
    """Return ``logger`` marking each line as being about run ``run_id``."""
    return _RunAdapter(logger, {"run": run_id})


def fields(**values: Any) -> dict[str, Any]:
    """Return ``extra=`` for a line carrying ``values`` as key=value pairs (a ``run`` marks the run)."""
    extra: dict[str, Any] = {"fields": {k: v for k, v in values.items() if k != "run"}}
    if values.get("run") is not None:
        extra["run"] = values["run"]
    return extra


class _RunAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs
