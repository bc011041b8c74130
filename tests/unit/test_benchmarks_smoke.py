"""The benchmark scripts run end to end with tiny parameters and end with their JSON line.

A smoke test only: it checks that each script runs and reports the figures it promises, never
the figures' values (a benchmark is not a timed assertion).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(120)]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 90) -> dict[str, object]:
    extra = []
    bootstrap = os.environ.get("PUBSUB_CANARY_KAFKA_BOOTSTRAP")
    if bootstrap:  # an external broker; otherwise the script starts the embedded one
        extra = ["--bootstrap-servers", bootstrap]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args, *extra, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS.parent,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert isinstance(figures, dict), last
    return figures


def test_handoff_benchmark_reports_its_figures() -> None:
    figures = run_script(
        "kafka_handoff.py",
        *("--partitions", "8", "--stable", "2", "--canary", "1", "--cycles", "1"),
        *("--rate-per-partition", "20", "--dwell", "0.2", "--fetch-wait-max-ms", "10"),
        # With 1 s the test broker never formed the group; 6 s is what the script measures.
        *("--subscribe-session-timeouts-ms", "6000", "--subscribe-consumers", "2"),
    )
    for key in ("handoff_p50_ms", "handoff_p99_ms", "rollback_50pct_seconds"):
        assert isinstance(figures[key], float), (key, figures)
    assert figures["handoff_count"] > 0
    assert isinstance(figures["subscribe_leave_seconds_6s"], float), figures
    assert "overhead_ratio" not in figures


def test_overhead_benchmark_reports_its_figures() -> None:
    figures = run_script(
        "kafka_overhead.py",
        *("--partitions", "2", "--messages", "3000", "--rounds", "1", "--warmup", "0"),
    )
    assert isinstance(figures["overhead_ratio"], float), figures
    assert figures["overhead_ratio"] > 0
    assert "handoff_p99_ms" not in figures


def test_state_handoff_benchmark_reports_gaps_by_state_size() -> None:
    figures = run_script(
        "state_handoff.py",
        *("--sizes", "2000", "--handoffs", "2", "--dwell", "0.2", "--rate", "50"),
    )
    gaps = figures["handoff_gap_p99_ms"]
    assert isinstance(gaps, dict) and isinstance(gaps["2000"], float), figures
    assert figures["handoffs"] == {"2000": 2}, figures
    assert isinstance(figures["cold_restore_ms"]["2000"], float), figures
