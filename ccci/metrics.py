"""Metrics for Prometheus, computed from the store at scrape time.

gunicorn runs several web processes and the worker is another one: counters kept in memory
would each see a part. So nothing is counted in memory. ``StoreCollector`` reads what the
store already holds when ``/metrics`` is scraped — runs (outcomes, durations, queue waits), the
outbox (backlog, retries, the oldest pending write), the counters the web and the worker keep
there (webhook deliveries by result, forge request errors by kind) and the worker's last pass —
and every process answers the same. No multiprocess mode, no files to clean up.

Names follow Prometheus' conventions: ``ccci_`` prefix, base units (seconds) in the name,
``_total`` on counters, histograms for durations.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from . import __version__
from .forge import ERROR_KINDS
from .store import ACTIVE_STATES, FINAL_STATES, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
# Results a delivery can have (intake.delivery's "result", or the refusal before parsing).
DELIVERY_RESULTS = (
    "queued",
    "ignored",
    "refused",
    "replied",
    "limited",
    "cancel requested",
    "unauthorized",
    "malformed",
    "too_large",
)


class StoreCollector:
    """A Prometheus collector that reads ccci's state from the store on every scrape."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """Yield every metric, read from the store now."""
        info = GaugeMetricFamily("ccci_build_info", "ccci's version and Python's.", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

        finished = self.store.finished_counts()
        runs = CounterMetricFamily(
            "ccci_runs_finished", "Runs that reached a final state, by outcome.", labels=["outcome"]
        )
        for outcome in FINAL_STATES:
            runs.add_metric([outcome], finished.get(outcome, 0))
        yield runs

        counts = self.store.state_counts()
        active = GaugeMetricFamily("ccci_runs_active", "Runs queued or running now.", labels=["state"])
        for state in ACTIVE_STATES:
            active.add_metric([state], counts.get(state, 0))
        yield active

        yield self._histogram("ccci_run_duration_seconds", "How long finished runs took.", "run", RUN_BUCKETS)
        yield self._histogram(
            "ccci_run_queue_wait_seconds",
            "How long runs waited from !testme to their start.",
            "queue_wait",
            WAIT_BUCKETS,
        )

        yield self._counter(
            "ccci_webhook_deliveries",
            "Webhook deliveries, by what was decided.",
            "result",
            self.store.counters("webhook_deliveries"),
            DELIVERY_RESULTS,
        )
        yield self._counter(
            "ccci_forge_request_errors",
            "Failed requests to the forge's API, by kind.",
            "kind",
            self.store.counters("forge_errors"),
            ERROR_KINDS,
        )

        outbox = self.store.outbox_stats()
        yield GaugeMetricFamily("ccci_outbox_backlog", "Forge writes not yet delivered.", value=outbox["pending"])
        yield CounterMetricFamily(
            "ccci_outbox_retries", "Failed forge write attempts, each retried or given up.", value=outbox["retries"]
        )
        oldest = outbox["oldest_pending"]
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "ccci_outbox_oldest_pending_age_seconds",
            "How long the oldest undelivered forge write has waited (0: none).",
            value=age,
        )

        beat = self.store.heartbeat("worker")
        yield GaugeMetricFamily(
            "ccci_worker_last_pass_timestamp_seconds",
            "When the worker last completed a pass (Unix time; 0: never).",
            value=beat or 0.0,
        )

    def _histogram(self, name: str, doc: str, kind: str, bounds: tuple[float, ...]) -> HistogramMetricFamily:
        cumulative, count, total = self.store.durations(kind, bounds)
        buckets = [(_le(b), n) for b, n in zip(bounds, cumulative, strict=True)] + [("+Inf", count)]
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)

    @staticmethod
    def _counter(name: str, doc: str, label: str, seen: dict[str, int], known: tuple[str, ...]) -> Metric:
        family = CounterMetricFamily(name, doc, labels=[label])
        for value in sorted({*known, *seen}):  # known ones at 0 too, so that rate() sees them start
            family.add_metric([value], seen.get(value, 0))
        return family


def _le(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else str(bound)


def exposition(store: Store) -> bytes:
    """Return every metric in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry)
