"""A state format change for the migration tests: format 2 stores {"total": n}, format 1 n."""

from __future__ import annotations

import json
from typing import Any

from pubsub_canary.client.processing import Record
from pubsub_canary.client.state import PartitionState


def total_v2_to_v1(value: Any) -> Any:
    return value["total"]


def add_to_total_v2(record: Record, state: PartitionState) -> None:
    key = (record.key or b"").decode()
    cur = state.get(key, 0)
    cur = cur["total"] if isinstance(cur, dict) else cur
    state[key] = {"total": cur + int(json.loads(record.value or b"{}")["amount"])}
