"""What every member has, whatever it consumes: cohort, coordinator transport, metrics, run loop.

:class:`~pubsub_canary.client.kafka.KafkaMember` and
:class:`~pubsub_canary.client.pubsub.PubSubMember` add how they take work and hand it back; the
run loop calls their ``_open``, ``_step`` (until :meth:`Member.stop`), ``_shutdown`` and
``_close``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from pubsub_canary.client.processing import MetricsAccumulator, Outcome, Record, RetryPolicy
from pubsub_canary.client.session import MemberSession
from pubsub_canary.client.transport import CoordinatorTransport, HttpTransport
from pubsub_canary.errors import ConfigError

Handler = Callable[[Record], object]

COHORTS = ("stable", "canary")


class Member:
    """The part of a member that does not depend on the transport it consumes."""

    def __init__(
        self,
        handler: Handler,
        *,
        coordinator: str | CoordinatorTransport,
        cohort: str,
        version: str,
        retry: RetryPolicy | None,
        member_id: str | None,
        long_poll_seconds: float,
        metrics: MetricsAccumulator,
    ) -> None:
        if cohort not in COHORTS:
            raise ConfigError(
                f"cohort {cohort!r} is not one of {', '.join(COHORTS)}", field="cohort"
            )
        self.handler = handler
        self.cohort = cohort
        self.version = version
        self.retry = retry or RetryPolicy()
        self._transport: CoordinatorTransport = (
            HttpTransport(coordinator) if isinstance(coordinator, str) else coordinator
        )
        self._member_id = member_id
        self._long_poll = long_poll_seconds
        self.metrics = metrics
        self.session: MemberSession | None = None
        self._stopping = threading.Event()
        #: Called after each processed message: (record, outcome, dead_lettered). For ledgers.
        self.on_processed: Callable[[Record, Outcome, bool], None] | None = None

    def report_kpi(self, name: str, value: float) -> None:
        """Report a custom signal (for example an RL policy's reward) for this cohort."""
        self.metrics.kpi(name, float(value))

    def stop(self) -> None:
        """Ask :meth:`run` to hand its work back and return."""
        self._stopping.set()

    @property
    def member_id(self) -> str | None:
        return self.session.member_id if self.session else self._member_id

    def run(self, *, install_signal_handlers: bool = True, shutdown_timeout: float = 15.0) -> None:
        """Process the work granted until :meth:`stop` (or SIGTERM/SIGINT) is called."""
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self._open()
        try:
            while not self._stopping.is_set():
                self._step()
            self._shutdown(shutdown_timeout)
        finally:
            self._close()

    # --- what each transport's member provides --------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _shutdown(self, timeout: float) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError
