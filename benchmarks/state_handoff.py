"""Benchmark: the processing gap of a stateful handoff, by state size.

For each state size (``--sizes``, keys in one partition) one run on one broker (the embedded
test broker unless ``--bootstrap-servers`` is given):

1. A 1-partition input topic and its 1-partition changelog. The changelog is **seeded** with the
   state (``user-0000000`` .. keys, value 1, one checkpoint at input offset 0) by the library's
   own :class:`~pubsub_canary.client.state.ChangelogWriter`, so the first owner restores it.
   Seeding goes in chunks; after each one the changelog's low watermark is read: if the broker
   dropped records, the size **does not fit** on this broker and is reported as not measurable
   (no gap is ever reported for a state that was not restored whole).
2. The coordinator (FastAPI app under uvicorn in this process, SQLite store; the benchmark
   applies and aborts rollouts by direct calls) and two member processes
   (``StatefulKafkaMember`` over HTTP, library defaults), one stable and one canary, and a
   producer process sending ``--rate`` messages/s to the partition, each adding 1 to a random
   existing key.
3. ``--handoffs`` handoffs of the partition, alternating two kinds: a **step** (apply a rollout
   at 100 %, approval gate: the partition moves to the canary; the coordinator first lets the
   canary warm its state up from the changelog, if the library does that) and a **rollback**
   (abort: the partition moves back to stable at once; stable has kept the partition's state
   warm as its standby while the canary held it, if the library does that, else it restores
   from the changelog's start).

The first owner's restore of the seeded changelog (before any handoff) is a **cold restore**,
reported per size (``cold_restore_ms``): what a member without a warm copy pays (after a
crash, or when the standby member is gone).

The **gap** of a handoff runs from the old owner's last processed message of the partition
(offset ``o - 1``) to the new owner's first (offset ``o``), both from the members'
``on_processed`` hook (wall clock, same machine). Each new owner checks the state it restored:
``keys == size`` and, after its first message, ``sum(values) == size + o + 1`` (every message
adds 1 once). A handoff whose check fails is counted as incomplete, and the size gets no gap.

Where the gap goes (per handoff, then p50/p99 per kind); the legs add up to the gap:

* ``to_revoke``: old owner's last message -> the coordinator's revoke (negative when the old
  owner was still processing when the revoke was decided);
* ``revoke_to_grant``: the coordinator's ``Grant.handoff_seconds`` (revoke pushed, final
  checkpoint written and flushed, offset committed, release, grant);
* ``notify``: grant -> the new owner starts preparing the grant (its long-poll answers);
* ``prepare``: preparing apart from reading the changelog (e.g. stopping a warm-up thread);
* ``restore``: ``member.restore_seconds[p]`` (reading the changelog: all of it, or the tail left
  after a warm-up);
* ``resume``: prepared -> first message processed (assign, fetch, handle).

``gap - restore`` is what a handoff costs when reading the changelog is free. ``move`` (operator
action -> grant) shows what a warm-up adds before the handoff starts. The cold restores of the
sizes measured give ``restore = fixed + per record``, from which a cold restore of sizes not
measured is extrapolated (labelled as such).

On the test broker the members get ``fetch.wait.max.ms`` 10 (``--fetch-wait-max-ms``): it answers
a waiting fetch only when that times out, so with librdkafka's 500 ms a member sees its input
in 0.5 s bursts and a warm-up sees the old owner's final checkpoint up to 0.5 s late, which a
real broker does not do.

Sizes that do not fit uncompressed are tried again with the members' and seeder's producer
compressing the changelog (``--fallback-compression``, zstd by default: a producer setting
users can make, not a library change). ``handoff_gap_p99_ms`` takes, per size, the uncompressed
run where it fits, else the compressed one, and ``changelog_compression`` says which; the
compressed runs are also reported apart. ``--probe-retention`` characterises the test broker's
log limit and the changelog encodings instead of measuring handoffs.

Prints figures as it goes (stderr: progress), then with ``--json`` one JSON object as the last
line of stdout: ``{"handoff_gap_p99_ms": {"10000": ..., "100000": ... or null, ...}, ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C

TARGET_P99_MS = 1000.0
TARGET_KEYS = 100_000
SEED_VALUE = 1
SEED_CHUNK = 50_000
#: librdkafka's mock cluster keeps at most this many bytes of record batches per partition
#: (rdkafka_mock.c: ``mpart->max_size = 1024 * 1024 * 5``; ``max_cnt = 100000`` batches is never
#: reached first: the smallest batch is 68 bytes). ``--probe-retention`` checks it.
MOCK_PARTITION_MAX_BYTES = 5 * 1024 * 1024
BATCH_HEADER_BYTES = 61  # Kafka record batch v2 header
CHANGELOG_HEADERS = ("pc.epoch", "pc.through", "pc.format")


def key_name(i: int) -> str:
    return f"user-{i:07d}"


# --- the record batch format (to predict what the broker stores) ----------------------------------


def _varint_len(n: int) -> int:
    z = (n << 1) ^ (n >> 63)  # zigzag, as Kafka's record fields
    length = 1
    while z >= 0x80:
        z >>= 7
        length += 1
    return length


def record_bytes(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    offset_delta: int,
    timestamp_delta: int = 0,
) -> int:
    """Size of one record in a v2 record batch (uncompressed), length prefix included."""
    body = 1 + _varint_len(timestamp_delta) + _varint_len(offset_delta)
    for part in (key, value):
        body += _varint_len(-1) if part is None else _varint_len(len(part)) + len(part)
    body += _varint_len(len(headers))
    for name, v in headers:
        body += _varint_len(len(name)) + len(name) + _varint_len(len(v)) + len(v)
    return _varint_len(body) + body


def encoding_table(epoch: int = 12, through: int = 1_234_567, batch: int = 10_000) -> dict:
    """Bytes per changelog record (batch header shared by ``batch`` records) and keys that fit
    in the test broker's partition, for the benchmark's records in each encoding."""
    from pubsub_canary.client.state import stamp_prefix

    value = b"17"
    headers = [(CHANGELOG_HEADERS[0], str(epoch).encode())]
    headers += [(CHANGELOG_HEADERS[1], str(through).encode()), (CHANGELOG_HEADERS[2], b"1")]
    binary_prefix = bytes(1 + _varint_len(epoch))  # a format byte + a varint epoch (sizes)
    forms = {
        # the library's: epoch and format in a value prefix, headers on the marker only
        "current": (stamp_prefix(1, epoch) + value, []),
        "three_headers_per_record": (value, headers),  # the library's encoding before 1.x
        "binary_prefix": (binary_prefix + value, []),
        "no_metadata": (value, []),
    }
    out: dict[str, Any] = {
        "record": f"key {key_name(1234567)!r} (12 B), JSON value {value.decode()!r}, "
        f"epoch {epoch}, through {through}, {batch:,} records per batch",
    }
    for name, (v, h) in forms.items():
        total = BATCH_HEADER_BYTES + sum(
            record_bytes(key_name(i).encode(), v, h, i) for i in range(batch)
        )
        per = total / batch
        out[name] = {
            "bytes_per_record": round(per, 1),
            "keys_fitting_test_broker": int(MOCK_PARTITION_MAX_BYTES // per),
        }
    return out


# --- the test broker's log limit ------------------------------------------------------------------


def _watermarks(bootstrap: str, topic: str, partition: int = 0) -> tuple[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "state-handoff-watermarks"})
    try:
        low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return int(low), int(high)
    finally:
        c.close()


def retention_case(
    bootstrap: str,
    create_topic: Any,
    topic: str,
    per_batch: int,
    batches: int,
    value_bytes: int,
    headers: list[tuple[str, bytes]],
    keyed: bool = True,
) -> dict[str, Any]:
    """Produce ``batches`` batches of exactly ``per_batch`` records (one flush each) and compare
    the low watermark with the model "oldest whole batches go while the stored bytes exceed
    5 MiB"."""
    from confluent_kafka import Producer

    create_topic(topic, 1)
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 100_000,  # a batch closes at the flush
            "batch.num.messages": per_batch,
            "batch.size": 10_000_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    value = b"x" * value_bytes
    sizes = []
    n = 0
    for _ in range(batches):
        size = BATCH_HEADER_BYTES
        for i in range(per_batch):
            key = key_name(n).encode() if keyed else None
            p.produce(topic, key=key, value=value, partition=0, headers=headers or None)
            size += record_bytes(key, value, headers, i)
            n += 1
        if p.flush(60):
            raise RuntimeError(f"records not delivered to {topic}")
        sizes.append(size)
    low, high = _watermarks(bootstrap, topic)
    total, dropped = sum(sizes), 0
    while total > MOCK_PARTITION_MAX_BYTES and dropped < len(sizes) - 1:
        total -= sizes[dropped]
        dropped += 1
    kept_batches = sizes[low // per_batch :] if low % per_batch == 0 else []
    return {
        "records": n,
        "record_bytes": round((sizes[0] - BATCH_HEADER_BYTES) / per_batch, 1),
        "records_per_batch": per_batch,
        "headers": len(headers),
        "low_watermark": low,
        "kept_records": high - low,
        "kept_bytes": sum(kept_batches) if kept_batches else None,
        "predicted_low_watermark": dropped * per_batch,
        "model_exact": low == dropped * per_batch,
    }


def probe_retention(bootstrap: str, create_topic: Any, full: bool) -> dict[str, Any]:
    hdrs = [(CHANGELOG_HEADERS[0], b"3"), (CHANGELOG_HEADERS[1], b"123456")]
    hdrs.append((CHANGELOG_HEADERS[2], b"1"))
    cases = [
        ("small, 3 headers", 1000, 200, 2, hdrs, True),
        ("10 kB values, 1 record per batch", 1, 700, 10_000, [], False),
    ]
    if full:
        cases += [
            ("small, no headers", 1000, 300, 2, [], True),
            ("100 B values", 500, 120, 100, [], True),
            ("1 kB values", 100, 80, 1000, [], False),
            # 80,000 one-record batches: more than 5 MiB / 68 B, far fewer than 100,000.
            ("empty records, 1 per batch", 1, 80_000, 0, [], False),
        ]
    run = time.strftime("%H%M%S")
    out = []
    for i, (label, per, batches, vb, h, keyed) in enumerate(cases):
        r = retention_case(bootstrap, create_topic, f"sh-ret-{run}-{i}", per, batches, vb, h, keyed)
        r["case"] = label
        out.append(r)
        C.progress(
            f"retention: {label}: {r['records']:,} records of {r['record_bytes']} B in "
            f"{batches} batches -> low watermark {r['low_watermark']:,} (model "
            f"{r['predicted_low_watermark']:,}), kept {r['kept_records']:,} records = "
            f"{r['kept_bytes']} B"
        )
    return {
        "partition_limit_bytes": MOCK_PARTITION_MAX_BYTES,
        "model_exact": all(r["model_exact"] for r in out),
        "max_kept_bytes": max(r["kept_bytes"] or 0 for r in out),
        "cases": out,
    }


def probe_capacity(
    bootstrap: str, create_topic: Any, keys: int = 1_000_000
) -> dict[str, dict[str, int | str]]:
    """Keys a changelog partition keeps, per encoding and compression, by overfilling it."""
    from confluent_kafka import Producer

    from pubsub_canary.client.state import ChangelogWriter, PartitionState, StateFormats

    run = time.strftime("%H%M%S")
    out: dict[str, dict[str, int | str]] = {}
    for enc in ("current", "no_metadata"):
        for comp in ("none", "lz4", "zstd"):
            topic = f"sh-cap-{run}-{enc.replace('_', '-')}-{comp}"
            create_topic(topic, 1)
            p = Producer(_producer_config(bootstrap, comp))
            if enc == "current":
                w = ChangelogWriter(p, topic, StateFormats())
                for start in range(0, keys, SEED_CHUNK):
                    st = PartitionState(0)
                    for i in range(start, min(keys, start + SEED_CHUNK)):
                        st[key_name(i)] = SEED_VALUE
                    w.checkpoint(0, 1, 0, st)
                    w.flush(120)
            else:
                for i in range(keys):
                    while True:
                        try:
                            p.produce(topic, key=key_name(i).encode(), value=b"1")
                            break
                        except BufferError:
                            p.poll(0.05)
                p.flush(120)
            low, high = _watermarks(bootstrap, topic)
            kept = high - low
            out.setdefault(enc, {})[comp] = kept if low > 0 else f">= {kept}"
            C.progress(f"capacity: {enc}, compression {comp}: keeps {out[enc][comp]} records")
    return out


# --- the member and producer processes ----------------------------------------------------------


def _producer_config(bootstrap: str, compression: str) -> dict[str, Any]:
    """The member's producer settings (KafkaMember defaults) plus the compression asked for."""
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap, "enable.idempotence": True}
    cfg["linger.ms"] = 5
    if compression != "none":
        cfg["compression.type"] = compression
    return cfg


