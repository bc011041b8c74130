"""Run the coordinator as a service: store + broker + HTTP API under uvicorn."""

from __future__ import annotations

import logging
import socket

from pubsub_canary.errors import ConfigError

log = logging.getLogger("pubsub_canary.coordinator")


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); a one-line ConfigError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--listen {listen!r} is not HOST:PORT (for example 127.0.0.1:8470)", field="listen"
        )
    return host.strip("[]"), int(port)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn does: connections of a previous run in TIME_WAIT do not block the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --listen port "
                "or stop what is using it",
                field="listen",
            ) from None


def serve(
    *,
    listen: str,
    store_url: str,
    bootstrap_servers: str | None,
    lease_seconds: float,
    kafka_config: dict[str, str] | None = None,
    operator_token: str | None = None,
    log_level: str = "info",
) -> int:
    import uvicorn

    from pubsub_canary.coordinator.api import create_app
    from pubsub_canary.coordinator.broker import KafkaBroker
    from pubsub_canary.coordinator.service import Coordinator
    from pubsub_canary.coordinator.store import open_store

    host, port = parse_listen(listen)
    if kafka_config and not bootstrap_servers:
        raise ConfigError(
            "a Kafka client config was given without --bootstrap-servers: name the brokers",
            field="bootstrap_servers",
        )
    check_port_free(host, port)
    broker = KafkaBroker(bootstrap_servers, kafka_config) if bootstrap_servers else None
    store = open_store(store_url)
    coordinator = Coordinator(store, broker, lease_seconds=lease_seconds)
    app = create_app(coordinator, operator_token=operator_token)
    log.info(
        "coordinator on http://%s:%d (store %s, broker %s); API docs at /docs",
        host,
        port,
        store_url,
        bootstrap_servers or "none",
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        if broker is not None:
            broker.close()
        store.close()
    return 0
