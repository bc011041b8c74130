"""The Pub/Sub member: a subscriber under the coordinator's control, with an exact canary share.

Pub/Sub has no partitions, and a subscriber cannot decline a message without a nack (which
counts as a delivery attempt and ends in the dead-letter topic). So the split is by bucket
(:mod:`pubsub_canary.client.routing`) and the canary's messages travel a route of their own
(``docs/pubsub.md`` has the design and what it guarantees):

* stable members stream the user's subscription; a message of a bucket routed to the canary
  is republished to the rollout's canary topic and acked only after that publish succeeded;
* canary members pull the canary subscription (created by the library with the main
  subscription's dead-letter policy and ordering setting);
* on rollback canary members stop pulling and hand back what they hold through the return
  topic; stable members drain the canary subscription and process the rest. On an ordered
  subscription stable holds new messages of returning buckets until the route is drained.

Canary-route subscriptions are read with unary pull, not streaming pull: a stopped or killed
puller strands nothing (its leased messages come back after the 10 s ack deadline), which the
emulator's streaming pull does not guarantee. The user's subscription is read with the
library's streaming pull, as a plain subscriber would.

Like the Kafka member, it processes nothing without a valid lease (I1), and every message is
processed or dead-lettered with its reason before it is acked (I2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pubsub_canary.client.member import Handler, Member
from pubsub_canary.client.processing import (
    MetricsAccumulator,
    Outcome,
    Record,
    RetryPolicy,
    run_handler,
)
from pubsub_canary.client.routing import (
    ATTR_BUCKET,
    ATTR_DEAD_LETTER_SOURCE,
    ATTR_ERROR,
    ATTR_GENERATION,
    ATTR_MESSAGE_ID,
    ATTR_ORDERING_KEY,
    ATTR_PREFIX,
    ATTR_PUBLISH_MS,
    ATTR_RELAYED_BY,
    DEFAULT_BUCKETS,
    POSITION_AGE_MS,
    Action,
    Counter,
    Route,
    Source,
    bucket_of,
    canary_pulls,
    canary_releases,
    counter_key,
    dead_letter_cohort,
    decide,
    observer_id,
    route_names,
    routing_key,
    stable_pulls_canary,
)
from pubsub_canary.client.session import MemberSession
from pubsub_canary.client.transport import CoordinatorTransport
from pubsub_canary.errors import BrokerError, CanaryError, ConfigError

log = logging.getLogger("pubsub_canary.member.pubsub")

#: Ack deadline of the canary-route subscriptions: a dead puller's messages come back this soon.
ROUTE_ACK_DEADLINE = 10
#: KPI every member reports: seconds from the original publish to the end of processing.
DELIVERY_KPI = "delivery_seconds"


def _import_pubsub() -> Any:
    try:
        from google.cloud import pubsub_v1
    except ImportError as exc:
        raise ConfigError(
            f"google-cloud-pubsub is not installed ({exc}); install pubsub-canary[pubsub]"
        ) from exc
    return pubsub_v1


class _Metrics(MetricsAccumulator):
    def add_policy_dead_letter(self) -> None:
        """A message the subscription's dead-letter policy forwarded (never processed)."""
        with self._lock:
            self.processed += 1
            self.errors += 1
            self.dead_lettered += 1


class _RouteCapture:
    """The coordinator transport, keeping the ``route`` of each heartbeat answer.

    :class:`MemberSession` keeps only the member's own units; a Pub/Sub member also needs the
    group-wide route that the coordinator sends with them.
    """

    def __init__(self, inner: CoordinatorTransport) -> None:
        self.inner = inner
        self.route: dict[str, Any] | None = None

    def register(self, **request: Any) -> dict[str, Any]:
        return self.inner.register(**request)

    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]:
        resp = self.inner.heartbeat(member_id, request)
        if resp.get("route") is not None:
            self.route = resp["route"]
        return resp

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        self.inner.release(member_id, released)

    def leave(self, member_id: str) -> None:
        self.inner.leave(member_id)

    def close(self) -> None:
        self.inner.close()


@dataclass(eq=False)
class _Msg:
    """A message from any of the subscriptions a member reads, with its original identity."""

    source: Source
    subscription: str
    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    message_id: str  # the id it was first published with
    publish_ms: int  # when it was first published
    delivery_attempt: int
    bucket: int
    generation: str | None  # the canary route it travelled (None: the user's subscription)
    ack: Callable[[], None]
    done: Callable[[], None] = lambda: None
    began: float = field(default=0.0)


