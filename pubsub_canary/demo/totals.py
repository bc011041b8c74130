"""The stateful example: a running total per key, kept in partition state.

Messages are JSON ``{"seq": n, "amount": a}`` keyed by a user id; the state of a partition maps
each user to the sum of its amounts. ``recompute`` gives what a single owner processing every
message once would hold, to check a run against (I4).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from pubsub_canary.client.processing import Record
from pubsub_canary.client.state import PartitionState


def add_to_total(record: Record, state: PartitionState) -> None:
    body = json.loads(record.value or b"{}")
    key = (record.key or b"").decode()
    state[key] = state.get(key, 0) + int(body["amount"])


def amount_of(seq: int) -> int:
    return seq % 7 + 1


def recompute(
    messages: Iterable[tuple[int, bytes | None, bytes | None]],
) -> dict[int, dict[str, Any]]:
    """partition -> {key: total} from (partition, key, value) of every message in the topic."""
    out: dict[int, dict[str, Any]] = defaultdict(dict)
    for p, key, value in messages:
        k = (key or b"").decode()
        out[p][k] = out[p].get(k, 0) + int(json.loads(value or b"{}")["amount"])
    return dict(out)


def read_topic(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every message of ``topic`` as (partition, key, value), read with assign() from 0."""
    return [(p, k, v) for p, _, k, v in read_topic_with_offsets(bootstrap, topic)]


def read_topic_with_offsets(
    bootstrap: str, topic: str
) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Like :func:`read_topic`, with offsets: (partition, offset, key, value)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "pubsub-canary-check",
            "enable.auto.commit": False,
        }
    )
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        pos = dict.fromkeys(parts, 0)
        while any(pos[p] < highs[p] for p in parts):
            for m in c.consume(num_messages=5000, timeout=1.0):
                if m.error() is None and m.offset() < highs[m.partition()]:
                    out.append((m.partition(), m.offset(), m.key(), m.value()))
                    pos[m.partition()] = m.offset() + 1
        return out
    finally:
        c.close()
