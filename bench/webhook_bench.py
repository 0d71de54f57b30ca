"""Webhook answer time under gunicorn: a queued !testme and an ignored delivery vs a trivial endpoint.

The three kinds of request are interleaved in one random order against one gunicorn, so machine
noise falls on all of them alike; the figures that matter are the ratios to the trivial endpoint
(GET /healthz: three SQLite reads). Target: p99 of a queued !testme within 3x the trivial p99.
No worker runs (it would add its own load): the bench records one worker pass itself, so that
/healthz answers 200, and lifts RUNS_PER_HOUR, since every !testme comes from the same user.

    .venv/bin/python bench/webhook_bench.py [--requests 600] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccci.store import Store  # noqa: E402  (after the path: the bench runs as a script)

SECRET = "bench-webhook-secret"
PAYLOAD = json.loads((ROOT / "tests" / "payloads" / "gitea_pr_comment_created.json").read_text())


def signed(body: bytes, event: str = "issue_comment") -> dict[str, str]:
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": "pull_request_comment" if event == "issue_comment" else event,
        "X-Gitea-Delivery": os.urandom(8).hex(),
        "X-Gitea-Signature": sig,
        "X-Hub-Signature-256": "sha256=" + sig,
    }


def comment_delivery(comment_id: int, body: str) -> tuple[bytes, dict[str, str]]:
    payload = json.loads(json.dumps(PAYLOAD))
    payload["comment"]["id"] = comment_id
    payload["comment"]["body"] = body
    payload["comment"]["user"]["login"] = payload["sender"]["login"] = "alice"
    raw = json.dumps(payload).encode()
    return raw, signed(raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600, help="requests of each kind")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "webhook.md"))
    args = parser.parse_args()

    state = tempfile.mkdtemp(prefix="ccci-bench-")
    port = free_port()
    env = {
        **os.environ,
        "CCCI_STATE_DIR": state,
        "CCCI_WEBHOOK_SECRET": SECRET,
        "CCCI_ALLOWED_USERS": "alice",
        "CCCI_LOCK_DIR": f"{state}/locks",
        "CCCI_RUNS_PER_HOUR": str(args.requests + 1),  # one user sends every !testme
        "CCCI_WORKER_STALE_AFTER": "1d",
        "PYTHONPATH": str(ROOT),
    }
    Store(Path(state) / "ccci.db").beat("worker")  # /healthz: as if a worker had just completed a pass
    # The server logs as in production (a line per delivery), into a file rather than this terminal.
    server_log = (Path(state) / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "app:app"],
        cwd=ROOT,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                session.get(base + "/healthz", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("gunicorn did not come up") from None
                time.sleep(0.05)  # waiting for a port to open: there is no event to await

        plan = ["trivial", "queued", "ignored"] * args.requests
        random.shuffle(plan)
        samples: dict[str, list[float]] = {"trivial": [], "queued": [], "ignored": []}
        ignored_body, ignored_headers = comment_delivery(1, "just a remark, no command")
        for i, kind in enumerate(plan):
            if kind == "trivial":
                t0 = time.perf_counter()
                r = session.get(base + "/healthz")
            elif kind == "queued":
                body, headers = comment_delivery(10_000 + i, "!testme")
                t0 = time.perf_counter()
                r = session.post(base + "/hooks/forge", data=body, headers=headers)
                assert r.status_code == 202 and r.json()["result"] == "queued", r.text
            else:
                t0 = time.perf_counter()
                r = session.post(base + "/hooks/forge", data=ignored_body, headers=ignored_headers)
                assert r.json()["result"] == "ignored", r.text
            samples[kind].append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
    finally:
        session.close()
        server.terminate()
        server.wait()
        server_log.close()
        shutil.rmtree(state, ignore_errors=True)

    rows = []
    t50, t99 = percentile(samples["trivial"], 50), percentile(samples["trivial"], 99)
    for kind in ("trivial", "ignored", "queued"):
        p50, p99 = percentile(samples[kind], 50), percentile(samples[kind], 99)
        rows.append((kind, p50, p99, p50 / t50, p99 / t99, statistics.mean(samples[kind])))
    lines = [
        "# Webhook answer time under gunicorn",
        "",
        f"`bench/webhook_bench.py`, {args.requests} requests of each kind, interleaved at random, one client, "
        "gunicorn with 2 sync workers, SQLite store in WAL mode.",
        "",
        "| request | p50 ms | p99 ms | p50 / trivial | p99 / trivial | mean ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {a:.2f} | {b:.2f} | {c:.2f}x | {d:.2f}x | {e:.2f} |" for k, a, b, c, d, e in rows),
        "",
        "trivial: `GET /healthz` (three SQLite reads); ignored: a signed comment without a command; queued: a",
        "signed `!testme` that claims its comment, records the run and enqueues the acknowledgement in one",
        "transaction. Both webhook kinds also count the delivery by result (one more write) and log one line.",
        "",
        f"Target: queued p99 within 3x the trivial p99 — {'met' if rows[2][4] <= 3 else 'NOT met'} "
        f"({rows[2][4]:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0 if rows[2][4] <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