class PubSubMember(Member):
    """A member of a Pub/Sub subscription's stable or canary cohort.

    Args:
        handler: called once per message with a :class:`Record` (``partition`` is the bucket,
            ``offset`` -1, ``key`` the ordering key, ``headers`` the attributes plus
            ``pubsub.message_id``, ``pubsub.ordering_key``, ``pubsub.delivery_attempt``);
            raise to fail it.
        coordinator: the coordinator's URL, or a transport.
        subscription: the user's subscription, ``projects/P/subscriptions/S`` or ``S`` (with
            ``project``, ``PUBSUB_PROJECT_ID`` or ``GOOGLE_CLOUD_PROJECT``).
        cohort: ``stable`` or ``canary``; version: this program's version.
        routing_attribute: route messages without an ordering key by this attribute (for
            example ``user_id``); else by message id.
        buckets: how many buckets the routing key is hashed into (the same in every member).
        dead_letter_topic: where messages the handler fails go (default: the topic of the
            subscription's dead-letter policy).
        retry: how often to retry a failing handler before dead-lettering.
        max_outstanding: flow control of the streaming pull (messages).
        pull_batch / lanes: canary-route pulls: messages per pull, and parallel lanes (a
            key's messages always go through one lane, in order).
        drain_timeout_seconds: the longest a rollback waits for the canary route to drain
            before it goes on without the ordering barrier (logged).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        coordinator: str | CoordinatorTransport,
        subscription: str,
        cohort: str,
        version: str,
        project: str | None = None,
        routing_attribute: str | None = None,
        buckets: int = DEFAULT_BUCKETS,
        dead_letter_topic: str | None = None,
        retry: RetryPolicy | None = None,
        member_id: str | None = None,
        max_outstanding: int = 1000,
        pull_batch: int = 100,
        lanes: int = 4,
        pull_timeout_seconds: float = 2.0,
        drain_timeout_seconds: float = 30.0,
        long_poll_seconds: float = 1.0,
        publisher_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            handler,
            coordinator=coordinator,
            cohort=cohort,
            version=version,
            retry=retry,
            member_id=member_id,
            long_poll_seconds=long_poll_seconds,
            metrics=_Metrics(),
        )
        self.metrics: _Metrics
        if buckets < 1:
            raise ConfigError(f"buckets must be >= 1, got {buckets}", field="buckets")
        if lanes < 1 or pull_batch < 1:
            raise ConfigError("lanes and pull_batch must be >= 1", field="lanes")
        self.routing_attribute = routing_attribute
        self.buckets = buckets
        self.max_outstanding = max_outstanding
        self.pull_batch = pull_batch
        self.pull_timeout = pull_timeout_seconds
        self.drain_timeout = drain_timeout_seconds
        self._subscription_arg = subscription
        self._project_arg = project
        self._dead_letter_arg = dead_letter_topic
        self._lanes_n = lanes
        self._publisher_options = publisher_options or {}
        self._inner = self._transport
        self._transport = _RouteCapture(self._inner)
        #: Set by :meth:`_open` from the subscription.
        self.project = ""
        self.subscription_id = ""
        self.subscription_path = ""
        self.topic_id = ""
        self.ordered = False
        self._dead_letter_policy: dict[str, Any] | None = None
        self._retry_policy: Any = None
        self._dlq_topic = ""
        self._pubsub: Any = None
        self._publisher: Any = None
        self._subscriber: Any = None
        self._streaming: Any = None
        # route state
        self._cond = threading.Condition()
        self._raw_route: dict[str, Any] | None = None
        self._route: Route | None = None
        self._ready: set[str] = set()
        self._generations: deque[str] = deque(maxlen=3)
        self._pullers: dict[tuple[Source, str], _Puller] = {}
        self._observer: _Puller | None = None
        self._lanes: _Lanes | None = None
        self._keeper: _AckKeeper | None = None
        self._released: set[tuple[int, int]] = set()
        self._revoke_seen: dict[tuple[int, int], float] = {}
        # counts and measurements
        self._count_lock = threading.Lock()
        self._counts: dict[tuple[str, Counter], int] = {}
        self._inflight: dict[int, int] = {}  # id(msg) -> publish ms
        self._window_wait_ms = 0
        self._seen_dead: OrderedDict[str, None] = OrderedDict()
        self._last_report = 0.0
        self._last_flush = 0.0
        self._flushed_counts: dict[int, int] = {}
        self._last_positions: dict[int, int] = {}
        self._seen_generation = -1
        self.order_risks = 0
        self.policy_dead_letters = 0
        self._leaving = False
        self._closing = threading.Event()

    # --- public -------------------------------------------------------------------------------

    @property
    def route(self) -> Route | None:
        return self._route

    def counts(self) -> dict[str, int]:
        """Route counters summed over generations, and other tallies (for tests and demos)."""
        with self._count_lock:
            out = {c.value: 0 for c in Counter if c is not Counter.PULLING}
            for (_, c), n in self._counts.items():
                if c is not Counter.PULLING:
                    out[c.value] += n
        out["order_risks"] = self.order_risks
        out["policy_dead_letters"] = self.policy_dead_letters
        return out

    # --- setup --------------------------------------------------------------------------------

    def _open(self) -> None:
        self._pubsub = pubsub_v1 = _import_pubsub()
        from google.api_core import exceptions as gexc

        sub = self._subscription_arg
        if sub.startswith("projects/"):
            parts = sub.split("/")
            if len(parts) != 4 or parts[2] != "subscriptions":
                raise ConfigError(
                    f"subscription {sub!r} is not projects/PROJECT/subscriptions/ID or an id",
                    field="subscription",
                )
            self.project, self.subscription_id = parts[1], parts[3]
        else:
            self.subscription_id = sub
            self.project = (
                self._project_arg
                or os.environ.get("PUBSUB_PROJECT_ID")
                or os.environ.get("GOOGLE_CLOUD_PROJECT")
                or ""
            )
            if not self.project:
                raise ConfigError(
                    f"subscription {sub!r} has no project: pass a full path, project=..., or "
                    "set PUBSUB_PROJECT_ID",
                    field="project",
                )
        self.subscription_path = f"projects/{self.project}/subscriptions/{self.subscription_id}"
        self._subscriber = pubsub_v1.SubscriberClient()
        try:
            info = self._subscriber.get_subscription(subscription=self.subscription_path)
        except gexc.NotFound:
            raise ConfigError(
                f"subscription {self.subscription_path} does not exist; create it first",
                field="subscription",
            ) from None
        except gexc.GoogleAPICallError as exc:
            raise BrokerError(f"cannot reach Pub/Sub: {exc}") from None
        self.topic_id = info.topic.rsplit("/", 1)[-1]
        self.ordered = bool(info.enable_message_ordering)
        if info.dead_letter_policy and info.dead_letter_policy.dead_letter_topic:
            self._dead_letter_policy = {
                "dead_letter_topic": info.dead_letter_policy.dead_letter_topic,
                "max_delivery_attempts": info.dead_letter_policy.max_delivery_attempts or 5,
            }
        if info.retry_policy and (
            info.retry_policy.minimum_backoff or info.retry_policy.maximum_backoff
        ):
            self._retry_policy = info.retry_policy
        dlq = self._dead_letter_arg or (
            self._dead_letter_policy["dead_letter_topic"] if self._dead_letter_policy else None
        )
        if not dlq:
            raise ConfigError(
                f"subscription {self.subscription_path} has no dead-letter policy: pass "
                "dead_letter_topic for the messages the handler fails",
                field="dead_letter_topic",
            )
        self._dlq_topic = dlq if dlq.startswith("projects/") else self._topic_path(dlq)
        options = pubsub_v1.types.PublisherOptions(enable_message_ordering=self.ordered)
        self._publisher = pubsub_v1.PublisherClient(
            publisher_options=options, **self._publisher_options
        )
        self._keeper = _AckKeeper(self)
        self._lanes = _Lanes(self, self._lanes_n)
        if self._dead_letter_policy is not None:
            self._open_observer()
        self.session = MemberSession(
            self._transport,
            transport_kind="pubsub",
            topic=self.topic_id,
            group_id=self.subscription_id,
            units=self.buckets,
            cohort=self.cohort,
            version=self.version,
            member_id=self._member_id,
            long_poll_seconds=self._long_poll,
            meta={"subscription": self.subscription_path, "ordered": self.ordered},
        )
        self.session.start()
        if self.cohort == "stable":
            flow = pubsub_v1.types.FlowControl(
                max_messages=self.max_outstanding,
                max_duration_per_lease_extension=ROUTE_ACK_DEADLINE,
                max_lease_duration=600,
            )
            self._streaming = self._subscriber.subscribe(
                self.subscription_path,
                callback=self._on_main,
                flow_control=flow,
                await_callbacks_on_shutdown=True,
            )

    def _topic_path(self, topic_id: str) -> str:
        return f"projects/{self.project}/topics/{topic_id}"

    def _sub_path(self, sub_id: str) -> str:
        return f"projects/{self.project}/subscriptions/{sub_id}"

    def _ensure_subscription(self, sub_id: str, topic: str, *, route: bool) -> str:
        from google.api_core import exceptions as gexc

        path = self._sub_path(sub_id)
        request: dict[str, Any] = {
            "name": path,
            "topic": topic,
            "ack_deadline_seconds": ROUTE_ACK_DEADLINE,
        }
        if route:
            request["enable_message_ordering"] = self.ordered
            if self._dead_letter_policy is not None:
                request["dead_letter_policy"] = self._dead_letter_policy
            if self._retry_policy is not None:
                request["retry_policy"] = self._retry_policy
        with contextlib.suppress(gexc.AlreadyExists):
            self._subscriber.create_subscription(request=request)
        return path

    def _ensure_generation(self, generation: str) -> None:
        """Create the generation's canary and return topics and subscriptions (idempotent).

        The subscriptions exist before anything is published to their topics, so nothing
        relayed is dropped.
        """
        from google.api_core import exceptions as gexc

        names = route_names(self.subscription_id, generation)
        for name in (names.canary, names.back):
            with contextlib.suppress(gexc.AlreadyExists):
                self._publisher.create_topic(name=self._topic_path(name))
            self._ensure_subscription(name, self._topic_path(name), route=True)
        log.info("canary route of %s ready: %s, %s", generation, names.canary, names.back)

    def _open_observer(self) -> None:
        """Count, for this cohort, the messages the subscription's dead-letter policy forwarded."""
        assert self._dead_letter_policy is not None
        sub_id = observer_id(self.subscription_id, self.cohort)
        path = self._ensure_subscription(
            sub_id, self._dead_letter_policy["dead_letter_topic"], route=False
        )
        self._observer = _Puller(self, None, "", path, on_batch=self._on_dead_letters)
        self._observer.active = True

    # --- the main loop ------------------------------------------------------------------------

    def _step(self) -> None:
        s = self.session
        assert s is not None
        self._sync()
        now = time.monotonic()
        if now - self._last_report >= 0.2:
            self._report()
            self._flush_heartbeat(now)
        s.changed.wait(0.05)
        s.changed.clear()

    def _sync(self) -> None:
        """Apply the coordinator's view: the route, the pullers it implies, releases."""
        s = self.session
        assert s is not None
        raw = self._transport.route
        if raw is not self._raw_route and raw is not None and s.lease_valid():
            self._raw_route = raw
            route = Route.from_view(raw)
            if route.generation is not None and route.generation not in self._ready:
                try:
                    self._ensure_generation(route.generation)
                except Exception as exc:  # the next step retries; nothing is routed meanwhile
                    log.warning("cannot create the canary route of %s: %s", route.generation, exc)
                    self._raw_route = None
                    return
                self._ready.add(route.generation)
                if route.generation not in self._generations:
                    self._generations.append(route.generation)
            with self._cond:
                self._route = route
                self._cond.notify_all()
        elif raw is None and self._route is None and s.lease_valid():
            return  # no view yet
        self._update_pullers()
        self._release_revoked()

    def _update_pullers(self) -> None:
        route = self._route
        if route is None:
            return
        leaving = self._leaving or self._closing.is_set()
        wanted: dict[tuple[Source, str], bool] = {}
        for gen in self._generations:
            current = gen == route.generation
            if self.cohort == "canary":
                wanted[(Source.CANARY, gen)] = current and canary_pulls(route) and not leaving
            else:
                wanted[(Source.RETURN, gen)] = not leaving
                drains = (
                    stable_pulls_canary(route, ordered=self.ordered)
                    if current
                    else not route.canary
                )
                wanted[(Source.CANARY, gen)] = drains and not leaving
        for key in self._pullers:
            wanted.setdefault(key, False)
        for key, active in wanted.items():
            puller = self._pullers.get(key)
            if puller is None and active:
                source, gen = key
                names = route_names(self.subscription_id, gen)
                sub_id = names.canary if source is Source.CANARY else names.back
                puller = self._pullers[key] = _Puller(self, source, gen, self._sub_path(sub_id))
                log.info("pulling %s", sub_id)
            if puller is not None and puller.active != active:
                puller.active = active
                puller.wake()

    def _release_revoked(self) -> None:
        s = self.session
        assert s is not None
        route = self._route
        now = time.monotonic()
        out: list[tuple[int, int, int | None]] = []
        view = s.view()
        for u, g in view.items():
            if g.status != "revoking" or (u, g.epoch) in self._released:
                continue
            waits = route is not None and not canary_releases(route.state(u), route)
            if self.cohort == "canary" and waits:
                first = self._revoke_seen.setdefault((u, g.epoch), now)
                if now - first < self.drain_timeout:
                    continue
                log.warning("bucket %s: canary route not drained in time; releasing", u)
            out.append((u, g.epoch, None))
        if out and s.lease_valid():
            try:
                s.release(out)
            except CanaryError as exc:
                log.warning("release not acknowledged (%s); the lease will expire", exc.message)
                return
            self._released.update((u, e) for u, e, _ in out)
            if len(self._released) > 50_000:
                self._released = {(u, g.epoch) for u, g in view.items()}

    def _report(self) -> None:
        assert self.session is not None
        self._last_report = time.monotonic()
        now_ms = int(time.time() * 1000)
        with self._count_lock:
            oldest = min(self._inflight.values(), default=None)
            age = max(now_ms - oldest if oldest is not None else 0, self._window_wait_ms)
            self._window_wait_ms = 0
            positions = {POSITION_AGE_MS: max(0, age)}
            for (gen, c), n in self._counts.items():
                positions[counter_key(gen, c)] = n
        for (source, gen), p in self._pullers.items():
            if source is Source.CANARY and self.cohort == "canary":
                positions[counter_key(gen, Counter.PULLING)] = int(p.busy)
        self.session.report(self.metrics.drain(), positions)
        self._last_positions = positions

    def _flush_heartbeat(self, now: float) -> None:
        """While a drain is on, send route counts at once rather than at the next long-poll."""
        route = self._route
        positions = self._last_positions
        draining = route is not None and (
            bool(route.returning) or (not route.canary and not route.drained)
        )
        if not draining or positions == self._flushed_counts:
            return
        if now - self._last_flush < 0.2:
            return
        self._last_flush = now
        self._flushed_counts = dict(positions)
        assert self.session is not None
        with contextlib.suppress(CanaryError):
            self.session.heartbeat_once(wait=0.0)

    # --- messages -----------------------------------------------------------------------------

    def _on_main(self, message: Any) -> None:
        """Streaming-pull callback. Never raises: the library would nack the message."""
        try:
            attrs = dict(message.attributes)
            key = routing_key(
                message.message_id, message.ordering_key, attrs, self.routing_attribute
            )
            msg = _Msg(
                Source.MAIN,
                self.subscription_path,
                message.data,
                attrs,
                message.ordering_key or "",
                message.message_id,
                int(message.publish_time.timestamp() * 1000),
                int(message.delivery_attempt or 0),
                bucket_of(key, self.buckets),
                None,
                message.ack,
            )
            if not self._handle(msg, wait_publish=False):
                self._retry_later(msg)
        except Exception:
            log.exception("message %s: unexpected error; left for redelivery", message.message_id)

    def _retry_later(self, msg: _Msg) -> None:
        """A streamed message that hit a Pub/Sub error: not acked, tried again shortly."""
        if self._closing.is_set():
            return
        timer = threading.Timer(0.5, self._retry_main, (msg,))
        timer.daemon = True
        timer.start()

    def _wrap_pulled(self, received: Any, puller: _Puller) -> _Msg:
        m = received.message
        attrs = dict(m.attributes)
        ordering_key = m.ordering_key or attrs.get(ATTR_ORDERING_KEY, "")
        message_id = attrs.get(ATTR_MESSAGE_ID) or m.message_id
        if ATTR_BUCKET in attrs:
            bucket = int(attrs[ATTR_BUCKET]) % self.buckets
        else:  # published to the route by someone else: route it as a fresh message
            bucket = bucket_of(
                routing_key(message_id, ordering_key, attrs, self.routing_attribute), self.buckets
            )
        publish_ms = int(attrs.get(ATTR_PUBLISH_MS) or m.publish_time.timestamp() * 1000)
        ack_id = received.ack_id
        keeper = self._keeper
        assert keeper is not None and puller.source is not None
        keeper.hold(puller.path, ack_id)
        return _Msg(
            puller.source,
            puller.path,
            m.data,
            attrs,
            ordering_key,
            message_id,
            publish_ms,
            int(received.delivery_attempt or 0),
            bucket,
            attrs.get(ATTR_GENERATION) or puller.generation,
            lambda: keeper.ack(puller.path, ack_id),
            puller.finished,
        )

    def _admit(self) -> Route | None:
        """Wait until this member may act on a message; None when it is shutting down.

        It acts only with a valid lease that is not about to end (I1), a route from the
        coordinator, and that route's topics in place.
        """
        s = self.session
        assert s is not None
        while not self._closing.is_set():
            route = self._route
            if (
                route is not None
                and s.lease_valid()
                and not s.lease_ending()
                and (route.generation is None or route.generation in self._ready)
            ):
                return route
            with self._cond:
                self._cond.wait(0.1)
        return None

    def _handle(self, msg: _Msg, *, wait_publish: bool) -> bool:
        """Process, relay or hold ``msg``. False: a Pub/Sub error, try again (not acked).

        True: settled, or settling (an asynchronous publish), or given up at shutdown (not
        acked: it comes back after its ack deadline).
        """
        msg.began = time.time()
        with self._count_lock:
            self._inflight[id(msg)] = msg.publish_ms
            self._window_wait_ms = max(self._window_wait_ms, int(msg.began * 1000) - msg.publish_ms)
        pending = False
        try:
            held_since: float | None = None
            while True:
                route = self._admit()
                if route is None:
                    return True  # not acked: it comes back after its ack deadline
                action = decide(
                    self.cohort,
                    msg.source,
                    route.state(msg.bucket),
                    ordered=self.ordered,
                    drained=route.drained,
                )
                if action is not Action.HOLD:
                    break
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since >= self.drain_timeout:
                    log.warning("bucket %s: hold timed out; processing out of barrier", msg.bucket)
                    self.order_risks += 1
                    action = Action.PROCESS
                    break
                with self._cond:
                    self._cond.wait(0.1)
            if action is Action.PROCESS:
                self._process(msg)
            elif action is Action.RELAY_CANARY:
                assert route.generation is not None
                pending = self._relay(msg, route.generation, Source.CANARY, wait=wait_publish)
            else:
                pending = self._relay(
                    msg, msg.generation or route.generation or "", Source.RETURN, wait=True
                )
            return True
        except BrokerError as exc:
            log.warning("%s; trying again", exc.message)
            return False
        except Exception:
            log.exception("message %s: unexpected error; left for redelivery", msg.message_id)
            return True
        finally:
            if not pending:
                self._end(msg)

    def _end(self, msg: _Msg) -> None:
        with self._count_lock:
            self._inflight.pop(id(msg), None)

    def _count(self, generation: str | None, counter: Counter) -> None:
        if generation:
            with self._count_lock:
                k = (generation, counter)
                self._counts[k] = self._counts.get(k, 0) + 1

    def _settle(self, msg: _Msg) -> None:
        msg.ack()
        if msg.source is Source.CANARY:
            self._count(msg.generation, Counter.SETTLED_CANARY)
        elif msg.source is Source.RETURN:
            self._count(msg.generation, Counter.SETTLED_RETURN)

    def _record(self, msg: _Msg) -> Record:
        headers = {
            k: v.encode() for k, v in msg.attributes.items() if not k.startswith(ATTR_PREFIX)
        }
        headers["pubsub.message_id"] = msg.message_id.encode()
        headers["pubsub.ordering_key"] = msg.ordering_key.encode()
        headers["pubsub.delivery_attempt"] = str(msg.delivery_attempt).encode()
        headers["pubsub.source"] = msg.source.value.encode()
        return Record(
            self.topic_id,
            msg.bucket,
            -1,
            msg.ordering_key.encode() or None,
            msg.data,
            headers,
            msg.publish_ms / 1000.0,
        )

    def _process(self, msg: _Msg) -> None:
        record = self._record(msg)
        outcome = run_handler(self.handler, record, self.retry)
        dead = False
        if not outcome.ok:
            self._dead_letter(msg, outcome)  # raises if not written: then not acked
            dead = True
        self.metrics.add(outcome, dead)
        if msg.delivery_attempt > 1:
            self.metrics.add_redelivery()
        self.metrics.kpi(DELIVERY_KPI, max(0.0, time.time() - msg.publish_ms / 1000.0))
        if self.on_processed is not None:
            self.on_processed(record, outcome, dead)
        self._settle(msg)

    def _dead_letter(self, msg: _Msg, outcome: Outcome) -> None:
        attrs = dict(msg.attributes)
        attrs.update(
            {
                ATTR_MESSAGE_ID: msg.message_id,
                ATTR_PUBLISH_MS: str(msg.publish_ms),
                ATTR_BUCKET: str(msg.bucket),
                ATTR_ERROR: (outcome.error or "")[:1000],
                "pubsub_canary.cohort": self.cohort,
                "pubsub_canary.version": self.version,
                "pubsub_canary.attempts": str(outcome.attempts),
                "pubsub_canary.subscription": self.subscription_id,
            }
        )
        if msg.ordering_key:
            attrs[ATTR_ORDERING_KEY] = msg.ordering_key
        try:
            self._publisher.publish(self._dlq_topic, msg.data, **attrs).result(timeout=30)
        except Exception as exc:
            raise BrokerError(f"dead letter of {msg.message_id} not written: {exc}") from None

    def _relay(self, msg: _Msg, generation: str, to: Source, *, wait: bool) -> bool:
        """Republish to the generation's canary or return topic; ack after it is written.

        Returns whether the ack is still pending (an asynchronous publish).
        """
        names = route_names(self.subscription_id, generation)
        topic = self._topic_path(names.canary if to is Source.CANARY else names.back)
        attrs = dict(msg.attributes)
        attrs.update(
            {
                ATTR_BUCKET: str(msg.bucket),
                ATTR_MESSAGE_ID: msg.message_id,
                ATTR_PUBLISH_MS: str(msg.publish_ms),
                ATTR_GENERATION: generation,
                ATTR_RELAYED_BY: self.member_id or "",
            }
        )
        kwargs: dict[str, Any] = {}
        if msg.ordering_key:
            if self.ordered:
                kwargs["ordering_key"] = msg.ordering_key
            else:
                attrs[ATTR_ORDERING_KEY] = msg.ordering_key
        counter = Counter.RELAYED_CANARY if to is Source.CANARY else Counter.RELAYED_RETURN

        def written() -> None:
            self._count(generation, counter)
            self._settle(msg)

        future = self._publisher.publish(topic, msg.data, **kwargs, **attrs)
        if wait:
            try:
                future.result(timeout=60)
            except Exception as exc:
                self._publish_failed(topic, msg, exc)
                raise BrokerError(f"relay of {msg.message_id} failed: {exc}") from None
            written()
            return False

        def done(f: Any) -> None:
            try:
                f.result()
            except Exception as exc:
                self._publish_failed(topic, msg, exc)
                self._end(msg)
                self._retry_later(msg)  # not acked; again with whatever the route says then
                return
            try:
                written()
            finally:
                self._end(msg)

        future.add_done_callback(done)
        return True

    def _publish_failed(self, topic: str, msg: _Msg, exc: BaseException) -> None:
        log.warning("publish of %s to %s failed: %s", msg.message_id, topic, exc)
        if self.ordered and msg.ordering_key:
            with contextlib.suppress(Exception):
                self._publisher.resume_publish(topic, msg.ordering_key)

    def _retry_main(self, msg: _Msg) -> None:
        try:
            if not self._handle(msg, wait_publish=False):
                self._retry_later(msg)
        except Exception:
            log.exception("retry of %s failed", msg.message_id)

    def _on_dead_letters(self, puller: _Puller, received: list[Any]) -> None:
        keeper = self._keeper
        assert keeper is not None
        for r in received:
            attrs = r.message.attributes
            source = attrs.get(ATTR_DEAD_LETTER_SOURCE, "")
            mine = dead_letter_cohort(source, self.subscription_id) == self.cohort
            if mine and ATTR_ERROR not in attrs and r.message.message_id not in self._seen_dead:
                self._seen_dead[r.message.message_id] = None
                if len(self._seen_dead) > 10_000:
                    self._seen_dead.popitem(last=False)
                self.metrics.add_policy_dead_letter()
                self.policy_dead_letters += 1
                log.warning(
                    "message %s was dead-lettered by the subscription's policy (from %s)",
                    attrs.get(ATTR_MESSAGE_ID, r.message.message_id),
                    source,
                )
            keeper.ack(puller.path, r.ack_id)

    # --- shutdown -----------------------------------------------------------------------------

    def _route_busy(self) -> bool:
        """A canary-route puller is pulling or holds messages it pulled."""
        return any(p.busy for p in self._pullers.values())

    def _shutdown(self, timeout: float) -> None:
        """Graceful: ask for no more work, hand back what is held, release every unit."""
        s = self.session
        assert s is not None
        try:
            s.leave()
        except CanaryError as exc:
            log.warning("leave failed (%s); exiting", exc.message)
        self._leaving = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and s.lease_valid():
            self._sync()
            self._report()
            self._flush_heartbeat(time.monotonic())
            if not s.view() and not self._route_busy():
                break
            s.changed.wait(0.05)
            s.changed.clear()
        # Callbacks still waiting at the gate give up now (unacked: redelivered), so that
        # cancelling the stream, which waits for running callbacks, returns.
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._streaming is not None:
            self._streaming.cancel()
            with contextlib.suppress(Exception):
                self._streaming.result(timeout=timeout)
            self._streaming = None
        self._report()
        with contextlib.suppress(CanaryError):
            s.heartbeat_once()  # deliver the last metric deltas

    def _close(self) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._streaming is not None:
            self._streaming.cancel()
            with contextlib.suppress(Exception):
                self._streaming.result(timeout=10)
        for p in [*self._pullers.values(), *([self._observer] if self._observer else [])]:
            p.stop()
        if self._lanes is not None:
            self._lanes.stop()
        if self._keeper is not None:
            self._keeper.stop()
        if self.session is not None:
            self.session.stop()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.stop()
        if self._subscriber is not None:
            with contextlib.suppress(Exception):
                self._subscriber.close()


