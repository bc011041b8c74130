"""``pubsub-canary dev kafka|pubsub``: a local test backend in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pubsub_canary.testing._config import parse_topic_spec


def main(args: argparse.Namespace) -> int:
    """Run the backend named by ``args.backend``; exit status 0 after SIGINT or SIGTERM.

    Raises:
        ConfigError: a bad option (the CLI prints it as one line, status 2).
        BackendUnavailable: the backend could not start (same).
    """
    if args.backend == "kafka":
        return _run_kafka(brokers=args.brokers, topics=list(args.topic))
    if args.backend == "pubsub":
        return _run_pubsub(port=args.port, project=args.project)
    raise AssertionError(f"unknown dev backend {args.backend!r}")  # argparse rejects others


def _run_kafka(brokers: int, topics: list[str]) -> int:
    from pubsub_canary.testing.embedded_kafka import EmbeddedKafka

    specs = [parse_topic_spec(spec) for spec in topics]  # bad input fails before we start
    with _stop_signals() as stop, EmbeddedKafka(brokers=brokers) as kafka:
        for name, partitions in specs:
            kafka.create_topic(name, partitions)
        bootstrap = kafka.bootstrap_servers
        _say(f"Kafka test broker (librdkafka mock, {brokers} brokers) at {bootstrap}")
        for name, partitions in specs:
            _say(f"  topic {name}: {partitions} partition{'' if partitions == 1 else 's'}")
        _say(f"  bootstrap.servers={bootstrap}")
        _say(
            '  example: python -c "from confluent_kafka.admin import AdminClient;'
            f" print(AdminClient({{'bootstrap.servers': '{bootstrap}'}})"
            '.list_topics(timeout=5).topics)"'
        )
        _say(
            "This is a test broker: it cannot create topics through the AdminClient"
            " (use --topic NAME:PARTITIONS). Stop it with Ctrl-C."
        )
        return _wait(stop, kafka.is_alive, "the embedded Kafka broker")


def _run_pubsub(port: int, project: str) -> int:
    from pubsub_canary.testing.pubsub import PubSubEmulator

    with _stop_signals() as stop, PubSubEmulator(port=port, project=project) as emulator:
        _say(
            f"Pub/Sub emulator ({emulator.description}),"
            f" ready in {emulator.startup_seconds or 0:.1f} s"
        )
        _say(f"export PUBSUB_EMULATOR_HOST={emulator.host} PUBSUB_PROJECT_ID={project}")
        _say("This is the Pub/Sub emulator, not Pub/Sub. Stop it with Ctrl-C.")
        return _wait(stop, emulator.is_alive, "the Pub/Sub emulator")


def _wait(stop: threading.Event, alive: Callable[[], bool], what: str) -> int:
    while not stop.wait(0.5):
        if not alive():
            print(f"error: {what} stopped unexpectedly", file=sys.stderr, flush=True)
            return 1
    _say(f"stopping {what}")
    return 0


@contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event (instead of raising) while the block runs."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(line: str) -> None:
    print(line, flush=True)
