"""Pub/Sub test backends: a running emulator, a testcontainers emulator, or a local one.

:func:`start_pubsub` picks the first that applies:

1. ``PUBSUB_EMULATOR_HOST`` is set: an emulator someone else runs;
2. a Docker engine answers: the emulator image through testcontainers;
3. otherwise :class:`PubSubEmulator`: the ``cloud-pubsub-emulator`` launcher of the Google
   Cloud SDK (``PUBSUB_CANARY_EMULATOR_BIN`` overrides its path), else
   ``gcloud beta emulators pubsub start``, on a free loopback port.

Clients built by :meth:`PubSubBackend.publisher` / :meth:`PubSubBackend.subscriber` talk to the
backend over an explicit insecure channel, so nothing here sets ``PUBSUB_EMULATOR_HOST`` in the
process environment; :meth:`PubSubBackend.environ` gives the variables for code under test
that builds its own clients.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

from pubsub_canary.errors import BackendUnavailable, ConfigError
from pubsub_canary.testing._config import (
    DEFAULT_PUBSUB_PROJECT,
    EMULATOR_BIN_ENV,
    PUBSUB_EMULATOR_HOST_ENV,
    PUBSUB_PROJECT_ENV,
    parse_host_port,
)
from pubsub_canary.testing._docker import docker_status
from pubsub_canary.testing._proc import LogFile, stop_process

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

log = logging.getLogger(__name__)

#: Where the Google Cloud SDK packages (apt, gcloud components) put the emulator launcher.
DEFAULT_EMULATOR_BIN = (
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
#: Image of the testcontainers emulator; override with ``PUBSUB_CANARY_PUBSUB_IMAGE``.
DEFAULT_PUBSUB_IMAGE = "gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators"
PUBSUB_IMAGE_ENV = "PUBSUB_CANARY_PUBSUB_IMAGE"
_READY_LINE = "Server started"
_INSTALL_HINT = (
    "install it (`gcloud components install pubsub-emulator beta`, or the apt package"
    " google-cloud-cli-pubsub-emulator), set PUBSUB_CANARY_EMULATOR_BIN to its"
    " cloud-pubsub-emulator launcher, or set PUBSUB_EMULATOR_HOST to a running emulator"
)


def _import_pubsub() -> Any:
    try:
        from google.cloud import pubsub_v1
    except ImportError as exc:
        raise BackendUnavailable(
            f"google-cloud-pubsub is not installed ({exc}); install pubsub-canary[pubsub]",
            backend="pubsub",
        ) from exc
    return pubsub_v1


class PubSubBackend:
    """A reachable Pub/Sub emulator: where it is, and clients pointed at it.

    Attributes:
        kind: ``"external"``, ``"docker"`` or ``"local"``.
        host: ``host:port`` of the emulator (the value of ``PUBSUB_EMULATOR_HOST``).
        project: project id to create topics and subscriptions in.
    """

    kind = "external"

    def __init__(self, host: str = "", project: str = DEFAULT_PUBSUB_PROJECT) -> None:
        self.host = host
        self.project = project

    @property
    def description(self) -> str:
        return f"{PUBSUB_EMULATOR_HOST_ENV}={self.host}, project {self.project}"

    def environ(self) -> dict[str, str]:
        """The variables Google's clients and gcloud read to use this emulator."""
        return {PUBSUB_EMULATOR_HOST_ENV: self.host, PUBSUB_PROJECT_ENV: self.project}

    def topic_path(self, topic_id: str) -> str:
        return f"projects/{self.project}/topics/{topic_id}"

    def subscription_path(self, subscription_id: str) -> str:
        return f"projects/{self.project}/subscriptions/{subscription_id}"

    def publisher(self, **kwargs: Any) -> pubsub_v1.PublisherClient:
        """A ``PublisherClient`` on this emulator; ``kwargs`` go to its constructor."""
        import grpc
        from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

        pubsub_v1 = _import_pubsub()
        transport = PublisherGrpcTransport(channel=grpc.insecure_channel(self.host), host=self.host)
        return pubsub_v1.PublisherClient(transport=transport, **kwargs)

    def subscriber(self, **kwargs: Any) -> pubsub_v1.SubscriberClient:
        """A ``SubscriberClient`` on this emulator; close it when done."""
        import grpc
        from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

        pubsub_v1 = _import_pubsub()
        transport = SubscriberGrpcTransport(
            channel=grpc.insecure_channel(self.host), host=self.host
        )
        return pubsub_v1.SubscriberClient(transport=transport, **kwargs)

    def start(self) -> PubSubBackend:
        """Check that something answers at :attr:`host`."""
        name, port = parse_host_port(self.host, source=PUBSUB_EMULATOR_HOST_ENV)
        try:
            socket.create_connection((name.strip("[]"), port), timeout=5).close()
        except OSError as exc:
            raise BackendUnavailable(
                f"{PUBSUB_EMULATOR_HOST_ENV}={self.host} does not answer ({exc.strerror or exc});"
                f" start the emulator there, or unset {PUBSUB_EMULATOR_HOST_ENV} to start one",
                backend="pubsub",
            ) from exc
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> PubSubBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DockerPubSub(PubSubBackend):
    """The emulator image in a container, through testcontainers."""

    kind = "docker"
    _PORT = 8085

    def __init__(self, project: str = DEFAULT_PUBSUB_PROJECT, image: str | None = None) -> None:
        super().__init__("", project)
        self.image = image or os.environ.get(PUBSUB_IMAGE_ENV) or DEFAULT_PUBSUB_IMAGE
        self._container: Any = None

    @property
    def description(self) -> str:
        return f"testcontainers {self.image} at {self.host or 'not started'}"

    def start(self, timeout: float = 120.0) -> DockerPubSub:
        command = (
            f"gcloud beta emulators pubsub start --project={self.project}"
            f" --host-port=0.0.0.0:{self._PORT}"
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # testcontainers deprecations are not ours
                from testcontainers.core.container import DockerContainer

                container = DockerContainer(self.image).with_exposed_ports(self._PORT)
                container = container.with_command(command)
                container.start()
                self._container = container
                deadline = time.monotonic() + timeout
                while not any(_READY_LINE.encode() in out for out in container.get_logs()):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no {_READY_LINE!r} in its log within {timeout:g} s")
                    time.sleep(0.2)
                self.host = (
                    f"{container.get_container_host_ip()}:{container.get_exposed_port(self._PORT)}"
                )
        except ImportError as exc:
            raise BackendUnavailable(
                f"testcontainers is not installed ({exc}); install pubsub-canary[testing]",
                backend="pubsub",
            ) from exc
        except Exception as exc:
            self.close()
            raise BackendUnavailable(
                f"the Pub/Sub emulator container {self.image} did not start:"
                f" {type(exc).__name__}: {exc}",
                backend="pubsub",
            ) from exc
        return self

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                container.stop()


def emulator_command(port: int, project: str, binary: str | None = None) -> list[str]:
    """The command line that starts the emulator on ``127.0.0.1:port``.

    Raises:
        BackendUnavailable: no emulator is installed (the message says how to get one).
    """
    override = binary or os.environ.get(EMULATOR_BIN_ENV)
    if override:
        if not os.path.isfile(override):
            source = "binary" if binary else EMULATOR_BIN_ENV
            raise BackendUnavailable(
                f"{source}={override} does not exist; point it at the cloud-pubsub-emulator"
                " launcher, or unset it to use the Google Cloud SDK's",
                backend="pubsub",
            )
        return [override, "--host=127.0.0.1", f"--port={port}"]
    if os.path.isfile(DEFAULT_EMULATOR_BIN):
        return [DEFAULT_EMULATOR_BIN, "--host=127.0.0.1", f"--port={port}"]
    gcloud = shutil.which("gcloud")
    if gcloud:
        return [
            gcloud, "beta", "emulators", "pubsub", "start",
            f"--host-port=127.0.0.1:{port}", f"--project={project}",
        ]  # fmt: skip
    raise BackendUnavailable(
        f"the Pub/Sub emulator is not installed (no {DEFAULT_EMULATOR_BIN}, no gcloud on PATH);"
        f" {_INSTALL_HINT}",
        backend="pubsub",
    )


def reserve_port(port: int) -> int:
    """``port`` if it is free on 127.0.0.1 (a free one when 0).

    Raises:
        BackendUnavailable: the port asked for is in use.
        ConfigError: the port is out of range.
    """
    if not 0 <= port < 65536:
        raise ConfigError(f"port={port} is not valid; use 1 to 65535, or 0 for a free port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BackendUnavailable(
                    f"port {port} on 127.0.0.1 is in use; stop what listens there or pick another"
                    " port (--port 0 picks a free one)",
                    backend="pubsub",
                    port=port,
                ) from exc
            raise BackendUnavailable(
                f"cannot listen on 127.0.0.1:{port}: {exc.strerror}", backend="pubsub"
            ) from exc
        chosen: int = probe.getsockname()[1]
        return chosen


class PubSubEmulator(PubSubBackend):
    """The Pub/Sub emulator as a local process on 127.0.0.1, stopped by :meth:`close`.

    Example::

        with PubSubEmulator() as emulator:
            publisher = emulator.publisher()
            publisher.create_topic(name=emulator.topic_path("orders"))

    The emulator runs under a small supervisor process that stops it when our end of its stdin
    closes, so it does not outlive this process even after SIGKILL.

    Args:
        port: port to listen on; 0 picks a free one.
        project: project id the clients use (the emulator accepts any).
        binary: path of the ``cloud-pubsub-emulator`` launcher (default: the env override
            ``PUBSUB_CANARY_EMULATOR_BIN``, the Google Cloud SDK's, then ``gcloud``).
        start_timeout: seconds to wait for "Server started".
    """

    kind = "local"

    def __init__(
        self,
        port: int = 0,
        project: str = DEFAULT_PUBSUB_PROJECT,
        *,
        binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__("", project)
        self.port = port
        self._binary = binary
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: LogFile | None = None
        self.command: list[str] = []
        #: Seconds from launch to "Server started" (for reports).
        self.startup_seconds: float | None = None

    @property
    def description(self) -> str:
        program = os.path.basename(self.command[0]) if self.command else "emulator"
        return f"{program} at {self.host or 'not started'}, project {self.project}"

    @property
    def pid(self) -> int | None:
        """Process id of the supervisor (the emulator runs in its own process group below it)."""
        return None if self._process is None else self._process.pid

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """What the emulator printed so far."""
        return self._log.read() if self._log is not None else ""

    def start(self) -> PubSubEmulator:
        if self._process is not None:
            return self
        port = reserve_port(self.port)
        self.command = emulator_command(port, self.project, self._binary)
        self._log = LogFile("pubsub-canary-emulator-")
        began = time.monotonic()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pubsub_canary.testing._supervise", "--", *self.command],
            stdin=subprocess.PIPE,
            stdout=self._log.writer,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.port = port
        self.host = f"127.0.0.1:{port}"
        try:
            self._wait_ready(began)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        assert self._process is not None and self._log is not None
        deadline = began + self._start_timeout
        while _READY_LINE not in self._log.read():
            code = self._process.poll()
            if code is not None:
                raise BackendUnavailable(
                    f"the Pub/Sub emulator ({self.command[0]}) exited with status {code} before"
                    f" it was ready; log: {self._log.tail() or '(empty)'}",
                    backend="pubsub",
                )
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"the Pub/Sub emulator ({self.command[0]}) did not start within"
                    f" {self._start_timeout:g} s; log: {self._log.tail() or '(empty)'}",
                    backend="pubsub",
                )
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the emulator. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # the supervisor stops the emulator's group
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(process, group=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PubSubEmulator:
        return self.start()


def start_pubsub(project: str | None = None) -> PubSubBackend:
    """Connect to or start a Pub/Sub emulator: ``PUBSUB_EMULATOR_HOST``, Docker, then local.

    Args:
        project: project id; default ``PUBSUB_PROJECT_ID`` or ``pubsub-canary-test``.

    Raises:
        ConfigError: ``PUBSUB_EMULATOR_HOST`` is not ``host:port``.
        BackendUnavailable: no emulator could be reached or started.
    """
    project = project or os.environ.get(PUBSUB_PROJECT_ENV) or DEFAULT_PUBSUB_PROJECT
    host = os.environ.get(PUBSUB_EMULATOR_HOST_ENV)
    if host is not None:
        return PubSubBackend(host.strip(), project).start()
    usable, reason = docker_status()
    if usable:
        try:
            return DockerPubSub(project).start()
        except BackendUnavailable as exc:
            log.warning("%s; using a local emulator instead", exc.message)
    else:
        log.debug("not using Docker for Pub/Sub: %s", reason)
    return PubSubEmulator(project=project).start()
