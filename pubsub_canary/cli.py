"""The ``pubsub-canary`` command line.

Each subcommand imports its implementation lazily so that ``pubsub-canary --help`` stays fast
and a missing optional extra only affects the subcommand that needs it. Every
:class:`~pubsub_canary.errors.CanaryError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pubsub_canary.errors import CanaryError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubsub-canary",
        description="Canary coordinator for Kafka consumer groups and Pub/Sub subscriptions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dev(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
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
    try:
        return _run(args)
    except CanaryError as exc:
        detail = ", ".join(f"{k}={v}" for k, v in exc.fields.items())
        print(f"error: {exc.message}" + (f" ({detail})" if detail else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
