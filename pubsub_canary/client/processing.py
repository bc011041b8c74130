"""Running the user's handler on one message: retries, dead-letter decision, measurements.

Transport-neutral (Kafka and Pub/Sub members share it). A handler that raises is retried with
exponential back-off up to ``RetryPolicy.max_attempts``; one that raises
:class:`PoisonMessage` is not retried. A message that still fails goes to the dead-letter
destination with its reason and counts as dead-lettered (I2: processed or dead-lettered, never
skipped).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from pubsub_canary.core.observations import (
    LATENCY_BUCKETS,
    CohortObservations,
    KpiStats,
    LatencyHistogram,
)
from pubsub_canary.errors import CanaryError


class PoisonMessage(CanaryError):
    """Raise from a handler for a message that can never succeed: it is dead-lettered at once."""


class Record:
    """One message, as the handler sees it (Kafka or Pub/Sub).

    ``headers`` may be given as a mapping or as Kafka's list of ``(name, value)`` pairs; the
    list is turned into a mapping only when a handler reads it (this runs once per message,
    so it stays cheap: see benchmarks/kafka_overhead.py).
    """

    __slots__ = ("_headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes] | list[tuple[str, bytes | None]] | None = None,
        timestamp: float | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self._headers = headers
        self.timestamp = timestamp

    @property
    def headers(self) -> Mapping[str, bytes]:
        h = self._headers
        if h is None:
            h = self._headers = {}
        elif not isinstance(h, Mapping):
            h = self._headers = {k: v for k, v in h if v is not None}
        return h

    def _fields(self) -> tuple[Any, ...]:
        return (self.topic, self.partition, self.offset, self.key, self.value, dict(self.headers),
                self.timestamp)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Record(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"key={self.key!r}, value={self.value!r}, headers={dict(self.headers)!r}, "
            f"timestamp={self.timestamp!r})"
        )


class RetryPolicy(BaseModel):
    """How often to retry a failing handler before dead-lettering the message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=3, ge=1, le=100)
    initial_backoff_seconds: float = Field(default=0.01, ge=0)
    max_backoff_seconds: float = Field(default=1.0, ge=0)


class Outcome(NamedTuple):
    """How handling one message ended (a tuple: built once per message, so kept cheap)."""

    ok: bool
    attempts: int
    error: str | None
    seconds: float


def run_handler(
    handler: Callable[[Record], object],
    record: Record,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    *,
    first_error: Exception | None = None,
    started: float | None = None,
) -> Outcome:
    """Call ``handler`` with retries; never raises for a handler error.

    A caller that already made the first attempt itself (the fast path of the Kafka member)
    passes its exception as ``first_error`` and when it started as ``started``.
    """
    start = time.perf_counter() if started is None else started
    attempt = 0
    backoff = policy.initial_backoff_seconds
    pending = first_error
    while True:
        attempt += 1
        try:
            if pending is not None:
                exc, pending = pending, None
                raise exc
            handler(record)
        except PoisonMessage as exc:
            return Outcome(False, attempt, f"PoisonMessage: {exc}", time.perf_counter() - start)
        except Exception as exc:
            if attempt >= policy.max_attempts:
                err = f"{type(exc).__name__}: {exc}"[:500]
                return Outcome(False, attempt, err, time.perf_counter() - start)
            if backoff > 0:
                sleep(backoff)
            backoff = min(policy.max_backoff_seconds, max(backoff * 2, 0.001))
        else:
            return Outcome(True, attempt, None, time.perf_counter() - start)


class MetricsAccumulator:
    """Counts one cohort's outcomes between heartbeats; cheap enough to call per message."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.processed = 0
        self.errors = 0
        self.dead_lettered = 0
        self.redeliveries = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.kpis: dict[str, list[float]] = {}

    def add(self, outcome: Outcome, dead_lettered: bool) -> None:
        # Single writer (the processing loop) for counters; the lock guards the drain.
        with self._lock:
            self.processed += 1
            if outcome.attempts > 1 or not outcome.ok:
                self.errors += 1
            if dead_lettered:
                self.dead_lettered += 1
            self.latency[bisect.bisect_left(LATENCY_BUCKETS, outcome.seconds)] += 1

    def add_ok(self, latencies: list[float]) -> None:
        """Messages that succeeded at their first attempt, counted once per batch."""
        buckets, counts = LATENCY_BUCKETS, self.latency
        with self._lock:
            self.processed += len(latencies)
            for seconds in latencies:
                counts[bisect.bisect_left(buckets, seconds)] += 1

    def add_redelivery(self) -> None:
        with self._lock:
            self.redeliveries += 1

    def kpi(self, name: str, value: float) -> None:
        with self._lock:
            s = self.kpis.setdefault(name, [0, 0.0, 0.0])
            s[0] += 1
            s[1] += value
            s[2] += value * value

    def drain(self) -> CohortObservations:
        with self._lock:
            obs = CohortObservations(
                processed=self.processed,
                errors=self.errors,
                dead_lettered=self.dead_lettered,
                redeliveries=self.redeliveries,
                latency=LatencyHistogram(tuple(self.latency)),
                kpis={k: KpiStats(int(v[0]), v[1], v[2]) for k, v in self.kpis.items()},
            )
            self._reset()
        return obs
