"""The ``pubsub-canary`` command line.

Each subcommand imports its implementation lazily so that ``pubsub-canary --help`` stays fast
and a missing optional extra only affects the subcommand that needs it. Every
:class:`~pubsub_canary.errors.CanaryError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pubsub_canary.errors import CanaryError, ConfigError


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="start a local test backend in the foreground")
    dev_sub = dev.add_subparsers(dest="backend", required=True)
    kafka = dev_sub.add_parser("kafka", help="the embedded Kafka test broker (librdkafka mock)")
    kafka.add_argument("--brokers", type=int, default=3, help="number of mock brokers")
    kafka.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME:PARTITIONS",
        help="create a topic at start (repeatable), e.g. orders:12",
    )
    pubsub = dev_sub.add_parser("pubsub", help="the Google Cloud Pub/Sub emulator")
    pubsub.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    pubsub.add_argument("--project", default="pubsub-canary-dev")


DEFAULT_COORDINATOR = "http://127.0.0.1:8470"


def _add_coordinator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator service")
    p.add_argument("--listen", default="127.0.0.1:8470", help="HOST:PORT to serve the API on")
    p.add_argument(
        "--store",
        default="sqlite:///pubsub-canary.db",
        help="sqlite:///PATH (default), postgresql://USER@HOST:PORT/DB or memory://",
    )
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("PUBSUB_CANARY_KAFKA_BOOTSTRAP"),
        help="Kafka brokers, to check topics and read lag (default $PUBSUB_CANARY_KAFKA_BOOTSTRAP)",
    )
    p.add_argument(
        "--kafka-config-file",
        default=os.environ.get("PUBSUB_CANARY_KAFKA_CONFIG_FILE") or None,
        help="Kafka client properties (key=value lines: security.protocol, sasl.*, ssl.*) for "
        "the coordinator's Kafka clients (default $PUBSUB_CANARY_KAFKA_CONFIG_FILE)",
    )
    p.add_argument(
        "--kafka-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one librdkafka setting for the coordinator's Kafka clients, after the file's; "
        "repeat it. Keep passwords in the file: a command line is visible to other users",
    )
    p.add_argument("--lease-seconds", type=float, default=6.0, help="member lease")
    p.add_argument(
        "--operator-token",
        default=os.environ.get("PUBSUB_CANARY_OPERATOR_TOKEN") or None,
        help="require 'Authorization: Bearer TOKEN' for rollout changes "
        "(default $PUBSUB_CANARY_OPERATOR_TOKEN; unset: open)",
    )


def _add_rollout(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rollout", help="apply, inspect and steer rollouts")
    p.add_argument(
        "--coordinator",
        default=os.environ.get("PUBSUB_CANARY_COORDINATOR", DEFAULT_COORDINATOR),
        help=f"coordinator URL (default $PUBSUB_CANARY_COORDINATOR or {DEFAULT_COORDINATOR})",
    )
    p.add_argument(
        "--operator-token",
        default=os.environ.get("PUBSUB_CANARY_OPERATOR_TOKEN") or None,
        help="bearer token for rollout changes (default $PUBSUB_CANARY_OPERATOR_TOKEN)",
    )
    rs = p.add_subparsers(dest="action", required=True)
    apply = rs.add_parser("apply", help="create and start a rollout from a YAML file")
    apply.add_argument("-f", "--file", required=True, help="rollout file (YAML)")
    apply.add_argument("--json", action="store_true", help="print JSON")
    status = rs.add_parser("status", help="show one rollout, or list them all")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    for action in ("promote", "approve", "pause", "resume", "abort"):
        a = rs.add_parser(action, help=f"{action} a rollout")
        a.add_argument("name")
        a.add_argument("--by", default=os.environ.get("USER", "operator"), help="who acts")
        a.add_argument("--json", action="store_true", help="print JSON")
    schema = rs.add_parser("schema", help="print the rollout file's JSON schema")
    schema.add_argument("--json", action="store_true", help="(always JSON)")
    validate = rs.add_parser("validate", help="check a rollout file without applying it")
    validate.add_argument("-f", "--file", required=True)
    validate.add_argument("--json", action="store_true", help="print JSON")


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a canary rollout end to end on the embedded defaults")
    p.add_argument("--scenario", choices=["healthy", "regression"], default="healthy")
    p.add_argument("--transport", choices=["kafka", "pubsub"], default="kafka")
    p.add_argument("--bootstrap-servers", help="use this Kafka instead of the embedded test broker")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--rate", type=int, default=400, help="messages per second produced")
    p.add_argument("--stable", type=int, default=3, help="stable member processes")
    p.add_argument("--canary", type=int, default=1, help="canary member processes")
    p.add_argument("--hold", type=float, default=5.0, help="seconds each step holds")
    p.add_argument(
        "--stateful",
        action="store_true",
        help="members keep per-key running totals as state that moves with each partition",
    )
    p.add_argument("--workdir", help="where the SQLite store and ledgers go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON summary as last line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubsub-canary",
        description="Canary coordinator for Kafka consumer groups and Pub/Sub subscriptions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_coordinator(sub)
    _add_rollout(sub)
    _add_demo(sub)
    _add_dev(sub)
    return parser


def _read_spec(path: str) -> Any:
    from pubsub_canary.core.model import load_rollout_spec

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read rollout file {path!r}: {exc.strerror}") from None
    return load_rollout_spec(text, source=path)


def _rollout(args: argparse.Namespace) -> int:
    from pubsub_canary.render import render_list, render_status

    if args.action == "schema":
        from pubsub_canary.core.model import rollout_json_schema

        print(json.dumps(rollout_json_schema(), indent=2))
        return 0
    if args.action == "validate":
        spec = _read_spec(args.file)
        print(json.dumps({"valid": True, "name": spec.name}) if args.json else f"{args.file}: ok")
        return 0
    from pubsub_canary.client.operator import OperatorClient

    client = OperatorClient(args.coordinator, token=args.operator_token)
    show = (lambda x: json.dumps(x, indent=2)) if args.json else render_status
    if args.action == "apply":
        spec = _read_spec(args.file)
        print(show(client.apply(spec.model_dump(mode="json"))))
    elif args.action == "status":
        while True:
            if args.name:
                print(show(client.status(args.name)))
            else:
                rows = client.list()
                print(json.dumps(rows, indent=2) if args.json else render_list(rows))
            if not args.watch:
                break
            time.sleep(args.watch)
            print()
    else:
        print(show(client.act(args.name, args.action, by=args.by)))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "coordinator":
        from pubsub_canary.coordinator.broker import parse_client_settings, read_client_config
        from pubsub_canary.coordinator.server import serve

        kafka_config = read_client_config(args.kafka_config_file) if args.kafka_config_file else {}
        kafka_config.update(parse_client_settings(args.kafka_config))
        return serve(
            listen=args.listen,
            store_url=args.store,
            bootstrap_servers=args.bootstrap_servers,
            kafka_config=kafka_config,
            lease_seconds=args.lease_seconds,
            operator_token=args.operator_token,
            log_level="debug" if args.verbose else "info",
        )
    if args.command == "rollout":
        return _rollout(args)
    if args.command == "demo":
        from pubsub_canary.demo.runner import run_demo

        return run_demo(args)
    if args.command == "dev":
        from pubsub_canary.testing import dev

        return dev.main(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return _run(args)
    except CanaryError as exc:
        detail = ", ".join(f"{k}={v}" for k, v in exc.fields.items())
        print(f"error: {exc.message}" + (f" ({detail})" if detail else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