class _Puller:
    """A unary-pull loop on one subscription (canary route or dead-letter observer)."""

    def __init__(
        self,
        member: PubSubMember,
        source: Source | None,
        generation: str,
        path: str,
        *,
        on_batch: Callable[[_Puller, list[Any]], None] | None = None,
    ) -> None:
        self.member = member
        self.source = source
        self.generation = generation
        self.path = path
        self.active = False
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._pending = 0  # messages handed to lanes, not finished
        self._inflight = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pull-{path}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Pulling, or holding messages it pulled."""
        with self._lock:
            return self.active or self._inflight or self._pending > 0

    def wake(self) -> None:
        self._wake.set()

    def finished(self) -> None:
        with self._lock:
            self._pending -= 1

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _may_pull(self) -> bool:
        m = self.member
        s = m.session
        with self._lock:
            # Hold little beyond what the lanes work on: what a slow canary holds is what it
            # must hand back on a rollback; the rest waits on the subscription for anyone.
            full = self._pending > m.pull_batch // 2
        return (
            self.active
            and not full
            and not m._closing.is_set()
            and s is not None
            and s.lease_valid()
            and not s.lease_ending()
        )

    def _run(self) -> None:
        from google.api_core import exceptions as gexc

        m = self.member
        backoff = 0.1
        while not self._stop.is_set():
            go = self._may_pull()
            with self._lock:
                self._inflight = go
            if not go:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            received: list[Any] = []
            began = time.monotonic()
            try:
                resp = m._subscriber.pull(
                    request={"subscription": self.path, "max_messages": m.pull_batch},
                    timeout=m.pull_timeout,
                )
                received = list(resp.received_messages)
                backoff = 0.1
                if not received and time.monotonic() - began < 0.2:
                    # An empty answer at once (the emulator waits only under a deadline
                    # over 1 s): do not spin.
                    self._stop.wait(0.1)
            except gexc.DeadlineExceeded:
                pass
            except Exception as exc:
                log.warning("pull from %s failed: %s", self.path, exc)
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
            try:
                if self._on_batch is not None:
                    self._on_batch(self, received)
                else:
                    lanes = m._lanes
                    assert lanes is not None
                    for r in received:
                        msg = m._wrap_pulled(r, self)
                        with self._lock:
                            self._pending += 1
                        lanes.put(msg)
            finally:
                with self._lock:
                    self._inflight = False


class _Lanes:
    """Worker threads for pulled messages; a key's messages always take the same lane."""

    def __init__(self, member: PubSubMember, n: int) -> None:
        self.member = member
        self._queues: list[queue.SimpleQueue[_Msg | None]] = [queue.SimpleQueue() for _ in range(n)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"lane-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def put(self, msg: _Msg) -> None:
        key = msg.ordering_key or msg.message_id
        self._queues[zlib.crc32(key.encode()) % len(self._queues)].put(msg)

    def _run(self, q: queue.SimpleQueue[_Msg | None]) -> None:
        while True:
            msg = q.get()
            if msg is None:
                return
            backoff = 0.2
            # Retried in place on a Pub/Sub error, so the key's later messages wait (order).
            while not self.member._handle(msg, wait_publish=True):
                if self.member._closing.wait(backoff):
                    break
                backoff = min(2.0, backoff * 2)
            msg.done()

    def stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=5)


class _AckKeeper:
    """Acks pulled messages in batches and extends the deadlines of those still held."""

    def __init__(self, member: PubSubMember) -> None:
        self.member = member
        self._lock = threading.Lock()
        self._acks: dict[str, list[str]] = {}
        self._held: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-keeper", daemon=True)
        self._thread.start()

    def hold(self, path: str, ack_id: str) -> None:
        with self._lock:
            self._held.setdefault(path, {})[ack_id] = time.monotonic()

    def ack(self, path: str, ack_id: str) -> None:
        with self._lock:
            self._held.get(path, {}).pop(ack_id, None)
            self._acks.setdefault(path, []).append(ack_id)

    def _flush(self) -> None:
        with self._lock:
            acks, self._acks = self._acks, {}
        for path, ids in acks.items():
            for i in range(0, len(ids), 1000):
                try:
                    self.member._subscriber.acknowledge(
                        request={"subscription": path, "ack_ids": ids[i : i + 1000]}
                    )
                except Exception as exc:  # they come back after the deadline: duplicates
                    log.warning("ack on %s failed (%s); %d may be redelivered", path, exc, len(ids))

    def _extend(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = {
                p: [a for a, since in ids.items() if now - since >= ROUTE_ACK_DEADLINE / 3]
                for p, ids in self._held.items()
            }
        for path, ids in due.items():
            for i in range(0, len(ids), 1000):
                with contextlib.suppress(Exception):
                    self.member._subscriber.modify_ack_deadline(
                        request={
                            "subscription": path,
                            "ack_ids": ids[i : i + 1000],
                            "ack_deadline_seconds": ROUTE_ACK_DEADLINE,
                        }
                    )
            with self._lock:
                held = self._held.get(path, {})
                for a in ids:
                    if a in held:
                        held[a] = now

    def _run(self) -> None:
        last_extend = time.monotonic()
        while not self._stop.wait(0.02):
            self._flush()
            if time.monotonic() - last_extend >= 1.0 and not self.member._closing.is_set():
                last_extend = time.monotonic()
                self._extend()
        self._flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
