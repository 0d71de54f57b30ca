"""Durable state in SQLite (WAL): runs, comment claims, answers, commands and the outbox of forge writes.

The store is the only state shared by the web processes, the worker and the run processes of
one host. Each method is one short transaction; ``BEGIN IMMEDIATE`` takes the write lock up
front so concurrent writers queue on SQLite's busy timeout instead of failing half-way.

A Run is one accepted ``!testme``: it moves queued → running → one final state, exactly once.
A claim ties a forge comment to the run it made, so a comment can never make a second run.
An answer records that ccci replied to a user on a PR (a refusal or usage help): at most once.
A command is a ``!testme`` line the worker must check permission for before it acts or replies.
An outbox row is one forge write waiting to be delivered; rows of one run go out in order.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .names import is_id

FINAL_STATES = ("passed", "failed", "error", "canceled", "timed_out")
ACTIVE_STATES = ("queued", "running")
# "refused" is not a run people see: an unauthorized request, kept so its claim stays taken.
STATES = ACTIVE_STATES + FINAL_STATES + ("refused",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    state           TEXT NOT NULL DEFAULT 'queued',
    owner           TEXT NOT NULL,
    repo            TEXT NOT NULL,
    pr              INTEGER NOT NULL,
    recipe          TEXT NOT NULL,
    requester       TEXT NOT NULL,
    comment_id      INTEGER,
    clone_url       TEXT NOT NULL DEFAULT '',
    sha             TEXT,
    authorized      INTEGER NOT NULL DEFAULT 0,
    admitted        INTEGER NOT NULL DEFAULT 0,
    status_comment  INTEGER,
    worker_pid      INTEGER,
    dispatch_ref    TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    canceled_by     TEXT,
    superseded_by   INTEGER,
    note            TEXT NOT NULL DEFAULT '',
    report          TEXT,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL
);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state, id);
CREATE INDEX IF NOT EXISTS runs_pr ON runs (owner, repo, pr, id);

CREATE TABLE IF NOT EXISTS claims (
    repo        TEXT NOT NULL,
    comment_id  INTEGER NOT NULL,
    run_id      INTEGER,
    action      TEXT NOT NULL,
    claimed_at  REAL NOT NULL,
    PRIMARY KEY (repo, comment_id)
);

CREATE TABLE IF NOT EXISTS answers (
    repo  TEXT NOT NULL,
    pr    INTEGER NOT NULL,
    login TEXT NOT NULL,
    at    REAL NOT NULL,
    PRIMARY KEY (repo, pr, login)
);

CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    command     TEXT NOT NULL,
    owner       TEXT NOT NULL,
    repo        TEXT NOT NULL,
    pr          INTEGER NOT NULL,
    login       TEXT NOT NULL,
    comment_id  INTEGER,
    at          REAL NOT NULL,
    handled_at  REAL
);

CREATE TABLE IF NOT EXISTS outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        INTEGER,
    kind          TEXT NOT NULL,
    coalesce_key  TEXT,
    payload       TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL,
    last_error    TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    done_at       REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (done_at, next_attempt, id);

-- The operator's view (metrics and health): what the tables above do not record.
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT NOT NULL,              -- webhook_deliveries (by result), forge_errors (by kind)
    label  TEXT NOT NULL,
    value  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, label)
);

CREATE TABLE IF NOT EXISTS heartbeats (
    name  TEXT PRIMARY KEY,            -- worker: when it last completed a pass
    at    REAL NOT NULL
);
"""
# Durations the metrics report, each from two columns of a run (see Store.durations).
DURATIONS = {
    "run": ("started_at", "finished_at"),  # the whole run, once it finished
    "queue_wait": ("created_at", "started_at"),  # from the !testme to its start
}


@dataclass
class Run:
    """One accepted ``!testme``: what is tested (repo, PR, pinned sha, recipe) and how it went."""

    id: int
    state: str
    owner: str
    repo: str
    pr: int
    recipe: str
    requester: str
    comment_id: int | None
    clone_url: str
    sha: str | None
    authorized: int
    admitted: int
    status_comment: int | None
    worker_pid: int | None
    dispatch_ref: str | None
    cancel_requested: int
    canceled_by: str | None
    superseded_by: int | None
    note: str
    report: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    private: int = 0  # the repository is private: its checkout needs the forge token

    @property
    def full_name(self) -> str:
        """Return ``owner/repo``."""
        return f"{self.owner}/{self.repo}"

    @property
    def finished(self) -> bool:
        """Tell whether the run reached a final state."""
        return self.state in FINAL_STATES or self.state == "refused"

    def report_dict(self) -> dict[str, Any] | None:
        """Return the stored report, parsed."""
        return json.loads(self.report) if self.report else None

    def to_dict(self) -> dict[str, Any]:
        """Return the run as plain JSON-ready data (the report parsed)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["report"] = self.report_dict()
        return data


@dataclass(frozen=True)
class PendingCommand:
    """A ``!testme cancel`` or a malformed ``!testme …`` waiting for the worker's permission check."""

    id: int
    command: str  # "cancel" | "usage" | "not-a-recipe"
    owner: str
    repo: str
    pr: int
    login: str
    comment_id: int | None


