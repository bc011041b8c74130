"""The coordinator's status page in a real headless browser: Debian's chromium under Playwright.

A real coordinator (uvicorn in a thread, MemoryStore, MemoryBroker with 12 partitions) with three
fake members that heartbeat with metric deltas and release what they are asked to, as the member
library does. A rollout waits at an approval gate after its first step; the page shows it, a
screenshot shows it is not blank, and clicking Approve moves the rollout on.

Playwright never downloads a browser here (``playwright install`` cannot reach its servers): the
test drives ``/usr/bin/chromium``, which ``scripts/install-browser.sh`` installs. Without
playwright or chromium the tests skip, except under ``CI``, where they fail.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pubsub_canary.coordinator.broker import MemoryBroker
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.core.observations import CohortObservations, LatencyHistogram
from pubsub_canary.errors import CanaryError
from pubsub_canary.testing._config import is_ci

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOPIC, GROUP, UNITS = "orders", "billing", 12
MEMBERS = (("stable-a", "stable"), ("stable-b", "stable"), ("canary-a", "canary"))
#: Set to a folder to keep the screenshots (CI artifacts, or to look at them).
SCREENSHOTS_ENV = "PUBSUB_CANARY_SCREENSHOTS"
WAIT_MS = 15_000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[dev]'"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: run 'bash scripts/install-browser.sh' (Debian's chromium)"
    return None


# --- a live coordinator with fake members --------------------------------------------------------


@dataclass
class FakeMembers:
    """Members that heartbeat every 0.2 s with metric deltas and release what is revoked."""

    coordinator: Coordinator
    broker: MemoryBroker
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def register(self) -> None:
        for mid, cohort in MEMBERS:
            self.coordinator.register(
                transport="kafka",
                topic=TOPIC,
                group_id=GROUP,
                units=UNITS,
                cohort=cohort,
                version="1.4.0" if cohort == "stable" else "1.5.0",
                member_id=mid,
            )

    def run(self) -> None:
        rng = random.Random(7)
        beat = 0
        while not self.stop.wait(0.2):
            beat += 1
            for mid, cohort in MEMBERS:
                n = rng.randint(15, 25)
                slow = 0.012 if cohort == "canary" else 0.010
                delta = CohortObservations(
                    processed=n,
                    errors=1 if beat % 5 == 0 else 0,
                    latency=LatencyHistogram.of([rng.uniform(0.002, slow * 3) for _ in range(n)]),
                )
                try:
                    view = self.coordinator.heartbeat(mid, metrics=delta)
                    revoked = [
                        (u["unit"], u["epoch"], None)
                        for u in view["units"]
                        if u["status"] == "revoking"
                    ]
                    if revoked:
                        self.coordinator.release(mid, revoked)
                except CanaryError as exc:
                    self.errors.append(f"{mid}: {exc.message}")
            for p in range(UNITS):  # the topic grows; consumers trail a little behind
                end = beat * 20
                self.broker.watermarks[(TOPIC, p)] = (end - rng.randint(0, 40), end)


@dataclass
class Live:
    url: str
    coordinator: Coordinator
    stop_server: Callable[[], None]

    def status(self, name: str = "r1") -> dict[str, Any]:
        return self.coordinator.status(name)

    def wait_for(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check(s := self.status()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {s['phase']} {s['reason']}")
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rollout_spec(name: str = "r1") -> dict[str, Any]:
    return {
        "name": name,
        "target": {"topic": TOPIC, "group": GROUP},
        "stable_version": "1.4.0",
        "canary_version": "1.5.0",
        "steps": [
            {"share": 25, "hold_seconds": 2, "min_messages": 30, "approval": True},
            {"share": 50, "hold_seconds": 3600},
            {"share": 100},
        ],
        "slo": {"max_error_rate": 0.2},
        "analysis": {"latency": {"min_sample": 20}, "lag_growth": None},
    }


@contextmanager
def live_coordinator(operator_token: str | None = None) -> Iterator[Live]:
    import uvicorn

    from pubsub_canary.coordinator.api import create_app

    broker = MemoryBroker({TOPIC: UNITS})
    coordinator = Coordinator(MemoryStore(), broker, lease_seconds=6.0)
    app = create_app(coordinator, operator_token=operator_token)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)

    def stop_server() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    members = FakeMembers(coordinator, broker)
    members.register()
    feeder = threading.Thread(target=members.run, name="fake-members", daemon=True)
    feeder.start()
    coordinator.apply_rollout(parse_rollout_spec(rollout_spec()))
    try:
        yield Live(f"http://127.0.0.1:{port}", coordinator, stop_server)
    finally:
        members.stop.set()
        feeder.join(timeout=5)
        stop_server()
    assert members.errors == []


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if is_ci():
            pytest.fail(f"CI is set and the browser test cannot run: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("dialog", lambda dialog: dialog.accept())  # abort / promote ask for confirmation
    pg.set_default_timeout(WAIT_MS)
    yield pg
    context.close()
    assert problems == []


def _keep(png: bytes, name: str) -> None:
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


# --- PNG, read with the standard library --------------------------------------------------------


def read_png(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and pixels of an 8-bit, non-interlaced RGB(A) PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    ch = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * ch
    prev, rows = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(ch, stride):
                line[i] = (line[i] + line[i - ch]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - ch] if i >= ch else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - ch] if i >= ch else 0
                b, c = prev[i], prev[i - ch] if i >= ch else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    pixels = [tuple(r[x : x + 3]) for r in rows for x in range(0, stride, ch)]
    return width, height, pixels


def is_blue(p: tuple[int, ...]) -> bool:
    return p[2] > p[0] + 80 and p[2] > p[1] + 20


def is_orange(p: tuple[int, ...]) -> bool:
    return p[0] > p[2] + 80 and p[0] > p[1] + 40


# --- tests -----------------------------------------------------------------------------------


def test_page_shows_the_rollout_and_approve_moves_it_on(page: Any) -> None:
    from playwright.sync_api import expect

    with live_coordinator() as live:
        page.goto(live.url + "/")
        live.wait_for("the approval gate", lambda s: s["phase"] == "awaiting_approval")

        expect(page.locator("#summary .badge").first).to_have_text("awaiting approval")
        expect(page.locator("#step")).to_have_text("1/3")
        units = page.locator("#unit-map .unit")
        expect(units).to_have_count(UNITS)
        expect(page.locator('#unit-map .unit[data-cohort="canary"]')).to_have_count(3)
        expect(page.locator('#unit-map .unit[data-cohort="stable"]')).to_have_count(9)
        expect(page.locator("#decisions li").first).to_contain_text("waiting for approval")
        # A few polls, so that the health charts have lines to draw.
        page.wait_for_function("document.querySelectorAll('#health polyline').length >= 8")
        expect(page.get_by_role("button", name="Approve")).to_be_enabled()
        expect(page.get_by_role("button", name="Resume")).to_be_disabled()

        shot = page.screenshot()
        _keep(shot, "status-page.png")
        width, height, pixels = read_png(shot)
        assert (width, height) == (1280, 1000)
        colours = set(pixels)
        ink = sum(1 for p in pixels if min(p) < 235)
        assert len(colours) > 200, f"only {len(colours)} colours: the page looks blank"
        assert ink > 0.08 * len(pixels), f"{ink / len(pixels):.1%} of the page is not blank"
        # A clip of the page rather than an element shot: the map may be redrawn meanwhile.
        _, _, cells = read_png(page.screenshot(clip=page.locator("#unit-map").bounding_box()))
        assert sum(map(is_blue, cells)) > 1000, "no stable (blue) cells in the unit map"
        assert sum(map(is_orange, cells)) > 500, "no canary (orange) cells in the unit map"

        page.get_by_role("button", name="Approve").click()

        expect(page.locator("#msg")).to_contain_text("approve: done")
        live.wait_for("step 2", lambda s: s["step"] == 2 and s["share"] == 50.0)
        assert live.status()["phase"] == "progressing"
        expect(page.locator("#step")).to_have_text("2/3")
        expect(page.locator("#share-now")).to_have_text("50%")
        expect(page.locator("#decisions li").first).to_contain_text("approved by web")
        expect(page.locator('#unit-map .unit[data-cohort="canary"]')).to_have_count(6)

        live.stop_server()
        expect(page.get_by_role("alert")).to_contain_text("not answering")
        expect(page.locator("#updated")).to_have_class("stale")


def test_operator_token_guards_the_buttons_and_the_api(page: Any) -> None:
    from playwright.sync_api import expect

    with live_coordinator(operator_token="s3cret-token") as live:
        live.wait_for("the approval gate", lambda s: s["phase"] == "awaiting_approval")
        api = f"{live.url}/v1/rollouts/r1"
        r = httpx.post(f"{api}/approve")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "Unauthorized"
        assert "Authorization: Bearer" in r.json()["message"]
        assert httpx.post(live.url + "/v1/rollouts", json=rollout_spec("r2")).status_code == 401
        assert httpx.get(api).status_code == 200  # reads stay open

        page.goto(live.url + "/")
        approve = page.get_by_role("button", name="Approve")
        expect(page.locator("#summary .badge").first).to_have_text("awaiting approval")
        expect(approve).to_be_disabled()
        expect(page.locator("#hint")).to_contain_text("needs an operator token")

        page.get_by_label("Operator token").fill("wrong")
        expect(approve).to_be_enabled()
        approve.click()
        expect(page.locator("#msg")).to_contain_text("operator token is wrong")
        expect(page.locator("#msg")).to_contain_text("HTTP 401")
        time.sleep(0.3)
        assert (live.status()["phase"], live.status()["step"]) == ("awaiting_approval", 1)

        page.get_by_label("Operator token").fill("s3cret-token")
        page.reload()  # the token is kept in the browser
        expect(page.get_by_label("Operator token")).to_have_value("s3cret-token")
        expect(approve).to_be_enabled()
        approve.click()

        expect(page.locator("#msg")).to_contain_text("approve: done")
        live.wait_for("step 2", lambda s: s["step"] == 2)
        expect(page.locator("#step")).to_have_text("2/3")
