"""The coordinator's own Kafka client settings (security for a real cluster): file and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pubsub_canary import cli
from pubsub_canary.coordinator.broker import KafkaBroker, read_client_config
from pubsub_canary.errors import ConfigError

PROPERTIES = """\
# a client.properties as Kafka's tools take it
security.protocol=SASL_SSL
sasl.mechanism = PLAIN
sasl.username=canary
sasl.password=s3cret=with=equals

! another comment style
"""


def test_a_properties_file_is_read_as_librdkafka_settings(tmp_path: Path) -> None:
    f = tmp_path / "client.properties"
    f.write_text(PROPERTIES)
    assert read_client_config(str(f)) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "canary",
        "sasl.password": "s3cret=with=equals",
    }


def test_a_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "client.properties"
    f.write_text("security.protocol=SSL\njust words\n")
    with pytest.raises(ConfigError, match=r"client.properties:2: 'just words' is not key=value"):
        read_client_config(str(f))
    with pytest.raises(ConfigError, match="cannot read Kafka client config"):
        read_client_config(str(tmp_path / "missing.properties"))


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"no.such.setting": "1"}, 'No such configuration property: "no.such.setting"'),
        ({"security.protocol": "NOPE"}, 'Invalid value "NOPE" for configuration property'),
        ({"group.id": "mine"}, "the coordinator sets group.id itself"),
    ],
)
def test_settings_librdkafka_would_refuse_are_refused_at_start(
    config: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        KafkaBroker("127.0.0.1:1", config)
    assert needle in exc.value.message


def run_coordinator(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake_serve(**kwargs: Any) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr("pubsub_canary.coordinator.server.serve", fake_serve)
    assert cli.main(["coordinator", *argv]) == 0
    return seen


def test_flags_override_the_file_and_reach_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "client.properties"
    f.write_text(PROPERTIES)
    monkeypatch.setenv("PUBSUB_CANARY_KAFKA_CONFIG_FILE", str(f))
    seen = run_coordinator(
        ["--bootstrap-servers", "kafka:9093", "--kafka-config", "sasl.mechanism=SCRAM-SHA-512"],
        monkeypatch,
    )
    assert seen["bootstrap_servers"] == "kafka:9093"
    assert seen["kafka_config"]["sasl.mechanism"] == "SCRAM-SHA-512"
    assert seen["kafka_config"]["sasl.password"] == "s3cret=with=equals"


def test_cli_errors_are_one_line_naming_the_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["coordinator", "--bootstrap-servers", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    assert cli.main([*argv, "--kafka-config", "no.such.setting=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no.such.setting" in err and err.startswith("error: ")
    assert cli.main([*argv, "--kafka-config", "security.protocol"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["coordinator", "--kafka-config", "security.protocol=SSL"]) == 2
    assert "without --bootstrap-servers" in capsys.readouterr().err
