"""Helpers shared by the Kafka benchmarks (not part of the library).

Also a small worker entry point, run as a child process by the benchmarks::

    python benchmarks/_common.py member --coordinator URL ...   # one KafkaMember, with a ledger
    python benchmarks/_common.py producer --bootstrap-servers B --topic T --rate R

Members and the producer run as processes so that the benchmark process (coordinator, HTTP
server, measurements) does not share a GIL with them: on a 2-core machine thread contention
would otherwise show up as handoff latency that no user would see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))


# --- output ---------------------------------------------------------------------------------


def progress(msg: str) -> None:
    """A progress line on stderr (stdout stays for the figures and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit_json(figures: dict[str, Any]) -> None:
    """The last line of stdout: one JSON object."""
    print(json.dumps(figures, sort_keys=True), flush=True)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    with contextlib.suppress(OSError):
        return f"{os.getloadavg()[0]:.2f}"
    return "n/a"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list: an observed value."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(s)))
    return s[min(rank, len(s)) - 1]


def median(values: list[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


# --- the handler both sides run ---------------------------------------------------------------


def work(value: bytes | None) -> int:
    """The benchmark's message handler: decode JSON, a little arithmetic."""
    body = json.loads(value or b"{}")
    seq = int(body.get("seq", 0))
    return (seq * 31 + len(body.get("pad", ""))) % 1_000_003


def payload(seq: int, pad: str = "") -> bytes:
    return json.dumps({"seq": seq, "pad": pad}).encode()


# --- broker -----------------------------------------------------------------------------------


@contextlib.contextmanager
def kafka_broker(bootstrap_servers: str | None, brokers: int = 3) -> Iterator[Any]:
    """The embedded test broker, or an external one when ``bootstrap_servers`` is given.

    Yields an object with ``bootstrap_servers``, ``description`` and
    ``create_topic(name, partitions)``.
    """
    if bootstrap_servers:
        from pubsub_canary.testing.kafka import ExternalKafka

        backend: Any = ExternalKafka(bootstrap_servers).start()
    else:
        from pubsub_canary.testing.embedded_kafka import EmbeddedKafka

        backend = EmbeddedKafka(brokers=brokers).start()
    try:
        yield backend
    finally:
        backend.close()


def workdir_with_log(stack: contextlib.ExitStack, workdir: str | None) -> Path:
    """The run's working directory (a temporary one unless given), with the coordinator's log
    (everything at INFO) in ``coordinator.log`` there: stderr is for progress lines."""
    import logging

    path = Path(workdir or stack.enter_context(tempfile.TemporaryDirectory()))
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    stack.callback(handler.close)
    stack.callback(root.removeHandler, handler)
    return path


def wait_for_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Wait until every partition of ``topic`` has a leader in the metadata."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=5)
        t = md.topics.get(topic)
        parts = t.partitions if t is not None and t.error is None else {}
        if len(parts) == partitions and all(p.leader >= 0 for p in parts.values()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"topic {topic} did not get {partitions} partitions with leaders")


def prefill(
    bootstrap: str, topic: str, partitions: int, count: int, pad: str = ""
) -> dict[int, int]:
    """Produce ``count`` messages round-robin over the partitions; returns per-partition counts."""
    from confluent_kafka import Producer

    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "enable.idempotence": True,
        }
    )
    per: dict[int, int] = dict.fromkeys(range(partitions), 0)
    for n in range(count):
        part = n % partitions
        while True:
            try:
                p.produce(topic, value=payload(n, pad), partition=part)
                break
            except BufferError:
                p.poll(0.05)
        per[part] += 1
        if n % 10000 == 0:
            p.poll(0)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} messages not delivered while pre-filling {topic}")
    return per


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the coordinator over real HTTP -------------------------------------------------------------


class HttpCoordinator:
    """The coordinator's FastAPI app under uvicorn, in a background thread on 127.0.0.1."""

    def __init__(self, coordinator: Any) -> None:
        import uvicorn

        from pubsub_canary.coordinator.api import create_app

        self.coordinator = coordinator
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(coordinator),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> HttpCoordinator:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the coordinator's HTTP server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(15)


# --- child processes --------------------------------------------------------------------------


