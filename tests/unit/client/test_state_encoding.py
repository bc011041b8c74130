"""The changelog's record encoding: stamps in a value prefix, headers only where needed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pubsub_canary.client.state import (
    H_EPOCH,
    H_FORMAT,
    H_THROUGH,
    MARKER_KEY,
    ChangelogWriter,
    PartitionState,
    StateFormats,
    decode_record,
    is_marker,
    marker_key,
    stamp_prefix,
)
from pubsub_canary.errors import BrokerError


class CapturingProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(self, topic: str, **kw: Any) -> None:
        self.sent.append(kw)

    def __len__(self) -> int:
        return 0


def test_a_checkpoint_puts_stamps_in_the_value_and_headers_only_where_it_must() -> None:
    producer = CapturingProducer()
    w = ChangelogWriter(producer, "totals.changelog", StateFormats(writes=2, reads=frozenset({2})))
    state = PartitionState(3, {"gone": 1})
    state["user-0000001"] = {"total": 17}
    del state["gone"]
    state.message_done()
    w.checkpoint(3, epoch=41, through=1200, state=state)
    by_key = {r["key"]: r for r in producer.sent}
    put, deleted, marker = by_key[b"user-0000001"], by_key[b"gone"], by_key[marker_key(41)]
    assert put["value"] == b'2,41;{"total": 17}'
    assert "headers" not in put  # 44 bytes a record saved
    assert deleted["value"] is None  # a tombstone, so compaction drops the key
    assert dict(deleted["headers"]) == {H_EPOCH: b"41", H_FORMAT: b"2"}
    assert dict(marker["headers"]) == {H_EPOCH: b"41", H_FORMAT: b"2", H_THROUGH: b"1200"}
    assert producer.sent[-1]["key"] == marker_key(41)  # the marker closes the batch
    assert all(r["partition"] == 3 for r in producer.sent)


@pytest.mark.parametrize("value", [0, -3, "x;y,z", {"a": [1, 2]}, None])
def test_what_the_writer_stamps_the_reader_decodes(value: Any) -> None:
    raw = None if value is None else stamp_prefix(7, 123456) + json.dumps(value).encode()
    headers = [(H_EPOCH, b"123456"), (H_FORMAT, b"7")] if value is None else None
    epoch, fmt, payload = decode_record(raw, headers)
    assert (epoch, fmt) == (123456, 7)
    assert (None if payload is None else json.loads(payload)) == value


def test_records_stamped_with_headers_only_are_still_read() -> None:
    headers = [(H_EPOCH, b"9"), (H_THROUGH, b"50"), (H_FORMAT, b"1")]
    assert decode_record(b"17", headers) == (9, 1, b"17")


@pytest.mark.parametrize("raw", [b"17", b'{"a": 1}', b"x,1;2", b"1,;2"])
def test_a_value_without_a_stamp_is_refused_with_what_it_starts_with(raw: bytes) -> None:
    with pytest.raises(BrokerError, match="not a '<format>,<epoch>;' stamp"):
        decode_record(raw, None)


def test_changes_reach_the_changelog_in_the_order_they_were_made() -> None:
    state = PartitionState(0)
    for k in ["k9", "k1", "k5", "k1", "k0"]:
        state[k] = 1
    del state["k5"]
    assert state.take_dirty() == [("k9", 1), ("k1", 1), ("k5", None), ("k0", 1)]
    assert state.take_dirty() == []


class FakeMsg:
    def __init__(self, kw: dict[str, Any], offset: int) -> None:
        self.kw, self._offset = kw, offset

    def key(self) -> bytes:
        return bytes(self.kw["key"])

    def value(self) -> bytes | None:
        return self.kw["value"]  # type: ignore[no-any-return]

    def partition(self) -> int:
        return int(self.kw["partition"])

    def offset(self) -> int:
        return self._offset


def test_only_a_delivered_marker_vouches_for_the_state_in_memory() -> None:
    # A member keeps a released partition's state for a standby only with the marker of its
    # last batch on the broker: a batch whose marker never arrived leaves no marker to trust.
    producer = CapturingProducer()
    w = ChangelogWriter(producer, "c", StateFormats())
    state = PartitionState(0)
    state["k"] = 1
    state.message_done()
    w.checkpoint(0, epoch=1, through=10, state=state)
    for i, kw in enumerate(producer.sent):  # the broker acknowledges the whole batch
        w._delivered(None, FakeMsg(kw, 100 + i))
    assert w.last_marker == {0: (10, 101)}
    state["k"] = 2
    state.message_done()
    w.checkpoint(0, epoch=1, through=20, state=state)  # never acknowledged
    assert 0 not in w.last_marker


def test_each_owner_has_its_own_marker_key_so_compaction_keeps_its_last_marker() -> None:
    # One key for every marker would leave only the newest after compaction, and a reader
    # would drop the surviving records of every earlier owner for want of their marker.
    assert marker_key(1) != marker_key(2)
    assert all(is_marker(k) for k in (marker_key(1), marker_key(12345), MARKER_KEY))
    assert not any(is_marker(k) for k in (b"user-1", None, MARKER_KEY + b"x", b""))


def test_a_lost_record_leaves_no_marker_to_trust_and_stops_the_commit() -> None:
    producer = CapturingProducer()
    w = ChangelogWriter(producer, "c", StateFormats())
    state = PartitionState(0)
    state["a"] = 1
    state["b"] = 2
    state.message_done()
    w.checkpoint(0, epoch=3, through=7, state=state)
    a, b, marker = producer.sent
    w._delivered(None, FakeMsg(a, 0))
    w._delivered("MSG_SIZE_TOO_LARGE", FakeMsg(b, 1))  # the broker refused one record
    w._delivered(None, FakeMsg(marker, 2))
    assert 0 not in w.last_marker
    with pytest.raises(BrokerError, match="MSG_SIZE_TOO_LARGE; not committing past it"):
        w.raise_if_failed()


def test_setting_none_deletes_as_the_changelog_does() -> None:
    state = PartitionState(0, {"k": 1})
    state["k"] = None
    state["new"] = None
    assert "k" not in state and "new" not in state
    assert state.take_dirty() == [("k", None)]


def test_headers_of_other_tools_do_not_hide_the_value_prefix() -> None:
    # e.g. a tracing library adding traceparent to every record
    raw = stamp_prefix(2, 9) + b"5"
    assert decode_record(raw, [("traceparent", b"00-ab-cd-01")]) == (9, 2, b"5")