# Columns added after the first release: added to an existing database when it is opened.
_ADDED_COLUMNS = {"runs": {"private": "INTEGER NOT NULL DEFAULT 0"}}


@dataclass
class OutboxItem:
    """One forge write waiting to be delivered."""

    id: int
    run_id: int | None
    kind: str
    coalesce_key: str | None
    payload: dict[str, Any]
    attempts: int
    next_attempt: float
    last_error: str


class Store:
    """The SQLite database of one ccci host; safe across processes and threads."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript manages its own transaction; CREATE ... IF NOT EXISTS makes it idempotent.
        self._connection().executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an older ccci up to this schema."""
        with self._tx() as db:
            for table, columns in _ADDED_COLUMNS.items():
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            # cancel_requests became commands (cancel and usage); carry over what was pending.
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cancel_requests'").fetchone():
                db.execute(
                    "INSERT INTO commands (command, owner, repo, pr, login, comment_id, at) "
                    "SELECT 'cancel', owner, repo, pr, login, comment_id, at FROM cancel_requests "
                    "WHERE handled_at IS NULL"
                )
                db.execute("DROP TABLE cancel_requests")

    # -- connections -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread and per process: gunicorn forks after import, and a
        # connection must never cross a fork.
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        if getattr(self._local, "depth", 0):  # inside transaction(): join it
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0
        db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several store calls into one atomic transaction (all or nothing)."""
        with self._tx():
            yield

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- runs --------------------------------------------------------------------------------

    def claim_comment(
        self,
        *,
        owner: str,
        repo: str,
        comment_id: int,
        action: str,
        run: dict[str, Any] | None = None,
    ) -> tuple[bool, Run | None]:
        """Claim a comment atomically; with ``run``, create its run in the same transaction.

        Returns (claimed, run). ``claimed`` is False when the comment was claimed before: a
        redelivery or a concurrent duplicate, which must change nothing.
        """
        full_name = f"{owner}/{repo}"
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO claims (repo, comment_id, action, claimed_at) VALUES (?, ?, ?, ?)",
                (full_name, comment_id, action, now),
            )
            if cur.rowcount == 0:
                row = db.execute(
                    "SELECT runs.* FROM claims LEFT JOIN runs ON runs.id = claims.run_id "
                    "WHERE claims.repo = ? AND claims.comment_id = ?",
                    (full_name, comment_id),
                ).fetchone()
                return False, (_run(row) if row and row["id"] is not None else None)
            if run is None:
                return True, None
            cols = {"owner": owner, "repo": repo, "comment_id": comment_id, "created_at": now, **run}
            run_id = db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(cols.values()),
            ).lastrowid
            db.execute(
                "UPDATE claims SET run_id = ? WHERE repo = ? AND comment_id = ?",
                (run_id, full_name, comment_id),
            )
            return True, _run(db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())

    def get_run(self, run_id: int) -> Run | None:
        """Return one run, or None (also for an id no run can have)."""
        if not is_id(run_id):
            return None
        row = self._connection().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run(row) if row else None

    def list_runs(
        self,
        *,
        states: tuple[str, ...] | None = None,
        recipe: str | None = None,
        owner: str | None = None,
        repo: str | None = None,
        pr: int | None = None,
        limit: int = 100,
    ) -> list[Run]:
        """List runs, newest first, filtered; refused requests only when asked for by state."""
        where: list[str] = []
        args: list[str | int] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += list(states)
        else:
            where.append("state != 'refused'")
        for column, value in (("recipe", recipe), ("owner", owner), ("repo", repo), ("pr", pr)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
        return [_run(r) for r in self._connection().execute(sql, (*args, limit)).fetchall()]

    def update_run(self, run_id: int, *, only_if_state: tuple[str, ...] | None = None, **changes: Any) -> bool:
        """Change columns of a run; with ``only_if_state``, only from one of those states."""
        if "report" in changes and isinstance(changes["report"], dict):
            changes["report"] = json.dumps(changes["report"])
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE runs SET {sets} WHERE id = ?"
        args: list[Any] = [*changes.values(), run_id]
        if only_if_state:
            sql += f" AND state IN ({', '.join('?' * len(only_if_state))})"
            args += list(only_if_state)
        with self._tx() as db:
            return db.execute(sql, args).rowcount == 1

    def queue_position(self, run_id: int) -> int:
        """Return how many admitted queued runs are ahead of this one (0: next to start)."""
        row = (
            self._connection()
            .execute("SELECT COUNT(*) FROM runs WHERE state = 'queued' AND admitted = 1 AND id < ?", (run_id,))
            .fetchone()
        )
        return int(row[0])

    def note_answer(self, *, repo: str, pr: int, login: str) -> bool:
        """Record that ccci answered ``login`` on this PR (refusal or usage); True only the first time."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO answers (repo, pr, login, at) VALUES (?, ?, ?, ?)",
                (repo, pr, login.lower(), time.time()),
            )
            return cur.rowcount == 1

    def count_recent_runs(self, requester: str, since: float, *, up_to: int | None = None) -> int:
        """Count the runs a user started since a time (with ``up_to``, only runs up to that id)."""
        sql = "SELECT COUNT(*) FROM runs WHERE requester = ? AND created_at >= ? AND state != 'refused'"
        args: list[Any] = [requester, since]
        if up_to is not None:
            sql += " AND id <= ?"
            args.append(up_to)
        return int(self._connection().execute(sql, args).fetchone()[0])

    def request_cancel(self, run_id: int, by: str) -> bool:
        """Ask for a queued or running run to be canceled by ``by``; False if it is not active.

        Every way to cancel — a comment, the admin API, the command line, a newer run that
        supersedes it — comes through here; the worker then dequeues or signals the run.
        """
        return self.update_run(run_id, only_if_state=ACTIVE_STATES, cancel_requested=1, canceled_by=by)

    def record_command(
        self, command: str, *, owner: str, repo: str, pr: int, login: str, comment_id: int | None
    ) -> None:
        """Record a command the worker must check ``login``'s permission for before acting on it."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO commands (command, owner, repo, pr, login, comment_id, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (command, owner, repo, pr, login, comment_id, time.time()),
            )

    def pending_commands(self) -> list[PendingCommand]:
        """Return the commands not yet handled, oldest first."""
        rows = self._connection().execute("SELECT * FROM commands WHERE handled_at IS NULL ORDER BY id").fetchall()
        return [PendingCommand(**{f.name: r[f.name] for f in fields(PendingCommand)}) for r in rows]

    def mark_command_handled(self, command_id: int) -> None:
        """Mark a command as handled."""
        with self._tx() as db:
            db.execute("UPDATE commands SET handled_at = ? WHERE id = ?", (time.time(), command_id))

    # -- outbox ------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        run_id: int | None = None,
        coalesce_key: str | None = None,
    ) -> int:
        """Add a forge write to the outbox; a pending write with the same coalesce key is replaced."""
        now = time.time()
        body = json.dumps(payload)
        with self._tx() as db:
            if coalesce_key:
                row = db.execute(
                    "SELECT id FROM outbox WHERE coalesce_key = ? AND done_at IS NULL ORDER BY id DESC LIMIT 1",
                    (coalesce_key,),
                ).fetchone()
                if row:
                    db.execute("UPDATE outbox SET payload = ? WHERE id = ?", (body, row["id"]))
                    return int(row["id"])
            inserted = db.execute(
                "INSERT INTO outbox (run_id, kind, coalesce_key, payload, next_attempt, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, kind, coalesce_key, body, now, now),
            ).lastrowid
            assert inserted is not None  # an INSERT always sets it
            return inserted

    def pending_outbox(self, limit: int = 50) -> list[OutboxItem]:
        """Return undelivered writes in order (including those not yet due)."""
        rows = (
            self._connection()
            .execute("SELECT * FROM outbox WHERE done_at IS NULL ORDER BY id LIMIT ?", (limit,))
            .fetchall()
        )
        return [
            OutboxItem(
                id=r["id"],
                run_id=r["run_id"],
                kind=r["kind"],
                coalesce_key=r["coalesce_key"],
                payload=json.loads(r["payload"]),
                attempts=r["attempts"],
                next_attempt=r["next_attempt"],
                last_error=r["last_error"],
            )
            for r in rows
        ]

    def mark_delivered(self, item_id: int, *, payload: dict[str, Any] | None = None) -> bool:
        """Mark an outbox write as delivered, unless its payload was replaced meanwhile."""
        sql = "UPDATE outbox SET done_at = ? WHERE id = ?"
        args: list[float | int | str] = [time.time(), item_id]
        if payload is not None:
            sql += " AND payload = ?"
            args.append(json.dumps(payload))
        with self._tx() as db:
            return db.execute(sql, args).rowcount == 1

    def drop_pending(self, run_id: int, reason: str) -> int:
        """Give up every undelivered write of a run (its PR is gone); return how many there were."""
        with self._tx() as db:
            return db.execute(
                "UPDATE outbox SET done_at = ?, last_error = ? WHERE run_id = ? AND done_at IS NULL",
                (time.time(), reason[:500], run_id),
            ).rowcount

    def mark_attempt(self, item_id: int) -> None:
        """Record that a write is about to be sent: a crash from here on may leave it delivered."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (item_id,))

    def mark_failed(self, item_id: int, error: str, next_attempt: float) -> None:
        """Record a failed delivery and when to try again."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET last_error = ?, next_attempt = ? WHERE id = ?",
                (error[:500], next_attempt, item_id),
            )

    def outbox_backlog(self) -> int:
        """Count undelivered writes."""
        return int(self._connection().execute("SELECT COUNT(*) FROM outbox WHERE done_at IS NULL").fetchone()[0])

    def state_counts(self) -> dict[str, int]:
        """Count runs by state."""
        rows = self._connection().execute("SELECT state, COUNT(*) AS n FROM runs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    # -- the operator's view ----------------------------------------------------------------------

    def count(self, name: str, label: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name`` of ``label`` (e.g. webhook_deliveries of "queued")."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO counters (name, label, value) VALUES (?, ?, ?) "
                "ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value",
                (name, label, by),
            )

    def counters(self, name: str) -> dict[str, int]:
        """Return counter ``name`` by label."""
        rows = self._connection().execute("SELECT label, value FROM counters WHERE name = ?", (name,)).fetchall()
        return {r["label"]: r["value"] for r in rows}

    def beat(self, name: str, at: float | None = None) -> None:
        """Record that ``name`` (the worker) is alive and completed a pass now."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO heartbeats (name, at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET at = excluded.at",
                (name, time.time() if at is None else at),
            )

    def heartbeat(self, name: str) -> float | None:
        """Return when ``name`` last beat, or None if it never did."""
        row = self._connection().execute("SELECT at FROM heartbeats WHERE name = ?", (name,)).fetchone()
        return row["at"] if row else None

    def finished_counts(self) -> dict[str, int]:
        """Count the runs that reached each final state."""
        marks = ", ".join("?" * len(FINAL_STATES))
        sql = f"SELECT state, COUNT(*) AS n FROM runs WHERE state IN ({marks}) GROUP BY state"
        return {r["state"]: r["n"] for r in self._connection().execute(sql, FINAL_STATES).fetchall()}

    def durations(self, kind: str, bounds: tuple[float, ...]) -> tuple[list[int], int, float]:
        """Return a histogram of one of ``DURATIONS``: cumulative counts per bound, the count and the sum."""
        start, end = DURATIONS[kind]
        seconds = f"MAX({end} - {start}, 0)"  # a wall clock set back must not make a negative wait
        buckets = ", ".join(f"SUM({seconds} <= ?)" for _ in bounds)
        sql = f"SELECT COUNT(*), TOTAL({seconds}){', ' + buckets if bounds else ''} FROM runs "
        sql += f"WHERE {start} IS NOT NULL AND {end} IS NOT NULL AND state != 'refused'"
        row = self._connection().execute(sql, bounds).fetchone()
        return [int(n or 0) for n in row[2:]], int(row[0]), float(row[1])

    def outbox_stats(self) -> dict[str, float | int | None]:
        """Return the outbox's backlog, how many deliveries were retried, and when the oldest pending write was made.

        ``attempts`` counts every attempt, the first included: retries are the ones after it.
        """
        row = (
            self._connection()
            .execute(
                "SELECT COUNT(*) FILTER (WHERE done_at IS NULL), TOTAL(MAX(attempts - 1, 0)), "
                "MIN(created_at) FILTER (WHERE done_at IS NULL) FROM outbox"
            )
            .fetchone()
        )
        return {"pending": int(row[0]), "retries": int(row[1]), "oldest_pending": row[2]}


def _run(row: sqlite3.Row) -> Run:
    return Run(**{f.name: row[f.name] for f in fields(Run)})