def _member_main(a: argparse.Namespace) -> int:
    from pubsub_canary.client.processing import Outcome, Record
    from pubsub_canary.client.state import PartitionState
    from pubsub_canary.client.stateful import StatefulKafkaMember

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ledger = open(a.ledger, "a", buffering=1 << 16)  # noqa: SIM115
    events = open(a.ledger + ".events", "a", buffering=1)  # noqa: SIM115
    keys = a.keys

    def handler(rec: Record, state: PartitionState) -> None:
        k = (rec.key or b"").decode()
        state[k] = state.get(k, 0) + 1

    class Member(StatefulKafkaMember):
        """Logs each grant's restore and checks the restored state on its first message."""

        check: dict[int, tuple[int, int]] = {}

        def _prepare_grants(self, grants: Any, starts: dict[int, int | None]) -> Any:
            offered = dict(starts)
            # Units a warm-up (the library's, if it has one) read ahead before the grant.
            warm = set(getattr(self, "_warmers", {}))
            t0 = time.time()
            out = super()._prepare_grants(grants, starts)
            t1 = time.time()
            for g in grants:
                st = self.states.get(g.unit)
                n = len(st) if st is not None else -1
                self.check[g.unit] = (g.epoch, n)
                ev = {"ev": "restored", "unit": g.unit, "epoch": g.epoch, "start": t0, "end": t1}
                ev.update(offered=offered.get(g.unit), starts=out.get(g.unit), keys=n)
                ev["restore_seconds"] = self.restore_seconds.get(g.unit)
                ev["warm"] = g.unit in warm
                events.write(json.dumps(ev) + "\n")
            return out

    member = Member(
        handler,
        coordinator=a.coordinator,
        bootstrap_servers=a.bootstrap_servers,
        topic=a.topic,
        group_id=a.group,
        changelog_topic=a.changelog,
        cohort=a.cohort,
        version=a.version,
        member_id=a.member_id,
        producer_config=json.loads(a.producer_config) if a.producer_config else None,
        consumer_config=json.loads(a.consumer_config) if a.consumer_config else None,
    )
    last_flush = [time.monotonic()]

    def on_processed(rec: Record, outcome: Outcome, dead: bool) -> None:
        now = time.time()
        ledger.write(f"{rec.partition} {rec.offset} {now:.6f}\n")
        pending = member.check.pop(rec.partition, None)
        if pending is not None:
            epoch, restored_keys = pending
            state = member.states[rec.partition]
            ev = {"ev": "first", "unit": rec.partition, "epoch": epoch, "offset": rec.offset}
            ev.update(at=now, restored_keys=restored_keys, keys=len(state))
            ev.update(total=sum(state.values()), expected_total=keys * SEED_VALUE + rec.offset + 1)
            ev["complete"] = restored_keys == keys and ev["total"] == ev["expected_total"]
            events.write(json.dumps(ev) + "\n")
        if time.monotonic() - last_flush[0] > 1.0:
            last_flush[0] = time.monotonic()
            ledger.flush()

    member.on_processed = on_processed
    C._exit_with_parent(member.stop)
    try:
        member.run(install_signal_handlers=True)
    finally:
        ledger.close()
        events.close()
    return 0


