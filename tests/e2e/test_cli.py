"""The command line as a user runs it: one-line errors, the demo's JSON summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pubsub_canary.demo.harness import Harness, free_port

CLI = [sys.executable, "-m", "pubsub_canary.cli"]

REQUIRED_SUMMARY = {
    "outcome",
    "topic",
    "group",
    "dlq_topic",
    "produced",
    "processed_ok",
    "dead_lettered",
    "lost",
    "duplicates",
    "detection_seconds",
    "rollback_seconds",
    "max_canary_share",
}


def run(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err, err
    assert err.count("\n") == 0, err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_invalid_rollout_file_names_the_field(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(
        "name: r\ntarget: {topic: t, group: g}\ncanary_version: v2\nsteps:\n  - share: 150\n"
    )
    assert_one_line_error(run("rollout", "validate", "-f", str(f)), "steps.0.share", "150")
    f.write_text("name: r\ntarget: {topic: t}\ncanary_version: v2\nsteps: [{share: 10}]\n")
    assert_one_line_error(run("rollout", "validate", "-f", str(f)), "target.group")
    f.write_text("name: [oops\n")
    assert_one_line_error(run("rollout", "validate", "-f", str(f)), "not valid YAML")
    assert_one_line_error(run("rollout", "validate", "-f", str(tmp_path / "nope.yaml")), "nope")


def test_unreachable_coordinator_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(run("rollout", "--coordinator", url, "status"), "did not answer")


def test_bad_listen_and_port_in_use() -> None:
    assert_one_line_error(run("coordinator", "--listen", "localhost"), "HOST:PORT")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run("coordinator", "--listen", f"127.0.0.1:{port}", "--store", "memory://")
        assert_one_line_error(p, "cannot listen", str(port))


def test_bad_store_url_is_one_line() -> None:
    p = run("coordinator", "--listen", f"127.0.0.1:{free_port()}", "--store", "mysql://x")
    assert_one_line_error(p, "store URL")


@pytest.mark.kafka
def test_apply_errors_leave_the_running_rollout_untouched(
    kafka_backend: Any, kafka_topic_factory: Any, kafka_group_id: str, tmp_path: Path
) -> None:
    topic = kafka_topic_factory(partitions=4)
    h = Harness(
        tmp_path,
        bootstrap=kafka_backend.bootstrap_servers,
        topic=topic,
        group=kafka_group_id,
        dlq_topic=f"{topic}.dlq",
    )
    h.start_coordinator()
    try:
        good = tmp_path / "good.yaml"
        good.write_text(
            f"name: first\ntarget: {{topic: {topic}, group: {kafka_group_id}}}\n"
            "canary_version: v2\nsteps: [{share: 10, hold_seconds: 600}]\n"
        )
        ok = run("rollout", "--coordinator", h.url, "apply", "-f", str(good), "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["phase"] == "progressing"
        missing = tmp_path / "missing.yaml"
        missing.write_text(
            "name: other\ntarget: {topic: no-such-topic, group: g}\ncanary_version: v2\n"
            "steps: [{share: 10}]\n"
        )
        p = run("rollout", "--coordinator", h.url, "apply", "-f", str(missing))
        assert_one_line_error(p, "no-such-topic", "does not exist")
        busy = tmp_path / "busy.yaml"
        busy.write_text(good.read_text().replace("name: first", "name: second"))
        p = run("rollout", "--coordinator", h.url, "apply", "-f", str(busy))
        assert_one_line_error(p, "already has an active rollout", "first")
        p = run("rollout", "--coordinator", h.url, "approve", "first")
        assert_one_line_error(p, "no approval gate is pending")
        status = run("rollout", "--coordinator", h.url, "status", "first", "--json")
        s = json.loads(status.stdout)
        assert s["phase"] == "progressing" and s["step"] == 1 and s["share"] == 10
        human = run("rollout", "--coordinator", h.url, "status", "first")
        assert "phase progressing" in human.stdout and "decisions:" in human.stdout
    finally:
        h.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "outcome"), [("healthy", "promoted"), ("regression", "rolled_back")]
)
def test_demo_json_summary(scenario: str, outcome: str) -> None:
    p = run("demo", "--scenario", scenario, "--hold", "2", "--json", timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary.keys() >= REQUIRED_SUMMARY
    assert summary["outcome"] == outcome
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["processed_ok"] + summary["dead_lettered"] == summary["produced"]
    if scenario == "regression":
        assert summary["dead_lettered"] > 0
        assert 0 < summary["detection_seconds"] < 10
        assert summary["rollback_seconds"] < 2
        assert summary["max_canary_share"] < 100
    else:
        assert summary["max_canary_share"] == 100
        assert summary["dead_lettered"] == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_stateful_demo_state_matches_a_recomputation() -> None:
    p = run("demo", "--stateful", "--scenario", "regression", "--hold", "2", "--json", timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "rolled_back"
    assert summary["state_keys"] > 0
    assert summary["state_mismatches"] == 0
    assert summary["state_offset_disagreements"] == 0
    assert summary["lost"] == 0 and summary["duplicates"] == 0
