"""Benchmark: the Kafka member's throughput against a raw confluent-kafka poll loop.

One run on one broker (the embedded test broker unless ``--bootstrap-servers`` is given). A
topic is pre-filled with ``--messages`` small JSON messages over ``--partitions`` partitions;
then, alternately (the order inside each round drawn with ``--seed``), each side reads all of
them from the start under its own consumer group:

* **raw**: a confluent-kafka ``Consumer`` that ``assign()``s every partition, calls
  ``consume(num_messages=--batch-size, timeout=0.05)``, runs the handler on each message and
  commits the next offsets asynchronously every 0.5 s;
* **member**: one :class:`~pubsub_canary.client.kafka.KafkaMember` (stable cohort, same batch
  size, default settings otherwise) granted every partition by an in-process coordinator
  (MemoryStore, MemoryTransport, no rollout: share 0).

The handler is the same function on both sides (decode JSON, a little arithmetic, count).
Throughput is measured from the first message handled to the last (``--messages`` in all), so
start-up and shutdown are not in it. The figure is the median over rounds of
member / raw, each round's pair measured back to back.

``--profile`` adds one cProfile run of each side and prints where the member spends the time
the raw loop does not.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import random
import time
from typing import Any

import _common as C

TARGET_RATIO = 0.95
COMMIT_INTERVAL = 0.5  # the member's default commit_interval_seconds
POLL_TIMEOUT = 0.05  # the member's consume() timeout


class CountingHandler:
    """The handler both sides run: :func:`_common.work` on the value, then count."""

    def __init__(self, total: int, extra_us: float = 0.0) -> None:
        self.total = total
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.on_done: Any = None
        self._spin = extra_us / 1e6

    def __call__(self, value: bytes | None) -> None:
        C.work(value)
        if self._spin:
            end = time.perf_counter() + self._spin
            while time.perf_counter() < end:
                pass
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()
        elif self.count == self.total:
            self.last = time.perf_counter()
            self.cpu_last = time.process_time()
            if self.on_done is not None:
                self.on_done()

    @property
    def rate(self) -> float:
        return (self.total - 1) / (self.last - self.first)

    @property
    def cpu_us(self) -> float:
        """CPU time of this process (every thread, librdkafka's too) per message, µs."""
        return (self.cpu_last - self.cpu_first) / (self.total - 1) * 1e6


def run_raw(bootstrap: str, topic: str, partitions: int, a: argparse.Namespace, group: str):
    """The raw loop; returns the handler (with its timings)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    h = CountingHandler(a.messages, a.handler_extra_us)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
        }
    )
    try:
        c.assign([TopicPartition(topic, p) for p in range(partitions)])
        nxt: dict[int, int] = {}
        last_commit = time.monotonic()
        while h.count < a.messages:
            for m in c.consume(num_messages=a.batch_size, timeout=POLL_TIMEOUT):
                err = m.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    continue
                h(m.value())
                nxt[m.partition()] = m.offset() + 1
            if time.monotonic() - last_commit >= COMMIT_INTERVAL and nxt:
                last_commit = time.monotonic()
                c.commit(
                    offsets=[TopicPartition(topic, p, o) for p, o in nxt.items()],
                    asynchronous=True,
                )
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in nxt.items()], asynchronous=False)
    finally:
        c.close()
    return h


def run_member(bootstrap: str, topic: str, partitions: int, a: argparse.Namespace, group: str):
    """One KafkaMember granted every partition; returns the handler (with its timings)."""
    from pubsub_canary.client.kafka import KafkaMember
    from pubsub_canary.client.processing import Record
    from pubsub_canary.client.transport import MemoryTransport
    from pubsub_canary.coordinator.service import Coordinator
    from pubsub_canary.coordinator.store import MemoryStore

    h = CountingHandler(a.messages, a.handler_extra_us)

    def handler(rec: Record) -> None:
        h(rec.value)

    coordinator = Coordinator(MemoryStore(), None)
    coordinator.start()
    try:
        member = KafkaMember(
            handler,
            coordinator=MemoryTransport(coordinator),
            bootstrap_servers=bootstrap,
            topic=topic,
            group_id=group,
            cohort="stable",
            version="1.0.0",
            batch_size=a.batch_size,
        )
        h.on_done = member.stop
        member.run(install_signal_handlers=False)
    finally:
        coordinator.stop()
    if h.count < a.messages:
        raise RuntimeError(f"the member stopped after {h.count} of {a.messages} messages")
    return h


SIDES = {"raw": run_raw, "member": run_member}


def micro_costs(a: argparse.Namespace, n: int = 200_000) -> list[tuple[str, float]]:
    """µs per message of each piece of work, timed without a broker on one synthetic message.

    The member's own per-message code is timed by calling it directly (``_process``, which is
    private: this is a measurement, not a use of the API).
    """
    import timeit

    from confluent_kafka import Message

    from pubsub_canary.client.kafka import KafkaMember
    from pubsub_canary.client.processing import (
        MetricsAccumulator,
        Outcome,
        Record,
        RetryPolicy,
        run_handler,
    )
    from pubsub_canary.client.session import MemberSession
    from pubsub_canary.client.transport import MemoryTransport

    msg = Message(
        topic="t", partition=3, offset=1234, key=None, value=C.payload(1234), timestamp=(1, 1)
    )
    h = CountingHandler(10**12, a.handler_extra_us)
    member = KafkaMember(
        lambda rec: h(rec.value),
        coordinator=MemoryTransport(None),  # type: ignore[arg-type]
        bootstrap_servers="unused:9092",
        topic="t",
        group_id="g",
        cohort="stable",
        version="1",
    )
    session = MemberSession(
        MemoryTransport(None),  # type: ignore[arg-type]
        transport_kind="kafka",
        topic="t",
        group_id="g",
        units=12,
        cohort="stable",
        version="1",
    )
    acc = MetricsAccumulator()
    outcome = Outcome(True, 1, None, 1e-5)
    nxt: dict[int, int] = {}
    positions = {p: 1000 for p in range(12)}

    def raw_body() -> None:
        if msg.error() is None:
            h(msg.value())
            nxt[msg.partition()] = msg.offset() + 1

    def record() -> None:
        headers = {k: v for k, v in (msg.headers() or []) if v is not None}
        ts_type, ts = msg.timestamp()
        Record("t", 3, 1234, msg.key(), msg.value(), headers, ts / 1000.0 if ts_type else None)

    rec = Record("t", 3, 1234, None, msg.value(), {}, 0.001)
    policy = RetryPolicy()

    def noop(_rec: Record) -> None:
        pass

    def report_per_batch() -> None:
        session.report(acc.drain(), dict(positions))

    def t(fn: Any, number: int = n) -> float:
        return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6

    batch = a.batch_size
    return [
        ("the handler alone", t(lambda: h(msg.value()))),
        ("raw loop body: error(), handler(value()), next offset", t(raw_body)),
        (
            "member _process(): Record + run_handler + metrics + next offset",
            t(lambda: member._process(msg, 3, 1234)),
        ),
        ("  of which: build the Record (headers, timestamp)", t(record)),
        (
            "  of which: run_handler() around a no-op handler (timing, Outcome)",
            t(lambda: run_handler(noop, rec, policy)),
        ),
        ("  of which: MetricsAccumulator.add()", t(lambda: acc.add(outcome, False))),
        ("member per message in _step(): session.lease_ending()", t(session.lease_ending)),
        (
            f"member per batch: session.report(metrics.drain()) / {batch}",
            t(report_per_batch, n // 50) / batch,
        ),
    ]


def profile(side: str, bootstrap: str, topic: str, partitions: int, a: argparse.Namespace) -> str:
    prof = cProfile.Profile()
    group = f"{topic}-profile-{side}"
    prof.enable()
    h = SIDES[side](bootstrap, topic, partitions, a, group)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(18)
    text = out.getvalue()
    start = text.find("   ncalls")
    return f"{side}: {h.rate:,.0f} msg/s under cProfile\n" + text[start:].rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmarks/kafka_overhead.py",
        description="Throughput of a KafkaMember against a raw confluent-kafka loop, same "
        "handler, same topic, measured side by side in one run.",
    )
    ap.add_argument("--bootstrap-servers", help="use this Kafka instead of the embedded broker")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--messages", type=int, default=300_000, help="pre-filled messages")
    ap.add_argument("--rounds", type=int, default=3, help="raw + member pairs measured")
    ap.add_argument("--warmup", type=int, default=1, help="pairs run first and not counted")
    ap.add_argument("--batch-size", type=int, default=200, help="consume(num_messages=...)")
    ap.add_argument(
        "--handler-extra-us", type=float, default=0.0, help="busy work added to the handler (µs)"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one run of each side")
    ap.add_argument("--seed", type=int, default=1, help="draws the order inside each round")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args(argv)
    if a.messages < 2 or a.rounds < 1 or a.partitions < 1:
        ap.error("need --messages >= 2, --rounds >= 1, --partitions >= 1")
    rng = random.Random(a.seed)
    t_run = time.monotonic()
    load_before = C.load_average()
    rates: dict[str, list[float]] = {"raw": [], "member": []}
    cpu: dict[str, list[float]] = {"raw": [], "member": []}
    ratios: list[float] = []
    profiles: list[str] = []
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(C.kafka_broker(a.bootstrap_servers))
        bootstrap = backend.bootstrap_servers
        desc = backend.description
        C.progress(f"broker: {desc}")
        topic = f"bench-overhead-{time.strftime('%Y%m%d%H%M%S')}"
        backend.create_topic(topic, a.partitions)
        C.wait_for_topic(bootstrap, topic, a.partitions)
        t0 = time.monotonic()
        C.prefill(bootstrap, topic, a.partitions, a.messages)
        C.progress(
            f"pre-filled {topic}: {a.messages} messages over {a.partitions} partitions "
            f"in {time.monotonic() - t0:.1f} s"
        )
        for r in range(a.warmup + a.rounds):
            order = ["raw", "member"]
            rng.shuffle(order)
            got: dict[str, float] = {}
            got_cpu: dict[str, float] = {}
            for side in order:
                h = SIDES[side](bootstrap, topic, a.partitions, a, f"{topic}-{side}-{r}")
                got[side] = h.rate
                got_cpu[side] = h.cpu_us
            warm = r < a.warmup
            C.progress(
                f"{'warm-up' if warm else f'round {r - a.warmup + 1}/{a.rounds}'} "
                f"({' then '.join(order)}): raw {got['raw']:,.0f} msg/s, member "
                f"{got['member']:,.0f} msg/s, ratio {got['member'] / got['raw']:.3f}; CPU "
                f"{got_cpu['raw']:.2f} vs {got_cpu['member']:.2f} µs/msg; load {C.load_average()}"
            )
            if not warm:
                for side in got:
                    rates[side].append(got[side])
                    cpu[side].append(got_cpu[side])
                ratios.append(got["member"] / got["raw"])
        if a.profile:
            for side in ("raw", "member"):
                profiles.append(profile(side, bootstrap, topic, a.partitions, a))
            costs = micro_costs(a)
            profiles.append(
                "µs per message, timed in isolation (timeit, best of 3):\n"
                + "\n".join(f"  {us:6.2f}  {what}" for what, us in costs)
            )
    runtime = time.monotonic() - t_run
    ratio = C.median(ratios)
    raw_us = 1e6 / C.median(rates["raw"])
    member_us = 1e6 / C.median(rates["member"])
    lines = [
        f"kafka_overhead  {time.strftime('%Y-%m-%d %H:%M')}  ({runtime:.0f} s)",
        f"machine: {C.machine_description()}; load average {load_before} at the start, "
        f"{C.load_average()} at the end",
        f"broker: {desc}",
        f"setup: {a.messages} messages pre-filled over {a.partitions} partitions; batch "
        f"{a.batch_size}; handler: JSON decode + arithmetic"
        + (f" + {a.handler_extra_us:g} µs busy work" if a.handler_extra_us else "")
        + f"; {a.rounds} rounds after {a.warmup} warm-up",
        f"raw confluent-kafka loop: {', '.join(f'{x:,.0f}' for x in rates['raw'])} msg/s "
        f"(median {C.median(rates['raw']):,.0f}, {raw_us:.2f} µs/msg)",
        f"KafkaMember:              {', '.join(f'{x:,.0f}' for x in rates['member'])} msg/s "
        f"(median {C.median(rates['member']):,.0f}, {member_us:.2f} µs/msg)",
        f"member / raw per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {ratio:.3f}"
        f"   (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})",
        f"the member's extra cost: {member_us - raw_us:.2f} µs per message (wall clock)",
        f"CPU time per message (all threads of the process): raw "
        f"{C.median(cpu['raw']):.2f} µs, member {C.median(cpu['member']):.2f} µs; ratio raw / "
        f"member {C.median(cpu['raw']) / C.median(cpu['member']):.3f}",
    ]
    print("\n".join(lines), flush=True)
    for p in profiles:
        print("\n" + p, flush=True)
    if a.json:
        C.emit_json(
            {
                "overhead_ratio": round(ratio, 4),
                "overhead_ratios": [round(x, 4) for x in ratios],
                "raw_msgs_per_s": round(C.median(rates["raw"])),
                "member_msgs_per_s": round(C.median(rates["member"])),
                "member_extra_us_per_msg": round(member_us - raw_us, 2),
                "cpu_ratio": round(C.median(cpu["raw"]) / C.median(cpu["member"]), 4),
                "messages": a.messages,
                "partitions": a.partitions,
                "handler_extra_us": a.handler_extra_us,
                "runtime_seconds": round(runtime, 1),
            }
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
