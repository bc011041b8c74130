"""Settings of the test backends: env parsing, names, command lines. No processes, no sockets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pubsub_canary.testing as testing
from pubsub_canary.errors import BackendUnavailable, ConfigError
from pubsub_canary.testing import _config, _docker, kafka, pubsub


def test_exported_names_are_pinned() -> None:
    assert sorted(testing.__all__) == [
        "DockerKafka",
        "DockerPubSub",
        "EmbeddedKafka",
        "ExternalKafka",
        "KafkaBackend",
        "KafkaTopicFactory",
        "PubSubBackend",
        "PubSubEmulator",
        "PubSubFactory",
        "client_config",
        "start_kafka",
        "start_pubsub",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:9092", "localhost:9092"),
        (" a:1 , b.example.com:65535 ", "a:1,b.example.com:65535"),
        ("[::1]:9092", "[::1]:9092"),
        ("PLAINTEXT://broker:9092", "PLAINTEXT://broker:9092"),
    ],
)
def test_bootstrap_lists_that_are_accepted(value: str, expected: str) -> None:
    assert _config.parse_bootstrap(value) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty entry"),
        ("localhost", "has no port"),
        ("host:abc", "is not host:port"),
        ("a:1,,b:2", "empty entry"),
        ("host:0", "not in 1..65535"),
        ("host:70000", "not in 1..65535"),
        ("host name:1", "is not host:port"),
    ],
)
def test_malformed_bootstrap_is_one_line_naming_variable_value_and_form(
    value: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _config.parse_bootstrap(value)
    message = info.value.message
    assert "\n" not in message
    assert why in message
    assert f"PUBSUB_CANARY_KAFKA_BOOTSTRAP={value!r}" in message
    assert "host:port" in message and "localhost:9092" in message


def test_start_kafka_rejects_a_malformed_env_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBSUB_CANARY_KAFKA_BOOTSTRAP", "localhost")
    started: list[object] = []
    monkeypatch.setattr(kafka, "EmbeddedKafka", lambda **kw: started.append(kw))
    with pytest.raises(ConfigError, match="PUBSUB_CANARY_KAFKA_BOOTSTRAP='localhost'"):
        kafka.start_kafka()
    assert started == []


def test_start_pubsub_rejects_a_malformed_emulator_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "localhost")
    with pytest.raises(ConfigError, match="PUBSUB_EMULATOR_HOST='localhost' is not host:port"):
        pubsub.start_pubsub()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("orders:12", ("orders", 12)), ("orders", ("orders", 1)), ("a.b-c_d:3", ("a.b-c_d", 3))],
)
def test_topic_specs(spec: str, expected: tuple[str, int]) -> None:
    assert _config.parse_topic_spec(spec) == expected


@pytest.mark.parametrize("spec", ["orders:abc", "orders:0", ":3", "bad name:2", "orders:-1"])
def test_bad_topic_specs(spec: str) -> None:
    with pytest.raises(ConfigError, match="is not valid"):
        _config.parse_topic_spec(spec)


@pytest.mark.parametrize("base", ["test_x[param-1]", "9lives", "googthing", "", "é" * 200])
def test_unique_names_are_valid_kafka_and_pubsub_names(base: str) -> None:
    names = {_config.unique_name(base, "dlq") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{2,248}", name), name
        assert not name.lower().startswith("goog")
        assert re.search(r"-dlq-[0-9a-f]{6}$", name), name


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("0", False), ("false", False), ("No", False),
     ("1", True), ("true", True), ("yes", True)],
)  # fmt: skip
def test_ci_flag(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert _config.is_ci() is expected


def test_docker_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_CANARY_DOCKER", "0")
    _docker.docker_status.cache_clear()
    try:
        assert _docker.docker_status() == (False, "Docker disabled by PUBSUB_CANARY_DOCKER")
    finally:
        _docker.docker_status.cache_clear()


def test_no_docker_socket_means_no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_CANARY_DOCKER", raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(_docker, "_SOCKETS", ("/nonexistent/docker.sock",))
    _docker.docker_status.cache_clear()
    try:
        usable, reason = _docker.docker_status()
    finally:
        _docker.docker_status.cache_clear()
    assert not usable and "no Docker engine" in reason


def test_emulator_command_prefers_the_env_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    launcher = tmp_path / "emu"
    launcher.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PUBSUB_CANARY_EMULATOR_BIN", str(launcher))
    assert pubsub.emulator_command(8085, "p") == [str(launcher), "--host=127.0.0.1", "--port=8085"]


def test_emulator_override_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_CANARY_EMULATOR_BIN", "/nonexistent/cloud-pubsub-emulator")
    with pytest.raises(BackendUnavailable, match="does not exist; point it at"):
        pubsub.emulator_command(8085, "p")


def test_gcloud_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_CANARY_EMULATOR_BIN", raising=False)
    monkeypatch.setattr(pubsub, "DEFAULT_EMULATOR_BIN", "/nonexistent/emulator")
    monkeypatch.setattr(pubsub.shutil, "which", lambda name: f"/opt/bin/{name}")
    assert pubsub.emulator_command(9, "proj") == [
        "/opt/bin/gcloud", "beta", "emulators", "pubsub", "start",
        "--host-port=127.0.0.1:9", "--project=proj",
    ]  # fmt: skip


def test_missing_emulator_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_CANARY_EMULATOR_BIN", raising=False)
    monkeypatch.setattr(pubsub, "DEFAULT_EMULATOR_BIN", "/nonexistent/emulator")
    monkeypatch.setattr(pubsub.shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailable) as info:
        pubsub.emulator_command(9, "proj")
    message = info.value.message
    assert "\n" not in message
    for hint in (
        "gcloud components install",
        "apt",
        "PUBSUB_CANARY_EMULATOR_BIN",
        "PUBSUB_EMULATOR_HOST",
    ):
        assert hint in message


def test_embedded_kafka_checks_its_arguments_without_starting() -> None:
    with pytest.raises(ConfigError, match="brokers=0"):
        testing.EmbeddedKafka(brokers=0)
    idle = testing.EmbeddedKafka()
    assert idle.pid is None
    with pytest.raises(BackendUnavailable, match="not running"):
        _ = idle.bootstrap_servers


class _Started:
    """Stands in for a backend class: records that it was started, starts nothing."""

    def __init__(self, kind: str, fail: bool = False) -> None:
        self.kind, self.fail = kind, fail

    def __call__(self, *args: object, **kwargs: object) -> _Started:
        return self

    def start(self) -> _Started:
        if self.fail:
            raise BackendUnavailable(f"{self.kind} failed")
        return self


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PUBSUB_CANARY_KAFKA_BOOTSTRAP", "PUBSUB_EMULATOR_HOST", "PUBSUB_CANARY_DOCKER"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "docker", "docker_fails", "expected"),
    [
        ("broker:9092", True, False, "external"),  # the env var wins over Docker
        (None, True, False, "docker"),
        (None, True, True, "embedded"),  # Docker answers but gives no broker: fall through
        (None, False, False, "embedded"),
    ],
)
def test_start_kafka_order(
    no_env: pytest.MonkeyPatch, env: str | None, docker: bool, docker_fails: bool, expected: str
) -> None:
    if env is not None:
        no_env.setenv("PUBSUB_CANARY_KAFKA_BOOTSTRAP", env)
    no_env.setattr(kafka, "docker_status", lambda: (docker, "test"))
    no_env.setattr(kafka, "ExternalKafka", _Started("external"))
    no_env.setattr(kafka, "DockerKafka", _Started("docker", fail=docker_fails))
    no_env.setattr(kafka, "EmbeddedKafka", _Started("embedded"))
    assert kafka.start_kafka().kind == expected


@pytest.mark.parametrize(
    ("env", "docker", "docker_fails", "expected"),
    [
        ("127.0.0.1:8085", True, False, "external"),
        (None, True, False, "docker"),
        (None, True, True, "local"),
        (None, False, False, "local"),
    ],
)
def test_start_pubsub_order(
    no_env: pytest.MonkeyPatch, env: str | None, docker: bool, docker_fails: bool, expected: str
) -> None:
    if env is not None:
        no_env.setenv("PUBSUB_EMULATOR_HOST", env)
    no_env.setattr(pubsub, "docker_status", lambda: (docker, "test"))
    no_env.setattr(pubsub, "PubSubBackend", _Started("external"))
    no_env.setattr(pubsub, "DockerPubSub", _Started("docker", fail=docker_fails))
    no_env.setattr(pubsub, "PubSubEmulator", _Started("local"))
    assert pubsub.start_pubsub().kind == expected
