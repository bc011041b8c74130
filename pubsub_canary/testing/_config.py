"""Environment variables and small parsers shared by the test backends.

Nothing here reads the environment at import time; every function reads it when called, so a
test can set a variable with ``monkeypatch.setenv`` and see the effect.
"""

from __future__ import annotations

import os
import re
import secrets

from pubsub_canary.errors import ConfigError

#: Comma-separated ``host:port`` list of a Kafka cluster to use instead of starting one.
KAFKA_BOOTSTRAP_ENV = "PUBSUB_CANARY_KAFKA_BOOTSTRAP"
#: Set to ``0``/``false`` to never use Docker even when an engine answers.
DOCKER_ENV = "PUBSUB_CANARY_DOCKER"
#: ``host:port`` of a running Pub/Sub emulator (the variable the Google clients read).
PUBSUB_EMULATOR_HOST_ENV = "PUBSUB_EMULATOR_HOST"
#: Project id for the emulator (``gcloud beta emulators pubsub env-init`` sets it).
PUBSUB_PROJECT_ENV = "PUBSUB_PROJECT_ID"
#: Path of the ``cloud-pubsub-emulator`` launcher, to override the default location.
EMULATOR_BIN_ENV = "PUBSUB_CANARY_EMULATOR_BIN"
#: Path of a librdkafka shared library with the mock cluster API, to override discovery.
LIBRDKAFKA_ENV = "PUBSUB_CANARY_LIBRDKAFKA"
#: Set to a true value on CI machines: a missing backend then fails instead of skipping.
CI_ENV = "CI"

DEFAULT_PUBSUB_PROJECT = "pubsub-canary-test"

_FALSE = {"", "0", "false", "no", "off"}
_HOST_PORT = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.-]*://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/,\[\]]+):(\d+)$"
)
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable: unset gives ``default``; ``0/false/no/off`` false."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in _FALSE


def is_ci() -> bool:
    """True when ``CI`` is set to a true value (GitHub, GitLab and most CI systems set it)."""
    return env_flag(CI_ENV)


def parse_host_port(value: str, *, source: str) -> tuple[str, int]:
    """Parse one ``host:port`` (IPv6 in brackets), naming ``source`` in the error."""
    match = _HOST_PORT.match(value.strip())
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            f"{source}={value!r} is not host:port; expected e.g. 127.0.0.1:8085 or [::1]:8085"
        )
    return match.group(1), int(match.group(2))


def parse_bootstrap(value: str, *, source: str = KAFKA_BOOTSTRAP_ENV) -> str:
    """Validate a Kafka bootstrap list and return it normalised (no spaces).

    Raises:
        ConfigError: one line naming ``source``, the value and the expected form.
    """
    entries = [entry.strip() for entry in value.split(",")]
    expected = "expected comma-separated host:port entries, e.g. localhost:9092,broker2:9092"
    if not value.strip() or not all(entries):
        raise ConfigError(f"{source}={value!r} has an empty entry; {expected}")
    for entry in entries:
        match = _HOST_PORT.match(entry)
        if match is None:
            why = "has no port" if ":" not in entry else "is not host:port"
            raise ConfigError(f"{source}={value!r}: entry {entry!r} {why}; {expected}")
        if not 0 < int(match.group(2)) < 65536:
            raise ConfigError(
                f"{source}={value!r}: port {match.group(2)} of {entry!r} is not in 1..65535;"
                f" {expected}"
            )
    return ",".join(entries)


def kafka_bootstrap_from_env() -> str | None:
    """The validated ``PUBSUB_CANARY_KAFKA_BOOTSTRAP``, or None when it is unset."""
    value = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    return None if value is None else parse_bootstrap(value)


def parse_topic_spec(spec: str) -> tuple[str, int]:
    """Parse ``NAME:PARTITIONS`` (``orders:12``); a bare ``NAME`` means one partition."""
    name, sep, count = spec.rpartition(":")
    if not sep:
        name, count = spec, "1"
    expected = "expected NAME:PARTITIONS with a positive count, e.g. orders:12"
    if not name or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--topic {spec!r} is not valid; {expected}")
    check_topic_name(name)
    return name, int(count)


def check_topic_name(name: str) -> str:
    """Reject names Kafka refuses: empty, ``.``/``..``, over 249 chars, or other characters."""
    if name in ("", ".", "..") or len(name) > 249 or _NAME_UNSAFE.search(name):
        raise ConfigError(f"topic name {name!r} is not valid; use 1 to 249 of A-Z a-z 0-9 . _ -")
    return name


def unique_name(base: str, suffix: str = "", *, max_base: int = 60) -> str:
    """A name that is unique per call: ``base`` sanitised, ``suffix``, 6 random hex digits.

    The result is a valid Kafka topic name and a valid Pub/Sub topic/subscription id (starts with
    a letter, 3 to 255 of ``A-Za-z0-9._-``).
    """
    clean = _NAME_UNSAFE.sub("_", base).strip("._-")[:max_base] or "t"
    if not clean[0].isalpha() or clean.lower().startswith("goog"):
        clean = "t-" + clean
    parts = [clean, _NAME_UNSAFE.sub("_", suffix).strip("._-"), secrets.token_hex(3)]
    return "-".join(part for part in parts if part)
