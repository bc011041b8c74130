"""Processes and bookkeeping for the demo and the end-to-end tests.

:class:`Harness` starts the coordinator and member processes (the example consumer of
:mod:`pubsub_canary.demo.consumer`), produces at a steady rate, and reads the members' ledgers
back to check the invariants: every produced offset processed or dead-lettered (I2), no offset
processed twice (I3), and per partition no more changes of the processing member than the
coordinator granted it (I1).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pubsub_canary.client.operator import OperatorClient
from pubsub_canary.errors import BackendUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MemberProc:
    name: str
    cohort: str
    version: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class LedgerReport:
    """What the ledgers say about every message of the topic."""

    produced: int
    processed_ok: int
    dead_lettered: int
    lost: int
    duplicates: int
    #: Per partition: how often the processing member changed (compare with grants, I1).
    switches: dict[int, int] = field(default_factory=dict)
    #: Partitions where a member processed offsets out of order (interleaving owners).
    lost_offsets: list[tuple[int, int]] = field(default_factory=list)
    duplicate_offsets: list[tuple[int, int]] = field(default_factory=list)


class SteadyProducer:
    """Produces JSON messages with a sequence number at ``rate`` per second, keyed by user."""

    def __init__(self, bootstrap: str, topic: str, rate: int) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.rate = rate
        self.sent = 0
        self.failed = 0
        self._p = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                n = self.sent
                self._p.produce(
                    self.topic,
                    key=f"user-{n % 997}".encode(),
                    value=f'{{"seq": {n}, "amount": {n % 7 + 1}}}'.encode(),
                    on_delivery=self._delivered,
                )
                self.sent += 1
            self._p.poll(0)
            time.sleep(0.01)
        self._p.flush(30)

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
        self._p = None  # close the client now, not when the broker is already gone
        return self.sent


class Harness:
    """Coordinator + member processes on one topic, with ledgers in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        bootstrap: str,
        topic: str,
        group: str,
        dlq_topic: str,
        lease_seconds: float = 3.0,
        store_url: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.dlq_topic = dlq_topic
        self.lease_seconds = lease_seconds
        self.store_url = store_url or f"sqlite:///{self.workdir / 'coordinator.db'}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.members: dict[str, MemberProc] = {}
        self.client = OperatorClient(self.url)
        #: The environment of every process started (subclasses add a backend's variables).
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._n = 0
        self._coordinator_starts = 0

    # --- processes ----------------------------------------------------------------------------

    def _spawn(self, args: list[str], log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.workdir / log_name
        out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env
        )
        out.close()
        return proc, log_path

    def start_coordinator(self, timeout: float = 20.0) -> None:
        self._coordinator_starts += 1
        self.coordinator, log_path = self._spawn(
            [
                "-m",
                "pubsub_canary.cli",
                "coordinator",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--store",
                self.store_url,
                *(["--bootstrap-servers", self.bootstrap] if self.bootstrap else []),
                "--lease-seconds",
                str(self.lease_seconds),
            ],
            "coordinator.log",
        )
        deadline = time.monotonic() + timeout
        while not self.client.healthy():
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise BackendUnavailable(f"the coordinator did not start; its log ends:\n{tail}")
            time.sleep(0.1)

    def stop_coordinator(self, sig: int = signal.SIGTERM) -> None:
        if self.coordinator is None:
            return
        self.coordinator.send_signal(sig)
        try:
            self.coordinator.wait(15)
        except subprocess.TimeoutExpired:
            self.coordinator.kill()
            self.coordinator.wait(5)
        self.coordinator = None

    def start_member(
        self,
        cohort: str,
        version: str,
        *,
        fail_rate: float = 0.0,
        fail_after: float | None = None,
        work_ms: float = 0.0,
        coordinator_url: str | None = None,
        changelog_topic: str | None = None,
    ) -> MemberProc:
        self._n += 1
        name = f"{cohort}-{self._n}"
        args = [
            "-m",
            "pubsub_canary.demo.consumer",
            "--coordinator",
            coordinator_url or self.url,
            "--bootstrap-servers",
            self.bootstrap,
            "--topic",
            self.topic,
            "--group",
            self.group,
            "--dlq-topic",
            self.dlq_topic,
            "--cohort",
            cohort,
            "--version",
            version,
            "--member-id",
            name,
            "--ledger",
            str(self.workdir / f"ledger-{name}.txt"),
            "--work-ms",
            str(work_ms),
        ]
        if changelog_topic:
            args += ["--changelog-topic", changelog_topic]
        if fail_rate:
            args += ["--fail-rate", str(fail_rate)]
        if fail_after is not None:
            args += ["--fail-after", str(fail_after)]
        proc, log_path = self._spawn(args, f"member-{name}.log")
        m = MemberProc(name, cohort, version, proc, log_path)
        self.members[name] = m
        return m

    def signal_member(self, name: str, sig: int) -> None:
        self.members[name].proc.send_signal(sig)

    def stop_members(self, timeout: float = 30.0) -> None:
        for m in self.members.values():
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for m in self.members.values():
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(5)

    def close(self) -> None:
        self.stop_members()
        self.stop_coordinator()
        self.client.close()

    def wait_members_registered(self, rollout: str | None = None, timeout: float = 30.0) -> None:
        """Wait until every started member holds a lease (seen in the coordinator's status)."""
        deadline = time.monotonic() + timeout
        want = {n for n, m in self.members.items() if m.proc.poll() is None}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if rollout:
                    seen = {m["member_id"] for m in self.client.status(rollout)["members"]}
                    if want <= seen:
                        return
            time.sleep(0.2)

    # --- checks -------------------------------------------------------------------------------

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """(committed, high) per partition of the topic, for the group."""
        from pubsub_canary.coordinator.broker import KafkaBroker

        b = KafkaBroker(self.bootstrap)
        try:
            n = b.partitions(self.topic) or 0
            return b.offsets(self.topic, self.group, n)
        finally:
            b.close()

    def wait_drained(self, timeout: float = 60.0) -> bool:
        """Wait until the group's committed offset reaches the high watermark everywhere."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wm = self.watermarks()
            if wm and all(c >= h for c, h in wm.values()):
                return True
            time.sleep(0.5)
        return False

    def ledger(self) -> list[tuple[int, int, str, str, float]]:
        rows = []
        for path in self.workdir.glob("ledger-*.txt"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 5:
                    rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3], float(parts[4])))
        rows.sort(key=lambda r: r[4])
        return rows

    def report(self) -> LedgerReport:
        rows = self.ledger()
        wm = self.watermarks()
        produced = sum(h for _, h in wm.values())
        seen = Counter((p, o) for p, o, *_ in rows)
        outcome: dict[tuple[int, int], str] = {}
        for p, o, _, out, _ in rows:
            outcome[(p, o)] = out
        lost = [(p, o) for p, (_, h) in wm.items() for o in range(h) if (p, o) not in seen]
        dups = [k for k, n in seen.items() if n > 1]
        switches: dict[int, int] = defaultdict(int)
        last: dict[int, str] = {}
        for p, _, member, _, _ in rows:
            if p in last and last[p] != member:
                switches[p] += 1
            last[p] = member
        return LedgerReport(
            produced=produced,
            processed_ok=sum(1 for v in outcome.values() if v == "ok"),
            dead_lettered=sum(1 for v in outcome.values() if v == "dlq"),
            lost=len(lost),
            duplicates=sum(seen[k] - 1 for k in dups),
            switches=dict(switches),
            lost_offsets=lost[:20],
            duplicate_offsets=dups[:20],
        )