def _producer_main(a: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    C._exit_with_parent(stop.set)
    p = Producer({"bootstrap.servers": a.bootstrap_servers, "linger.ms": 5})
    rnd = random.Random(a.seed)
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - start) * a.rate)
        while n < due:
            try:
                p.produce(a.topic, key=key_name(rnd.randrange(a.keys)).encode(), value=b"%d" % n)
            except BufferError:
                p.poll(0.05)
                continue
            n += 1
        p.poll(0)
        time.sleep(0.005)
    p.flush(30)
    return 0


def spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(C.ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out.close()
    return proc


# --- one state size -------------------------------------------------------------------------------


@dataclass
class GrantRecord:
    phase: str
    unit: int
    member: str
    epoch: int
    offset: int | None
    granted_at: float
    handoff_seconds: float | None
    graceful: bool


def seed_changelog(bootstrap: str, topic: str, keys: int, compression: str) -> dict[str, Any]:
    """Write ``keys`` keys as checkpoints at input offset 0; stop as soon as the broker trims."""
    from confluent_kafka import Producer

    from pubsub_canary.client.state import ChangelogWriter, PartitionState, StateFormats

    p = Producer(_producer_config(bootstrap, compression))
    w = ChangelogWriter(p, topic, StateFormats())
    t0 = time.monotonic()
    low = high = 0
    for start in range(0, keys, SEED_CHUNK):
        st = PartitionState(0)
        for i in range(start, min(keys, start + SEED_CHUNK)):
            st[key_name(i)] = SEED_VALUE
        w.checkpoint(0, 0, 0, st)  # epoch 0, state as of input offset 0
        w.flush(300)
        low, high = _watermarks(bootstrap, topic)
        if low > 0:
            return {"fits": False, "written": high, "low_watermark": low, "kept": high - low}
    return {"fits": True, "records": high, "seconds": time.monotonic() - t0}


def rollout_spec(name: str, topic: str, group: str) -> dict[str, Any]:
    off = {"error_rate": None, "dead_letter_rate": None, "latency": None, "lag_growth": None}
    return {
        "name": name,
        "target": {"transport": "kafka", "topic": topic, "group": group},
        "stable_version": "1.0.0",
        "canary_version": "1.1.0",
        "steps": [{"share": 100, "hold_seconds": 0, "approval": True}],
        "analysis": off,
    }


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def run_size(
    a: argparse.Namespace, backend: Any, keys: int, compression: str, workdir: Path
) -> dict[str, Any]:
    from pubsub_canary.client.state import ensure_changelog
    from pubsub_canary.coordinator.broker import KafkaBroker
    from pubsub_canary.coordinator.service import Coordinator
    from pubsub_canary.coordinator.store import open_store
    from pubsub_canary.core.model import parse_rollout_spec

    bootstrap = backend.bootstrap_servers
    label = f"{keys}" + ("" if compression == "none" else f"-{compression}")
    wd = workdir / label
    wd.mkdir(parents=True, exist_ok=True)
    topic = f"sh-{time.strftime('%H%M%S')}-{label}"
    changelog = f"{topic}.changelog"
    backend.create_topic(topic, 1)
    if getattr(backend, "kind", "") == "embedded":
        # (ensure_changelog's metadata lookup would auto-create it with 4 partitions there)
        backend.create_topic(changelog, 1)
    else:
        ensure_changelog(bootstrap, changelog, 1)  # compacted
    C.wait_for_topic(bootstrap, topic, 1)
    C.wait_for_topic(bootstrap, changelog, 1)
    seed = seed_changelog(bootstrap, changelog, keys, compression)
    if not seed["fits"]:
        C.progress(
            f"{keys:,} keys (changelog compression {compression}): does not fit: the broker "
            f"dropped the oldest {seed['low_watermark']:,} of {seed['written']:,} changelog "
            "records while seeding"
        )
        return {"keys": keys, "compression": compression, "measurable": False, "seed": seed}
    C.progress(f"{keys:,} keys: changelog seeded, {seed['records']:,} records")

    store = open_store(f"sqlite:///{wd / 'coordinator.db'}")
    broker = KafkaBroker(bootstrap)
    c = Coordinator(store, broker, lease_seconds=a.lease_seconds)
    grants: list[GrantRecord] = []
    phase = ["startup"]
    lock = threading.Lock()

    def on_grant(ev: Any) -> None:  # under the coordinator's lock, right after the grant
        st = c.groups[ev.group].units[ev.unit]
        g = GrantRecord(
            phase[0], ev.unit, ev.member, ev.epoch, st.offset, time.time(), ev.seconds, ev.graceful
        )
        with lock:
            grants.append(g)

    c.handoff_listeners.append(on_grant)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    member_producer = {} if compression == "none" else {"compression.type": compression}
    member_consumer = (
        {} if a.fetch_wait_max_ms is None else {"fetch.wait.max.ms": a.fetch_wait_max_ms}
    )
    ledgers = {m: wd / f"ledger-{m}.txt" for m in ("stable-1", "canary-1")}
    checks: list[dict[str, Any]] = []
    changelog_marks: dict[str, tuple[int, int]] = {}
    acted_at: dict[str, float] = {}
    rollbacks: set[str] = set()
    load_start = C.load_average()
    # Members talk to the coordinator over HTTP; the operator's actions are direct calls (an
    # operator's HTTP round trip is not part of a handoff).
    with C.HttpCoordinator(c) as http:
        try:
            for mid, cohort, version in (
                ("stable-1", "stable", "1.0.0"),
                ("canary-1", "canary", "1.1.0"),
            ):
                procs[mid] = spawn(
                    [
                        "member",
                        *("--coordinator", http.url, "--bootstrap-servers", bootstrap),
                        *("--topic", topic, "--group", f"{topic}-g", "--changelog", changelog),
                        *("--cohort", cohort, "--version", version, "--member-id", mid),
                        *("--ledger", str(ledgers[mid]), "--keys", str(keys)),
                        *("--producer-config", json.dumps(member_producer)),
                        *("--consumer-config", json.dumps(member_consumer)),
                    ],
                    wd / f"member-{mid}.log",
                )

            def alive() -> None:
                for mid, p in procs.items():
                    if p.poll() is not None and p.returncode not in (0, -15):
                        tail = (wd / f"member-{mid}.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"member {mid} exited with {p.returncode}:\n{tail}")

            def first_of(g: GrantRecord) -> dict[str, Any] | None:
                alive()
                for ev in read_events(Path(str(ledgers[g.member]) + ".events")):
                    if ev["ev"] == "first" and ev["unit"] == g.unit and ev["epoch"] == g.epoch:
                        return ev
                return None

            def await_grant_processed(ph: str, member: str, timeout: float) -> dict[str, Any]:
                out: dict[str, Any] = {}

                def ok() -> bool:
                    with lock:
                        mine = [g for g in grants if g.phase == ph and g.member == member]
                    if not mine:
                        alive()
                        return False
                    ev = first_of(mine[-1])
                    if ev is not None:
                        out.update(ev)
                    return ev is not None

                C.wait_until(ok, timeout, f"{member} to process its grant ({ph})", 0.02)
                return out

            # Startup: stable gets the partition and restores the seeded state.
            producer = spawn(
                [
                    "producer",
                    *("--bootstrap-servers", bootstrap, "--topic", topic),
                    *("--keys", str(keys), "--rate", str(a.rate), "--seed", str(a.seed)),
                ],
                wd / "producer.log",
            )
            procs["producer"] = producer
            first = await_grant_processed("startup", "stable-1", a.restore_timeout + 60)
            checks.append(first)
            time.sleep(a.dwell)
            timeout = a.restore_timeout + 30
            for i in range(a.handoffs):
                if i % 2 == 0:
                    name = f"r{i // 2 + 1}"
                    phase[0] = f"h{i}"
                    acted_at[phase[0]] = time.time()
                    c.apply_rollout(parse_rollout_spec(rollout_spec(name, topic, f"{topic}-g")))
                    checks.append(await_grant_processed(phase[0], "canary-1", timeout))
                else:
                    phase[0] = f"h{i}"
                    acted_at[phase[0]] = time.time()
                    rollbacks.add(phase[0])
                    c.act(name, "abort")
                    checks.append(await_grant_processed(phase[0], "stable-1", timeout))
                changelog_marks[phase[0]] = _watermarks(bootstrap, changelog)
                last = checks[-1]
                if not last.get("complete"):
                    C.progress(f"{keys:,} keys: handoff {i + 1}: state INCOMPLETE: {last}")
                    break
                if (i + 1) % 5 == 0 or i + 1 == a.handoffs:
                    C.progress(f"{keys:,} keys: {i + 1}/{a.handoffs} handoffs, state complete")
                time.sleep(a.dwell)
            phase[0] = "shutdown"
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                C.stop_worker(p, 30)
            broker.close()
            store.close()
    load_end = C.load_average()
    events = {m: read_events(Path(str(ledgers[m]) + ".events")) for m in ledgers}
    ledger = {m: C.read_ledger(ledgers[m]) for m in ledgers}
    return {
        "keys": keys,
        "compression": compression,
        "measurable": True,
        "seed": seed,
        "load": [load_start, load_end],
        **figures(grants, events, ledger, checks, changelog_marks, acted_at, rollbacks),
    }


LEGS = ("to_revoke", "revoke_to_grant", "notify", "prepare", "restore", "resume")


def figures(
    grants: list[GrantRecord],
    events: dict[str, list[dict[str, Any]]],
    ledger: dict[str, dict[tuple[int, int], float]],
    checks: list[dict[str, Any]],
    marks: dict[str, tuple[int, int]],
    acted_at: dict[str, float],
    rollbacks: set[str],
) -> dict[str, Any]:
    """Per handoff: the gap and its legs (seconds), from grants, member events and ledgers."""
    rows: list[dict[str, Any]] = []
    incomplete = sum(1 for ev in checks if not ev.get("complete"))
    prev_owner: dict[int, str] = {}
    unmatched = 0

    def event(kind: str, g: GrantRecord) -> dict[str, Any] | None:
        for e in events[g.member]:
            if e["ev"] == kind and e["unit"] == g.unit and e["epoch"] == g.epoch:
                return e
        return None

    cold: float | None = None
    for g in grants:
        old = prev_owner.get(g.unit)
        prev_owner[g.unit] = g.member
        if g.phase == "startup" and cold is None:
            # The first owner reads the seeded changelog from its start: a cold restore.
            rest = event("restored", g)
            cold = rest["restore_seconds"] if rest is not None else None
        if g.phase in ("startup", "shutdown") or old is None:
            continue
        rest, first = event("restored", g), event("first", g)
        t_last = ledger[old].get((g.unit, g.offset - 1)) if g.offset else None
        t_first = ledger[g.member].get((g.unit, g.offset)) if g.offset is not None else None
        if rest is None or first is None or t_last is None or t_first is None:
            unmatched += 1
            continue
        if not first["complete"]:
            continue  # never a gap for an incomplete restore
        revoked = g.granted_at - (g.handoff_seconds or 0.0)
        rows.append(
            {
                # a rollout step waits for the next owner's warm-up; a rollback never does
                "kind": "rollback" if g.phase in rollbacks else "step",
                "warmer": bool(rest.get("warm")),  # the new owner had started a warm-up
                "gap": t_first - t_last,
                # old owner's last message -> the coordinator's revoke (negative: the old
                # owner was still processing when the revoke was decided)
                "to_revoke": revoked - t_last,
                "revoke_to_grant": g.granted_at - revoked,  # Grant.handoff_seconds
                "notify": rest["start"] - g.granted_at,  # the new owner hears of the grant
                # preparing the grant apart from reading the changelog (finishing a warm-up)
                "prepare": rest["end"] - rest["start"] - rest["restore_seconds"],
                "restore": rest["restore_seconds"],  # member.restore_seconds[p]
                "resume": t_first - rest["end"],  # assign, fetch, first message
                # operator's action -> grant: includes waiting for a warm-up
                "move": g.granted_at - acted_at[g.phase] if g.phase in acted_at else None,
                # the changelog's length right after the handoff: what the restore read
                "records": marks.get(g.phase, (0, 0))[1],
            }
        )
    return {
        "handoffs": len(rows),
        "incomplete_restores": incomplete,
        "unmatched": unmatched,
        **summarise(rows),
        "by_kind": {
            kind: summarise([r for r in rows if r["kind"] == kind])
            for kind in ("step", "rollback")
            if any(r["kind"] == kind for r in rows)
        },
        "changelog_records_read_p50": C.median([r["records"] for r in rows]) if rows else None,
        "cold_restore_seconds": cold,
        "changelog_low_watermark_max": max((lo for lo, _ in marks.values()), default=None),
        "rows": rows,
    }


def _ms(values: list[float], q: float) -> float | None:
    return C.rounded(C.percentile(values, q) * 1000.0, 1) if values else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def col(name: str) -> list[float]:
        return [r[name] for r in rows if r[name] is not None]

    return {
        "n": len(rows),
        "gap_ms": [round(x * 1000.0, 1) for x in col("gap")],
        "gap_p50_ms": _ms(col("gap"), 50),
        "gap_p99_ms": _ms(col("gap"), 99),
        "legs_p50_ms": {k: _ms(col(k), 50) for k in LEGS},
        "legs_p99_ms": {k: _ms(col(k), 99) for k in LEGS},
        "gap_without_restore_p99_ms": _ms([r["gap"] - r["restore"] for r in rows], 99),
        "move_p50_ms": _ms(col("move"), 50),
        "move_p99_ms": _ms(col("move"), 99),
    }


def restore_fit(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """Least squares: restore seconds = fixed + per_record * changelog records."""
    pts = [(r["records"], r["restore"]) for r in rows if r["records"] > 0]
    if not pts or max(x for x, _ in pts) < 3 * min(x for x, _ in pts):
        return None  # one state size: no slope to fit
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return {"fixed_ms": round((my - b * mx) * 1000.0, 1), "us_per_record": round(b * 1e6, 2)}


# --- main -----------------------------------------------------------------------------------------


def library_version() -> str:
    """The commit the library was imported from (+dirty when its state code differs)."""
    import pubsub_canary

    root = Path(pubsub_canary.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "pubsub_canary/client"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{root} (not a git checkout)"
    if not rev:
        return f"{root} (not a git checkout)"
    return f"{rev}{'+dirty' if dirty else ''} ({root})"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] in (["member"], ["producer"]):
        return _worker(argv)
    ap = argparse.ArgumentParser(
        prog="benchmarks/state_handoff.py",
        description="Processing gap of a stateful partition handoff, by state size.",
    )
    ap.add_argument("--bootstrap-servers", help="use this Kafka instead of the embedded broker")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="keys of state, comma list")
    ap.add_argument("--handoffs", type=int, default=20, help="handoffs per size")
    ap.add_argument("--rate", type=float, default=200.0, help="messages/s to the partition")
    ap.add_argument("--dwell", type=float, default=1.0, help="seconds between handoffs")
    ap.add_argument("--lease-seconds", type=float, default=6.0)
    ap.add_argument("--restore-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--fetch-wait-max-ms",
        default=None,
        help="members' fetch.wait.max.ms (input and changelog reads). Default: 10 on the test "
        "broker, which answers a waiting fetch only when it times out (so 500 ms bursts a real "
        "broker does not have); librdkafka's own (500) elsewhere. 'default': librdkafka's",
    )
    ap.add_argument(
        "--fallback-compression",
        default="zstd",
        choices=["none", "lz4", "zstd", "gzip", "snappy"],
        help="for sizes whose changelog does not fit uncompressed, measure again with the "
        "changelog producer compressing ('none': do not). Default: %(default)s",
    )
    ap.add_argument(
        "--probe-retention",
        action="store_true",
        help="characterise the broker's log limit and the encodings' capacity; no handoffs",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--workdir", help="keep ledgers, events and logs here")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if a.fetch_wait_max_ms is None:
        a.fetch_wait_max_ms = None if a.bootstrap_servers else 10
    elif a.fetch_wait_max_ms == "default":
        a.fetch_wait_max_ms = None
    else:
        a.fetch_wait_max_ms = int(a.fetch_wait_max_ms)
    if a.handoffs < 1 or not sizes:
        ap.error("need --handoffs >= 1 and at least one size")
    t_run = time.monotonic()
    load_before = C.load_average()
    out: dict[str, Any] = {
        "machine": C.machine_description(),
        "library": library_version(),
        "load_1m_before": load_before,
    }
    with contextlib.ExitStack() as stack:
        workdir = C.workdir_with_log(stack, a.workdir)
        backend = stack.enter_context(C.kafka_broker(a.bootstrap_servers))
        bootstrap = backend.bootstrap_servers
        embedded = getattr(backend, "kind", "") == "embedded"
        out["broker"] = backend.description
        C.progress(f"broker: {backend.description}; library {out['library']}")
        out["encoding"] = encoding_table()
        if embedded or a.probe_retention:
            out["test_broker_retention"] = probe_retention(
                bootstrap, backend.create_topic, a.probe_retention
            )
        if a.probe_retention:
            out["capacity_records"] = probe_capacity(bootstrap, backend.create_topic)
        else:
            out.update(measure(a, backend, sizes, workdir))
    out["load_1m_after"] = C.load_average()
    out["seconds"] = round(time.monotonic() - t_run, 1)
    report(out)
    if a.json:
        C.emit_json(out)
    return 0


def measure(a: argparse.Namespace, backend: Any, sizes: list[int], workdir: Path) -> dict:
    runs: dict[str, dict[str, Any]] = {}
    fallback: dict[str, dict[str, Any]] = {}
    for keys in sizes:
        r = run_size(a, backend, keys, "none", workdir)
        runs[str(keys)] = r
        if not r["measurable"] and a.fallback_compression != "none":
            fallback[str(keys)] = run_size(a, backend, keys, a.fallback_compression, workdir)

    def ok(r: dict[str, Any]) -> bool:
        return r["measurable"] and r["incomplete_restores"] == 0 and r["handoffs"] > 0

    def pick(field: str, rs: dict[str, dict[str, Any]], kind: str | None = None) -> dict:
        def one(r: dict[str, Any]) -> Any:
            if not ok(r):
                return None
            src = r if kind is None else r["by_kind"].get(kind)
            return None if src is None else src[field]

        return {k: one(r) for k, r in rs.items()}

    # Cold restores: the first owner of each size reads the seeded changelog from its start.
    # seconds = fixed + per record, over every size.
    every = [*runs.values(), *fallback.values()]
    cold_rows = [  # uncompressed only: decompressing costs per record too
        {"records": r["seed"]["records"], "restore": r["cold_restore_seconds"]}
        for r in runs.values()
        if ok(r) and r.get("cold_restore_seconds") is not None
    ]
    fit = restore_fit(cold_rows)
    cold_ms = {
        f"{r['keys']}" + ("" if r["compression"] == "none" else f"-{r['compression']}"): round(
            r["cold_restore_seconds"] * 1000.0, 1
        )
        for r in every
        if ok(r) and r.get("cold_restore_seconds") is not None
    }
    for r in every:
        if "rows" in r:
            label = f"{r['keys']}-{r['compression']}"
            (workdir / f"handoffs-{label}.json").write_text(json.dumps(r.pop("rows")))
    # Per size, the uncompressed run where the changelog fits, else the compressed one (the
    # member's producer compressing the changelog: a setting users can make); which one is in
    # changelog_compression.
    best = {k: r if ok(r) or k not in fallback else fallback[k] for k, r in runs.items()}
    res: dict[str, Any] = {
        "handoff_gap_p99_ms": pick("gap_p99_ms", best),
        "handoff_gap_p50_ms": pick("gap_p50_ms", best),
        "handoff_gap_p99_ms_step": pick("gap_p99_ms", best, "step"),
        "handoff_gap_p99_ms_rollback": pick("gap_p99_ms", best, "rollback"),
        "changelog_compression": {k: r["compression"] for k, r in best.items() if ok(r)},
        "handoffs": {k: r.get("handoffs", 0) for k, r in best.items()},
        "not_measurable": {
            k: _why_not(r, a.bootstrap_servers is None) for k, r in best.items() if not ok(r)
        },
        # Measured: a member given a partition it has no warm copy of (after a crash, or a
        # standby lost with its member) restores it from the changelog's start.
        "cold_restore_ms": cold_ms,
        "restore_model_cold": fit,
        # Extrapolated from the fit at one changelog record per key (a fully compacted
        # changelog): what reading it from the start would cost; not a measurement.
        "cold_restore_ms_extrapolated": {
            str(k): round(fit["fixed_ms"] + fit["us_per_record"] * k / 1000.0, 1) for k in sizes
        }
        if fit
        else None,
        "target": {"keys": TARGET_KEYS, "gap_p99_ms": TARGET_P99_MS},
        "rate_per_s": a.rate,
        "fetch_wait_max_ms": a.fetch_wait_max_ms,
        "runs": runs,
    }
    if fallback:
        comp = a.fallback_compression
        res[f"handoff_gap_p99_ms_{comp}_changelog"] = pick("gap_p99_ms", fallback)
        res[f"handoff_gap_p99_ms_step_{comp}_changelog"] = pick("gap_p99_ms", fallback, "step")
        res[f"handoff_gap_p99_ms_rollback_{comp}_changelog"] = pick(
            "gap_p99_ms", fallback, "rollback"
        )
        res[f"runs_{comp}_changelog"] = fallback
    return res


def _why_not(r: dict[str, Any], embedded: bool) -> str:
    if not r["measurable"]:
        s = r["seed"]
        where = "the test broker" if embedded else "this broker"
        return (
            f"changelog does not fit on {where}: it dropped the oldest {s['low_watermark']:,} of "
            f"{s['written']:,} records while seeding"
            + (
                f" (it keeps {MOCK_PARTITION_MAX_BYTES:,} bytes per partition); measure with "
                "--bootstrap-servers against a real Kafka with a compacted changelog"
                if embedded
                else ""
            )
        )
    return f"{r['incomplete_restores']} restores incomplete, {r['handoffs']} complete"


def report(out: dict[str, Any]) -> None:
    print(f"machine: {out['machine']}; library {out['library']}")
    print(
        f"broker: {out['broker']}; load (1 min) {out['load_1m_before']} -> {out['load_1m_after']}"
    )
    ret = out.get("test_broker_retention")
    if ret:
        print(
            f"test broker log limit: {ret['partition_limit_bytes']:,} bytes of record batches per "
            f"partition (model exact in {len(ret['cases'])} cases: {ret['model_exact']})"
        )
    enc = out["encoding"]
    print(f"changelog encoding ({enc['record']}):")
    for name, v in enc.items():
        if isinstance(v, dict):
            print(
                f"  {name:24} {v['bytes_per_record']:6.1f} B/record, "
                f"{v['keys_fitting_test_broker']:>9,} keys fit in 5 MiB"
            )
    if "capacity_records" in out:
        for enc_name, per in out["capacity_records"].items():
            print(f"  kept records, {enc_name}: {per}")
    groups = [("", out.get("runs", {}))]
    groups += [(f" ({k[5:]})", v) for k, v in out.items() if k.startswith("runs_")]
    for title, rs in groups:
        for k, r in rs.items():
            head = f"{int(k):>9,} keys{title}:"
            if not r["measurable"]:
                print(f"{head} not measurable: {_why_not(r, True)}")
                continue
            print(
                f"{head} gap p50 {r['gap_p50_ms']} ms, p99 {r['gap_p99_ms']} ms over "
                f"{r['handoffs']} handoffs ({r['incomplete_restores']} incomplete restores), "
                f"changelog {r['changelog_records_read_p50']} records (p50), load {r['load']}"
            )
            for kind, v in r.get("by_kind", {}).items():
                print(
                    f"    {kind:8} n={v['n']:3} gap p50 {v['gap_p50_ms']} p99 {v['gap_p99_ms']} ms;"
                    f" without restore p99 {v['gap_without_restore_p99_ms']} ms; operator action"
                    f" -> grant p50 {v['move_p50_ms']} ms"
                )
                print(f"         legs p50 {v['legs_p50_ms']}")
                print(f"         legs p99 {v['legs_p99_ms']}")
    if out.get("cold_restore_ms"):
        print(
            f"cold restore (first owner, from the changelog's start): {out['cold_restore_ms']} ms"
        )
    if out.get("restore_model_cold"):
        print(f"cold restore = fixed + per record: {out['restore_model_cold']}")
        print(f"cold restore, extrapolated: {out['cold_restore_ms_extrapolated']} ms")
    print(
        f"handoff_gap_p99_ms: {out.get('handoff_gap_p99_ms')} "
        f"(changelog compression: {out.get('changelog_compression')})"
    )


def _worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/state_handoff.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("member")
    for opt in ("coordinator", "bootstrap-servers", "topic", "group", "changelog", "cohort"):
        m.add_argument(f"--{opt}", required=True)
    for opt in ("version", "member-id", "ledger"):
        m.add_argument(f"--{opt}", required=True)
    m.add_argument("--keys", type=int, required=True)
    m.add_argument("--producer-config")
    m.add_argument("--consumer-config")
    p = sub.add_parser("producer")
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    return _member_main(args) if args.cmd == "member" else _producer_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