def spawn_worker(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python benchmarks/_common.py ARGS`` with its output in ``log_path``."""
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_common.py"), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out.close()
    return proc


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def read_ledger(path: Path) -> dict[tuple[int, int], float]:
    """A member's ledger: (partition, offset) -> wall time it was processed."""
    out: dict[tuple[int, int], float] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault((int(parts[0]), int(parts[1])), float(parts[2]))
    return out


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``cond`` until true; returns the seconds waited, raises after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


# --- worker: one member process -----------------------------------------------------------------


def _exit_with_parent(stop: Callable[[], None]) -> None:
    """Call ``stop`` when the benchmark process dies, then make sure we exit."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop()
        time.sleep(20)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _member_main(a: argparse.Namespace) -> int:
    import logging

    import confluent_kafka  # noqa: F401 - imported before the join clock starts (below)

    from pubsub_canary.client.kafka import KafkaMember
    from pubsub_canary.client.processing import Outcome, Record

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Buffered: one line per message is cheap this way; flushed on exit and every second.
    ledger = open(a.ledger, "a", buffering=1 << 16)  # noqa: SIM115

    def handler(rec: Record) -> None:
        work(rec.value)

    member = KafkaMember(
        handler,
        coordinator=a.coordinator,
        bootstrap_servers=a.bootstrap_servers,
        topic=a.topic,
        group_id=a.group,
        cohort=a.cohort,
        version=a.version,
        member_id=a.member_id,
        consumer_config=json.loads(a.consumer_config) if a.consumer_config else None,
    )
    last_flush = [time.monotonic()]

    def on_processed(rec: Record, outcome: Outcome, dead: bool) -> None:
        ledger.write(f"{rec.partition} {rec.offset} {time.time():.6f}\n")
        now = time.monotonic()
        if now - last_flush[0] > 1.0:
            last_flush[0] = now
            ledger.flush()

    member.on_processed = on_processed
    _exit_with_parent(member.stop)
    if a.trace:
        threading.Thread(target=_trace, args=(member, a.ledger + ".trace"), daemon=True).start()
    # A join is timed from here, as a subscribe() consumer's from its constructor: both with
    # the client library imported, neither with the process start-up.
    Path(a.ledger + ".started").write_text(f"{time.time():.6f}\n")
    try:
        member.run(install_signal_handlers=True)
    finally:
        ledger.close()
    return 0


def _trace(member: Any, path: str) -> None:
    """Debug aid (``--trace``): log when the session's view and the held partitions change.

    Polls every millisecond, so it costs some CPU; off by default.
    """
    last = None
    with open(path, "w") as f:
        while True:
            s = member.session
            cur = (s.generation if s else -1, tuple(member.partitions))
            if cur != last:
                f.write(f"{time.time():.6f} {cur[0]} {','.join(map(str, cur[1]))}\n")
                f.flush()
                last = cur
            time.sleep(0.001)


def read_trace(path: Path) -> list[tuple[float, int, set[int]]]:
    """(time, view generation, held partitions) lines of a member's ``--trace`` file."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            held = set(map(int, parts[2].split(","))) if len(parts) > 2 else set()
            out.append((float(parts[0]), int(parts[1]), held))
    return out


# --- worker: a steady producer ------------------------------------------------------------------


def _producer_main(a: argparse.Namespace) -> int:
    from confluent_kafka import Producer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _exit_with_parent(stop.set)
    p = Producer({"bootstrap.servers": a.bootstrap_servers, "linger.ms": 5})
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - start) * a.rate)
        while n < due:
            try:
                p.produce(a.topic, value=payload(n), partition=n % a.partitions)
            except BufferError:
                p.poll(0.05)
                continue
            n += 1
        p.poll(0)
        time.sleep(0.005)
    p.flush(30)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/_common.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("member")
    m.add_argument("--coordinator", required=True)
    m.add_argument("--bootstrap-servers", required=True)
    m.add_argument("--topic", required=True)
    m.add_argument("--group", required=True)
    m.add_argument("--cohort", required=True, choices=["stable", "canary"])
    m.add_argument("--version", required=True)
    m.add_argument("--member-id", required=True)
    m.add_argument("--ledger", required=True)
    m.add_argument("--consumer-config", help="extra librdkafka settings, as JSON")
    m.add_argument("--trace", action="store_true", help="log view and assignment changes")
    pr = sub.add_parser("producer")
    pr.add_argument("--bootstrap-servers", required=True)
    pr.add_argument("--topic", required=True)
    pr.add_argument("--partitions", type=int, required=True)
    pr.add_argument("--rate", type=float, required=True, help="messages/s over all partitions")
    a = ap.parse_args(argv)
    return _member_main(a) if a.cmd == "member" else _producer_main(a)


if __name__ == "__main__":
    raise SystemExit(main())
