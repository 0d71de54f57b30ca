"""Traffic: the comments people write and the deliveries the forge makes while ccci is being killed.

At random moments: a ``!testme`` on one of the pull requests, a redelivery of an earlier one
(Gitea's "redeliver" button: the same body, a new delivery id), a burst of comments delivered
at once with the same comment delivered concurrently several times, ``!testme cancel``, an admin
cancel, a stranger's ``!testme``, a comment that is not a command, a mistyped command, and a
malformed delivery (bad or missing signature, broken or deeply nested JSON, numbers past 2^63,
missing fields, a body over the size limit) built from a real comment that is never delivered
properly — so whatever it might have changed can be looked for afterwards.

A delivery that got no answer (the server was down, or its web worker was killed mid-request)
is sent again later, as an operator would redeliver it, until it is answered. Every answer is
kept for the invariant checks.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests

from .world import PRS, RECIPES, STRANGER, USERS, ChaosWorld

TESTME_KINDS = ("testme", "redelivery", "burst", "duplicate")
MALFORMED = (
    "bad signature",
    "unsigned",
    "not JSON",
    "deeply nested JSON",
    "5000-digit comment id",
    "comment id 2^63",
    "PR number 2^63",
    "no comment",
    "comment body not a string",
    "clone_url not http",
    "body over MAX_BODY",
)


@dataclass
class Delivery:
    """One webhook delivery the drill makes (and remakes until it is answered)."""

    kind: str  # one of TESTME_KINDS, cancel, stranger, noise, usage, or malformed:<what>
    body: bytes
    secret: str | None  # signed with this; None: sent without any signature
    comment_id: int | None = None
    recipe: str = ""
    pr: int = 0
    status: int | None = None  # the answer's HTTP status, once answered
    answer: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    errors: list[str] = field(default_factory=list)  # unanswered attempts, and 5xx answers

    @property
    def malformed(self) -> bool:
        """Tell whether this delivery is malformed on purpose."""
        return self.kind.startswith("malformed:")


class Traffic:
    """Makes deliveries at random moments and remembers every answer."""

    def __init__(self, world: ChaosWorld, rng: random.Random, pace: float):
        self.world = world
        self.rng = rng
        self.pace = pace  # mean seconds between actions
        self.deliveries: list[Delivery] = []
        self.unanswered: list[Delivery] = []
        self.admin_cancels: Counter[int] = Counter()  # HTTP status -> how many
        self.five_xx: list[str] = []
        self._lock = threading.Lock()

    # -- the loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Act at random moments until ``stop`` is set."""
        self.opening_burst()
        while not stop.wait(self.rng.expovariate(1 / self.pace)):
            self.retry_unanswered()
            action = self.rng.choices(
                [self.testme, self.redeliver, self.burst, self.cancel, self.admin_cancel, self.stranger,
                 self.noise, self.usage, self.malformed],
                weights=[40, 12, 6, 8, 5, 4, 5, 3, 12],
            )[0]  # fmt: skip
            action()

    def opening_burst(self) -> None:
        """Ask for a run on every pull request at once: every app busy from the start."""
        self._send_all([self._testme_delivery(recipe, pr, "burst") for pr in PRS for recipe in RECIPES])

    def retry_unanswered(self) -> None:
        """Send again every delivery that has not been answered yet."""
        with self._lock:
            again, self.unanswered = self.unanswered, []
        for delivery in again:
            self.send(delivery)

    def drain(self, ready: threading.Event, deadline: float) -> None:
        """Retry until every delivery is answered; ``ready`` tells that serve is up."""
        while self.unanswered and time.monotonic() < deadline:
            ready.wait(30)
            self.retry_unanswered()

    # -- actions ---------------------------------------------------------------------------------

    def testme(self) -> None:
        """A maintainer asks for a run on a random pull request."""
        self.send(self._testme_delivery(*self._pull(), "testme"))

    def redeliver(self) -> None:
        """Deliver an earlier ``!testme`` again (a new delivery id, the same comment)."""
        earlier = [d for d in self.deliveries if d.kind == "testme" and d.status is not None]
        if earlier:
            d = self.rng.choice(earlier)
            self.send(Delivery("redelivery", d.body, d.secret, d.comment_id, d.recipe, d.pr))

    def burst(self) -> None:
        """Several comments at once, and one of them delivered three times concurrently."""
        batch = [self._testme_delivery(*self._pull(), "burst") for _ in range(self.rng.randint(3, 6))]
        first = batch[0]
        batch += [Delivery("duplicate", first.body, first.secret, first.comment_id, first.recipe, first.pr)
                  for _ in range(2)]  # fmt: skip
        self._send_all(batch)

    def cancel(self) -> None:
        """``!testme cancel`` by the person who asked for the latest run of a pull request."""
        asked = [d for d in self.deliveries if d.kind in TESTME_KINDS and d.answer.get("result") == "queued"]
        if not asked:
            return
        d = self.rng.choice(asked[-6:])
        user = self.world.gitea.comments[d.comment_id].user
        comment_id, payload = self.world.comment(d.recipe, d.pr, "!testme cancel", user)
        self.send(self._signed("cancel", payload, comment_id))

    def admin_cancel(self) -> None:
        """An operator cancels a recent run through the admin API."""
        runs = [d.answer["run"] for d in self.deliveries if d.answer.get("result") == "queued"]
        if not runs or not self.world.serve.up():
            return
        run_id = self.rng.choice(runs[-6:])
        try:
            answer = self.world.admin("POST", f"/admin/runs/{run_id}/cancel", params={"by": "chaos"})
        except requests.RequestException:
            return  # the server is down: the operator would try later; nothing to check
        self.admin_cancels[answer.status_code] += 1
        if answer.status_code >= 500:
            self.five_xx.append(f"POST /admin/runs/{run_id}/cancel answered {answer.status_code}")

    def stranger(self) -> None:
        """Someone who may not use ccci asks for a run."""
        recipe, pr = self._pull()
        comment_id, payload = self.world.comment(recipe, pr, "!testme", STRANGER)
        self.send(self._signed("stranger", payload, comment_id))

    def noise(self) -> None:
        """A comment that is not a command: prose, a quote of the trigger, a fenced one."""
        body = self.rng.choice(["LGTM, thanks!", "> !testme\n\nquoting the above", "```\n!testme\n```"])
        recipe, pr = self._pull()
        comment_id, payload = self.world.comment(recipe, pr, body, self.rng.choice(USERS))
        self.send(self._signed("noise", payload, comment_id))

    def usage(self) -> None:
        """A maintainer mistypes the command."""
        recipe, pr = self._pull()
        comment_id, payload = self.world.comment(recipe, pr, "!testme now please", self.rng.choice(USERS))
        self.send(self._signed("usage", payload, comment_id))

    def malformed(self) -> None:
        """A delivery that must be refused with a 4xx and change nothing."""
        what = self.rng.choice(MALFORMED)
        recipe, pr = self._pull()
        comment_id, payload = self.world.comment(recipe, pr, "!testme", self.rng.choice(USERS))
        secret: str | None = self.world.secrets.webhook_secret
        body = json.dumps(payload).encode()
        if what == "bad signature":
            secret = "not-" + secret
        elif what == "unsigned":
            secret = None
        elif what == "not JSON":
            body = body[: len(body) // 2]
        elif what == "deeply nested JSON":
            body = b'{"action": "created", "comment": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        elif what == "5000-digit comment id":
            payload["comment"]["id"] = "HUGE"
            body = json.dumps(payload).encode().replace(b'"HUGE"', b"9" * 5000)
        elif what == "comment id 2^63":
            payload["comment"]["id"] = 2**63
        elif what == "PR number 2^63":
            payload["issue"]["number"] = 2**63
        elif what == "no comment":
            del payload["comment"]
        elif what == "comment body not a string":
            payload["comment"]["body"] = 1234
        elif what == "clone_url not http":
            payload["repository"]["clone_url"] = "ext::sh -c touch% /tmp/pwned"
        elif what == "body over MAX_BODY":
            payload["comment"]["body"] = "!testme\n" + "x" * (1 << 20)
        if what in ("comment id 2^63", "PR number 2^63", "no comment", "comment body not a string",
                    "clone_url not http", "body over MAX_BODY"):  # fmt: skip
            body = json.dumps(payload).encode()
        self.send(Delivery(f"malformed:{what}", body, secret, comment_id, recipe, pr))

    # -- sending ---------------------------------------------------------------------------------

    def send(self, delivery: Delivery) -> None:
        """Deliver once; an unanswered delivery is kept to be sent again."""
        with self._lock:
            if delivery.attempts == 0:
                self.deliveries.append(delivery)
        delivery.attempts += 1
        if delivery.secret is None:
            headers = {"Content-Type": "application/json", "X-Gitea-Event": "issue_comment",
                       "X-Gitea-Event-Type": "pull_request_comment"}  # fmt: skip
        else:
            headers = self.world.signed(delivery.body, delivery.secret)
        try:
            answer = self.world.post_hook(delivery.body, headers)
        except requests.RequestException as exc:
            delivery.errors.append(type(exc).__name__)
            with self._lock:
                self.unanswered.append(delivery)
            return
        if answer.status_code >= 500:
            delivery.errors.append(f"HTTP {answer.status_code}")
            self.five_xx.append(f"{delivery.kind} of comment {delivery.comment_id} answered {answer.status_code}: "
                                f"{answer.text[:200]}")  # fmt: skip
            with self._lock:
                self.unanswered.append(delivery)
            return
        delivery.status = answer.status_code
        try:
            delivery.answer = answer.json()
        except ValueError:
            delivery.answer = {"text": answer.text[:200]}

    def _send_all(self, batch: list[Delivery]) -> None:
        threads = [threading.Thread(target=self.send, args=(d,)) for d in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _testme_delivery(self, recipe: str, pr: int, kind: str) -> Delivery:
        comment_id, payload = self.world.comment(recipe, pr, "!testme", self.rng.choice(USERS))
        return self._signed(kind, payload, comment_id)

    def _signed(self, kind: str, payload: dict[str, Any], comment_id: int) -> Delivery:
        recipe, pr = payload["repository"]["name"], payload["issue"]["number"]
        return Delivery(kind, json.dumps(payload).encode(), self.world.secrets.webhook_secret, comment_id, recipe, pr)

    def _pull(self) -> tuple[str, int]:
        return self.rng.choice(RECIPES), self.rng.choice(PRS)

    # -- what was said ---------------------------------------------------------------------------

    def accepted(self) -> dict[int, int]:
        """Return comment id -> run id for every ``!testme`` answered 202 queued."""
        return {d.comment_id: d.answer["run"] for d in self.deliveries
                if d.kind in TESTME_KINDS and d.status == 202 and d.answer.get("result") == "queued"}  # fmt: skip

    def figures(self) -> dict[str, Any]:
        """Return counts of what was delivered and how it was answered."""
        by_kind = Counter(d.kind.split(":")[0] for d in self.deliveries)
        return {
            "deliveries": len(self.deliveries),
            "by_kind": dict(by_kind),
            "attempts_unanswered": sum(len(d.errors) for d in self.deliveries),
            "accepted_202": len(self.accepted()),
            "redeliveries_answered_ignored": sum(
                1
                for d in self.deliveries
                if d.kind in ("redelivery", "duplicate") and d.answer.get("result") == "ignored"
            ),  # fmt: skip
            "admin_cancels": dict(self.admin_cancels),
            "malformed": dict(Counter(f"{d.kind[10:]} -> {d.status}" for d in self.deliveries if d.malformed)),
        }
