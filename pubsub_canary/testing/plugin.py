"""The pytest plugin of pubsub-canary (entry point ``pubsub_canary``): test backend fixtures.

Fixtures:

- ``kafka_backend`` (session): a :class:`~pubsub_canary.testing.kafka.KafkaBackend`;
  ``PUBSUB_CANARY_KAFKA_BOOTSTRAP``, else Docker (testcontainers), else the embedded broker.
- ``kafka_topic_factory`` (function): ``kafka_topic_factory(partitions=1, suffix="") -> name``
  creates a topic whose name starts with the test's name.
- ``kafka_group_id`` (function): a fresh ``group.id`` for this test.
- ``pubsub_backend`` (session): a :class:`~pubsub_canary.testing.pubsub.PubSubBackend`;
  ``PUBSUB_EMULATOR_HOST``, else Docker, else the local emulator.
- ``pubsub_factory`` (function): a :class:`~pubsub_canary.testing.factories.PubSubFactory`
  (``.topic()``, ``.subscription()``, ``.publisher``, ``.subscriber``); deletes what it made.
- ``pubsub_env`` (function): sets ``PUBSUB_EMULATOR_HOST``/``PUBSUB_PROJECT_ID`` for the test,
  for code under test that builds its own clients.

Nothing starts until a test asks for a backend fixture. A backend that cannot start skips the
test with the reason, or fails it when ``CI`` is set to a true value; a malformed setting
always fails. Docker's absence is never an error. The terminal summary and each test's
``user_properties`` (in JUnit XML) say which backend ran.

This module imports only pytest and the standard library at import time, so sessions that do
not use these fixtures pay nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from pubsub_canary.errors import BackendUnavailable, ConfigError
from pubsub_canary.testing._config import is_ci, unique_name

if TYPE_CHECKING:
    from pubsub_canary.testing.factories import KafkaTopicFactory, PubSubFactory
    from pubsub_canary.testing.kafka import KafkaBackend
    from pubsub_canary.testing.pubsub import PubSubBackend

_B = TypeVar("_B")
_BACKENDS = pytest.StashKey[dict[str, str]]()
_FIXTURE_MARKERS = {"kafka_backend": "kafka", "pubsub_backend": "pubsub"}


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BACKENDS] = {}
    config.addinivalue_line(
        "markers", "kafka: needs a Kafka backend (added to tests that use kafka_backend)"
    )
    config.addinivalue_line(
        "markers", "pubsub: needs a Pub/Sub emulator (added to tests that use pubsub_backend)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m "not kafka"` then deselects every test that would start a broker.
    for item in items:
        names = getattr(item, "fixturenames", ())
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in names and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    finally:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        for fixture in _FIXTURE_MARKERS:
            backend = funcargs.get(fixture)
            if backend is not None:
                item.user_properties.append((fixture, f"{backend.kind}: {backend.description}"))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    backends = config.stash.get(_BACKENDS, {})
    if backends:
        terminalreporter.write_sep("-", "pubsub-canary test backends")
        for name, line in backends.items():
            terminalreporter.write_line(f"{name}: {line}")


def _start(config: pytest.Config, name: str, starter: Callable[[], _B]) -> _B:
    """Start a backend, or skip (locally) / fail (on CI, or for bad settings) with the reason."""
    report = config.stash.setdefault(_BACKENDS, {})
    began = time.monotonic()
    try:
        backend = starter()
    except ConfigError as exc:
        report[name] = f"bad setting: {exc.message}"
        pytest.fail(f"{name} backend: {exc.message}", pytrace=False)
    except BackendUnavailable as exc:
        if is_ci():
            report[name] = f"unavailable (failed, CI is set): {exc.message}"
            pytest.fail(f"{name} backend unavailable (CI is set): {exc.message}", pytrace=False)
        report[name] = f"unavailable (skipped): {exc.message}"
        pytest.skip(f"{name} backend unavailable: {exc.message}")
    seconds = time.monotonic() - began
    kind, description = getattr(backend, "kind", "?"), getattr(backend, "description", "")
    report[name] = f"{kind}: {description} (ready in {seconds:.1f} s)"
    return backend


@pytest.fixture(scope="session")
def kafka_backend(request: pytest.FixtureRequest) -> Iterator[KafkaBackend]:
    """The session's Kafka backend (external, Docker or embedded)."""
    from pubsub_canary.testing.kafka import start_kafka

    backend: KafkaBackend = _start(request.config, "kafka", start_kafka)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def kafka_topic_factory(
    kafka_backend: KafkaBackend, request: pytest.FixtureRequest
) -> KafkaTopicFactory:
    """``kafka_topic_factory(partitions=1, suffix="")`` creates a fresh topic, returns its name."""
    from pubsub_canary.testing.factories import KafkaTopicFactory

    return KafkaTopicFactory(kafka_backend, request.node.name)


@pytest.fixture
def kafka_group_id(request: pytest.FixtureRequest) -> str:
    """A fresh consumer ``group.id`` named after the test."""
    return unique_name(request.node.name, "group")


@pytest.fixture(scope="session")
def pubsub_backend(request: pytest.FixtureRequest) -> Iterator[PubSubBackend]:
    """The session's Pub/Sub emulator (``PUBSUB_EMULATOR_HOST``, Docker or local)."""
    from pubsub_canary.testing.pubsub import start_pubsub

    backend: PubSubBackend = _start(request.config, "pubsub", start_pubsub)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def pubsub_factory(
    pubsub_backend: PubSubBackend, request: pytest.FixtureRequest
) -> Iterator[PubSubFactory]:
    """Creates topics and subscriptions named after the test; deletes them afterwards."""
    from pubsub_canary.testing.factories import PubSubFactory

    factory = PubSubFactory(pubsub_backend, request.node.name)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def pubsub_env(pubsub_backend: PubSubBackend, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Sets ``PUBSUB_EMULATOR_HOST`` and ``PUBSUB_PROJECT_ID`` for this test only."""
    variables = pubsub_backend.environ()
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables
