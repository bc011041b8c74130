"""The process that hosts librdkafka's mock cluster (run as ``python -m``; internal).

The mock cluster lives inside a librdkafka client handle, so some process has to keep one
alive; this is that process. It loads the librdkafka shared library that ships in the
confluent-kafka wheel with :mod:`ctypes`, creates the cluster and then serves a line protocol:
one JSON object per line on stdin, one JSON reply per line on stdout. The first reply, sent
unasked, is ``{"ok": true, "bootstrap": "127.0.0.1:P1,..."}`` (or ``{"ok": false, "error": ...}``).

It exits when stdin reaches end of file, so it dies with its parent however the parent dies:
the kernel closes the parent's end of the pipe, even on SIGKILL.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from pubsub_canary.testing._config import LIBRDKAFKA_ENV

_RD_KAFKA_PRODUCER = 0
_c = ctypes


def find_librdkafka() -> str:
    """Path of a librdkafka shared library: env override, the wheel's copy, or the system's."""
    override = os.environ.get(LIBRDKAFKA_ENV)
    if override:
        return override
    spec = importlib.util.find_spec("confluent_kafka")
    candidates: list[str] = []
    if spec is not None and spec.submodule_search_locations:
        pkg = next(iter(spec.submodule_search_locations))
        site = os.path.dirname(pkg)
        candidates += glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.so*"))
        candidates += glob.glob(os.path.join(pkg, ".dylibs", "librdkafka*.dylib"))
        candidates += glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.dll"))
    system = ctypes.util.find_library("rdkafka")
    if system:
        candidates.append(system)
    if not candidates:
        raise RuntimeError(
            "no librdkafka shared library found next to confluent_kafka nor on the system;"
            f" install the confluent-kafka wheel or set {LIBRDKAFKA_ENV} to its path"
        )
    return candidates[0]


class MockCluster:
    """A librdkafka mock cluster in this process, driven through ctypes."""

    def __init__(self, brokers: int) -> None:
        path = find_librdkafka()
        lib = ctypes.CDLL(path)
        if not hasattr(lib, "rd_kafka_mock_cluster_new"):
            raise RuntimeError(f"librdkafka at {path} has no mock cluster API")
        self._lib = lib
        self._declare()
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        # Notices (for example "no bootstrap.servers configured") are noise for a host handle.
        lib.rd_kafka_conf_set(conf, b"log_level", b"4", errstr, len(errstr))
        lib.rd_kafka_conf_set(conf, b"client.id", b"pubsub-canary-mock-host", errstr, len(errstr))
        self._rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not self._rk:
            raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._cluster = lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._cluster:
            raise RuntimeError("rd_kafka_mock_cluster_new returned NULL")
        self.brokers = brokers
        self.bootstrap = lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def _declare(self) -> None:
        lib, p, i, i16, i32 = self._lib, _c.c_void_p, _c.c_int, _c.c_int16, _c.c_int32
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "rd_kafka_conf_new": (p, []),
            "rd_kafka_conf_set": (i, [p, _c.c_char_p, _c.c_char_p, _c.c_char_p, _c.c_size_t]),
            "rd_kafka_new": (p, [i, p, _c.c_char_p, _c.c_size_t]),
            "rd_kafka_err2str": (_c.c_char_p, [i]),
            "rd_kafka_mock_cluster_new": (p, [p, i]),
            "rd_kafka_mock_cluster_bootstraps": (_c.c_char_p, [p]),
            "rd_kafka_mock_topic_create": (i, [p, _c.c_char_p, i, i]),
            "rd_kafka_mock_broker_set_down": (i, [p, i32]),
            "rd_kafka_mock_broker_set_up": (i, [p, i32]),
            "rd_kafka_mock_broker_set_rtt": (i, [p, i32, i]),
            "rd_kafka_mock_push_request_errors_array": (None, [p, i16, _c.c_size_t, p]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what}: {self._lib.rd_kafka_err2str(err).decode()}")

    def create_topic(self, name: str, partitions: int, replication_factor: int) -> None:
        err = self._lib.rd_kafka_mock_topic_create(
            self._cluster, name.encode(), partitions, replication_factor
        )
        self._check(err, f"create topic {name!r}")

    def set_broker_down(self, broker_id: int) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id), "down")

    def set_broker_up(self, broker_id: int) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id), "up")

    def set_broker_rtt(self, broker_id: int, rtt_ms: int) -> None:
        err = self._lib.rd_kafka_mock_broker_set_rtt(self._cluster, broker_id, rtt_ms)
        self._check(err, "rtt")

    def push_request_errors(self, api_key: int, errors: list[int]) -> None:
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(
            self._cluster, api_key, len(errors), ctypes.cast(array, ctypes.c_void_p)
        )


def serve(cluster: MockCluster, requests: TextIO, replies: TextIO) -> None:
    """Answer requests until ``requests`` reaches end of file or a ``shutdown`` request."""
    handlers: dict[str, Callable[..., None]] = {
        "create_topic": cluster.create_topic,
        "set_broker_down": cluster.set_broker_down,
        "set_broker_up": cluster.set_broker_up,
        "set_broker_rtt": cluster.set_broker_rtt,
        "push_request_errors": cluster.push_request_errors,
    }
    for line in requests:
        reply: dict[str, Any]
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "shutdown":
                _send(replies, {"ok": True})
                return
            if op == "ping":
                reply = {"ok": True}
            else:
                handlers[op](**request)
                reply = {"ok": True}
        except Exception as exc:  # every failure becomes a reply; the parent raises it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        _send(replies, reply)


def _send(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pubsub_canary.testing._mock_broker")
    parser.add_argument("--brokers", type=int, default=3)
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole foreground group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol stream private: anything native code prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        cluster = MockCluster(args.brokers)
    except Exception as exc:
        _send(replies, {"ok": False, "error": str(exc)})
        os._exit(1)
    _send(replies, {"ok": True, "bootstrap": cluster.bootstrap, "brokers": cluster.brokers})
    serve(cluster, sys.stdin, replies)
    # No orderly destroy: it can wait on client connections, and exiting closes every socket.
    os._exit(0)


if __name__ == "__main__":
    main()
