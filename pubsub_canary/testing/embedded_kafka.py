"""The embedded Kafka test broker: librdkafka's mock cluster hosted in a child process.

This is a test broker, not Kafka. It speaks the Kafka protocol well enough for produce, fetch,
``assign()``, offset commits, watermarks, ``list_offsets`` and
``list_consumer_group_offsets``, all of which behave as on a real broker. Two limits: it does
not implement CreateTopics (so topics are created through :meth:`EmbeddedKafka.create_topic`,
and auto-created topics get 4 partitions), and its ``subscribe()`` group protocol is slow
(a rebalance takes about the session timeout).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from types import TracebackType
from typing import Any

from pubsub_canary.errors import BackendUnavailable, BrokerError, ConfigError
from pubsub_canary.testing._config import check_topic_name
from pubsub_canary.testing._proc import LineReader, LogFile, stop_process


class EmbeddedKafka:
    """A librdkafka mock cluster in a child process, reachable at :attr:`bootstrap_servers`.

    Example::

        with EmbeddedKafka(brokers=3) as kafka:
            kafka.create_topic("orders", 12)
            producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})

    Nothing starts in ``__init__``; :meth:`start` (or ``with``) launches the child process. The
    child exits when this object's end of its control pipe closes, so it never outlives the
    process that started it, even one killed with SIGKILL.

    Args:
        brokers: number of mock brokers (ids 1..brokers).
        start_timeout: seconds to wait for the child to report its address.
        request_timeout: seconds to wait for the child to answer one control request.
    """

    kind = "embedded"

    def __init__(
        self, brokers: int = 3, *, start_timeout: float = 15.0, request_timeout: float = 10.0
    ) -> None:
        if not 1 <= brokers <= 64:
            raise ConfigError(f"brokers={brokers} is not valid; use 1 to 64 mock brokers")
        self.brokers = brokers
        self._start_timeout = start_timeout
        self._request_timeout = request_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: LineReader | None = None
        self._log: LogFile | None = None
        self._bootstrap: str | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> EmbeddedKafka:
        """Launch the child process and wait until it reports its bootstrap address."""
        if self._process is not None:
            return self
        self._log = LogFile("pubsub-canary-mock-kafka-")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pubsub_canary.testing._mock_broker",
                "--brokers",
                str(self.brokers),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log.writer,
            # Its own session: a terminal's Ctrl-C goes to us, and we stop it in order.
            start_new_session=True,
        )
        assert self._process.stdout is not None
        self._reader = LineReader(self._process.stdout)
        hello = self._receive(self._start_timeout)
        if hello is None or not hello.get("ok"):
            reason = (hello or {}).get("error") or "no answer"
            tail = self._log.tail()
            self.close()
            raise BackendUnavailable(
                f"the embedded Kafka broker (librdkafka mock) did not start: {reason}"
                + (f"; log: {tail}" if tail else "")
                + "; set PUBSUB_CANARY_KAFKA_BOOTSTRAP to use another broker",
                backend="kafka",
            )
        self._bootstrap = str(hello["bootstrap"])
        return self

    def close(self) -> None:
        """Stop the child process. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # end of file: the child exits
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                stop_process(process, group=True)
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._bootstrap = None

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the KafkaBackend interface ----------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` list of the mock brokers, for ``bootstrap.servers``."""
        if self._bootstrap is None:
            raise BackendUnavailable("the embedded Kafka broker is not running; call start()")
        return self._bootstrap

    @property
    def description(self) -> str:
        return f"librdkafka mock, {self.brokers} brokers at {self._bootstrap or 'not started'}"

    @property
    def pid(self) -> int | None:
        """Process id of the child hosting the cluster (None when stopped)."""
        return None if self._process is None else self._process.pid

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def create_topic(
        self, name: str, partitions: int, *, replication_factor: int | None = None
    ) -> None:
        """Create ``name`` with ``partitions`` partitions; it is usable when this returns.

        Raises:
            ConfigError: bad name or partition count.
            BrokerError: the topic exists already, or the mock refused it.
        """
        check_topic_name(name)
        if partitions < 1:
            raise ConfigError(f"partitions={partitions} for topic {name!r}; use 1 or more")
        rf = min(self.brokers, 3) if replication_factor is None else replication_factor
        self._request("create_topic", name=name, partitions=partitions, replication_factor=rf)

    # -- fault injection ---------------------------------------------------------------------

    def set_broker_down(self, broker_id: int) -> None:
        """Make broker ``broker_id`` (1..brokers) unreachable: connections fail, leaders stay."""
        self._request("set_broker_down", broker_id=broker_id)

    def set_broker_up(self, broker_id: int) -> None:
        self._request("set_broker_up", broker_id=broker_id)

    def set_broker_rtt(self, broker_id: int, rtt_ms: int) -> None:
        """Delay every response of broker ``broker_id`` by ``rtt_ms`` milliseconds."""
        self._request("set_broker_rtt", broker_id=broker_id, rtt_ms=rtt_ms)

    def push_request_errors(self, api_key: int, *errors: int) -> None:
        """Fail the next ``len(errors)`` requests of Kafka API ``api_key`` with these codes.

        Example: ``push_request_errors(8, KafkaError.REQUEST_TIMED_OUT)`` fails one
        OffsetCommit (API key 8).
        """
        self._request("push_request_errors", api_key=api_key, errors=[int(e) for e in errors])

    # -- the control channel -----------------------------------------------------------------

    def _request(self, op: str, **args: Any) -> None:
        with self._lock:
            process = self._process
            if process is None or process.stdin is None or process.poll() is not None:
                raise BackendUnavailable(
                    "the embedded Kafka broker is not running", backend="kafka", op=op
                )
            try:
                process.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
                process.stdin.flush()
            except OSError as exc:
                raise BackendUnavailable(
                    f"the embedded Kafka broker stopped: {exc}", backend="kafka"
                ) from exc
            reply = self._receive(self._request_timeout)
        if reply is None:
            raise BackendUnavailable(
                f"the embedded Kafka broker did not answer {op!r} within"
                f" {self._request_timeout:g} s",
                backend="kafka",
            )
        if not reply.get("ok"):
            raise BrokerError(f"embedded Kafka broker: {reply.get('error')}", op=op)

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        assert self._reader is not None
        line = self._reader.readline(timeout)
        if line is None:
            return None
        reply: dict[str, Any] = json.loads(line)
        return reply
