"""The Pub/Sub test backend: the emulator through the plugin's fixtures, its failure modes,
the plugin's skip/fail rules (in inner pytest sessions) and ``pubsub-canary dev pubsub``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pubsub_canary.errors import BackendUnavailable
from pubsub_canary.testing import PubSubBackend, PubSubEmulator, PubSubFactory

MESSAGES = 2_000


@pytest.mark.pubsub
@pytest.mark.timeout(120)
def test_every_published_message_is_received_once_with_its_attributes(
    pubsub_factory: PubSubFactory,
) -> None:
    topic = pubsub_factory.topic("orders")
    # A long ack deadline: a slow machine must not see redeliveries we did not cause.
    subscription = pubsub_factory.subscription(topic, "orders", ack_deadline_seconds=60)
    futures = [
        pubsub_factory.publisher.publish(
            topic, f"payload-{i}".encode(), seq=str(i), parity=("even", "odd")[i % 2]
        )
        for i in range(MESSAGES)
    ]
    message_ids = [future.result(timeout=30) for future in futures]
    assert len(set(message_ids)) == MESSAGES

    received: Counter[str] = Counter()
    mismatches: list[str] = []
    lock = threading.Lock()
    all_in = threading.Event()

    def on_message(message: Any) -> None:
        seq = message.attributes["seq"]
        if (
            message.data != f"payload-{seq}".encode()
            or message.attributes["parity"]
            != (
                "even",
                "odd",
            )[int(seq) % 2]
        ):
            mismatches.append(seq)
        message.ack()
        with lock:
            received[seq] += 1
            if len(received) == MESSAGES:
                all_in.set()

    streaming = pubsub_factory.subscriber.subscribe(subscription, on_message)
    try:
        assert all_in.wait(60), f"received {len(received)} of {MESSAGES}"
        time.sleep(1.0)  # room for a duplicate to show up
    finally:
        streaming.cancel()
        streaming.result(timeout=30)
    assert set(received) == {str(i) for i in range(MESSAGES)}
    assert [seq for seq, n in received.items() if n > 1] == []
    assert mismatches == []


def _pull(factory: PubSubFactory, subscription: str, timeout: float) -> list[Any]:
    from google.api_core.exceptions import DeadlineExceeded

    try:
        response = factory.subscriber.pull(
            request={"subscription": subscription, "max_messages": 10}, timeout=timeout
        )
    except DeadlineExceeded:
        return []
    return list(response.received_messages)


@pytest.mark.pubsub
@pytest.mark.timeout(60)
def test_a_nacked_message_reaches_the_dead_letter_topic_after_max_attempts(
    pubsub_factory: PubSubFactory,
) -> None:
    topic = pubsub_factory.topic("work")
    dead_letters = pubsub_factory.topic("dlq")
    subscription = pubsub_factory.subscription(
        topic, "work", dead_letter_topic=dead_letters, max_delivery_attempts=5
    )
    observer = pubsub_factory.subscription(dead_letters, "dlq-observer")
    pubsub_factory.publisher.publish(topic, b"poison", reason="bad-input").result(timeout=30)

    attempts: list[int] = []
    while len(attempts) < 5:
        messages = _pull(pubsub_factory, subscription, timeout=10)
        assert messages, f"no delivery after attempts {attempts}"
        for received in messages:
            assert received.message.data == b"poison"
            attempts.append(received.delivery_attempt)
        pubsub_factory.subscriber.modify_ack_deadline(  # nack: redeliver now
            request={
                "subscription": subscription,
                "ack_ids": [m.ack_id for m in messages],
                "ack_deadline_seconds": 0,
            }
        )
    assert attempts == [1, 2, 3, 4, 5]
    # No sixth delivery. (The emulator dead-letters a message when it would deliver it again,
    # so this pull is also what moves it to the dead-letter topic.)
    assert _pull(pubsub_factory, subscription, timeout=2) == []

    dead = _pull(pubsub_factory, observer, timeout=10)
    assert [m.message.data for m in dead] == [b"poison"]
    assert dead[0].message.attributes["reason"] == "bad-input"
    pubsub_factory.subscriber.acknowledge(
        request={"subscription": observer, "ack_ids": [dead[0].ack_id]}
    )


@pytest.mark.pubsub
def test_pubsub_env_points_code_under_test_at_the_emulator(
    pubsub_backend: PubSubBackend, pubsub_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    from google.cloud import pubsub_v1

    assert os.environ["PUBSUB_EMULATOR_HOST"] == pubsub_backend.host
    publisher = pubsub_v1.PublisherClient()  # reads PUBSUB_EMULATOR_HOST itself
    path = pubsub_backend.topic_path(f"env-check-{os.getpid()}")
    publisher.create_topic(name=path)
    publisher.delete_topic(topic=path)
    properties = dict(request.node.user_properties)
    assert properties["pubsub_backend"].startswith(f"{pubsub_backend.kind}: ")


# -- failure modes of the local emulator -------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-emulator"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_port_in_use_is_one_line_saying_what_to_do(busy_port: int) -> None:
    with pytest.raises(BackendUnavailable) as info:
        PubSubEmulator(port=busy_port).start()
    assert info.value.message == (
        f"port {busy_port} on 127.0.0.1 is in use; stop what listens there or pick another port"
        " (--port 0 picks a free one)"
    )


def test_emulator_that_exits_reports_its_status_and_log(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo 'Error: JAVA_HOME is not set' >&2\nexit 1\n")
    with pytest.raises(BackendUnavailable) as info:
        PubSubEmulator(binary=binary).start()
    message = info.value.message
    assert "\n" not in message
    assert "exited with status 1 before it was ready" in message
    assert "log: Error: JAVA_HOME is not set" in message


@pytest.mark.timeout(30)
def test_emulator_that_never_gets_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = _script(tmp_path, f"echo starting; echo $$ > {pid_file}; exec sleep 60\n")
    began = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        PubSubEmulator(binary=binary, start_timeout=1.0).start()
    assert time.monotonic() - began < 10
    assert "did not start within 1 s; log: starting" in info.value.message
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


_HOST_AND_WAIT = """
import time
from pubsub_canary.testing import PubSubEmulator
emulator = PubSubEmulator(binary={binary!r}).start()
print(emulator.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_emulator_dies_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = _script(tmp_path, f"echo $$ > {pid_file}; echo Server started; exec sleep 60\n")
    code = _HOST_AND_WAIT.format(binary=binary)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as parent:
        try:
            assert parent.stdout is not None
            int(parent.stdout.readline())
            emulator = int(pid_file.read_text())
            os.kill(emulator, 0)  # running
            parent.send_signal(signal.SIGKILL)
            parent.wait(5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(emulator, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"emulator process {emulator} outlived its parent")
        finally:
            parent.kill()


def test_emulator_host_that_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from pubsub_canary.testing import start_pubsub

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    with pytest.raises(BackendUnavailable, match=f"PUBSUB_EMULATOR_HOST=127.0.0.1:{port} does not"):
        start_pubsub()


# -- the plugin's rules, in inner sessions ---------------------------------------------------

_INNER_TEST = """
def test_uses_pubsub(pubsub_backend):
    assert pubsub_backend.host

def test_does_not(request):
    assert not request.node.user_properties
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in ("CI", "PUBSUB_EMULATOR_HOST", "PUBSUB_CANARY_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PUBSUB_CANARY_DOCKER", "0")
    pytester.makepyfile(_INNER_TEST)
    return pytester


def _refused_host() -> str:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{closed.getsockname()[1]}"


def test_plugin_skips_a_missing_backend_with_the_reason_locally(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", _refused_host())
    result = inner.runpytest_subprocess("-W", "error", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*SKIPPED*pubsub backend unavailable: PUBSUB_EMULATOR_HOST=* does not answer*"]
    )
    result.stdout.fnmatch_lines(["*pubsub-canary test backends*", "pubsub: unavailable (skipped)*"])


def test_plugin_fails_a_missing_backend_on_ci(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", _refused_host())
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest_subprocess("-W", "error")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*pubsub backend unavailable (CI is set): *does not answer*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_plugin_fails_a_malformed_setting_even_locally(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "localhost")
    result = inner.runpytest_subprocess("-W", "error")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*PUBSUB_EMULATOR_HOST='localhost' is not host:port*"])


def test_plugin_stays_silent_in_sessions_that_do_not_use_it(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-W", "error", "-k", "does_not")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.no_fnmatch_line("*pubsub-canary test backends*")


@pytest.mark.pubsub
@pytest.mark.timeout(60)
def test_plugin_reports_the_backend_it_used(inner: pytest.Pytester, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    result = inner.runpytest_subprocess("-W", "error", f"--junitxml={junit}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["pubsub: local: cloud-pubsub-emulator at 127.0.0.1:*"])
    assert 'name="pubsub_backend" value="local: ' in junit.read_text()


# -- pubsub-canary dev pubsub ------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pubsub_canary.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.pubsub
@pytest.mark.timeout(60)
def test_dev_pubsub_prints_the_export_line_and_stops_on_sigint() -> None:
    process = _cli("dev", "pubsub", "--project", "demo")
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("Pub/Sub emulator (cloud-pubsub-emulator at 127.0.0.1:")
        assert lines[1].startswith("export PUBSUB_EMULATOR_HOST=127.0.0.1:")
        host = lines[1].split()[1].split("=", 1)[1]
        assert lines[1].split()[2] == "PUBSUB_PROJECT_ID=demo"
        emulator = PubSubBackend(host, "demo")
        publisher = emulator.publisher()
        publisher.create_topic(name=emulator.topic_path("dev-check"))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "stopping the Pub/Sub emulator" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(host.rsplit(":", 1)[1])), timeout=2).close()


def test_dev_pubsub_port_in_use_is_one_line_and_exit_2(busy_port: int) -> None:
    process = _cli("dev", "pubsub", "--port", str(busy_port))
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.count("\n") == 1 and err.startswith(
        f"error: port {busy_port} on 127.0.0.1 is in use"
    )


def test_dev_pubsub_emulator_that_exits_is_one_line_and_exit_2(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo 'no java here' >&2\nexit 1\n")
    process = _cli("dev", "pubsub", env={"PUBSUB_CANARY_EMULATOR_BIN": binary})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.count("\n") == 1, err
    assert "exited with status 1 before it was ready; log: no java here" in err
