"""How a member talks to the coordinator: the port, the HTTP adapter and an in-process twin.

The HTTP adapter retries connection failures and 5xx answers with tenacity (exponential
back-off, bounded by the caller's deadline) and turns error answers into the package's errors:
410 -> LeaseExpired, other 4xx -> the matching CanaryError, unreachable -> CoordinatorUnavailable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import httpx
from tenacity import (
    Retrying as _Retrying,
)
from tenacity import (
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from pubsub_canary import errors as E

if TYPE_CHECKING:
    from pubsub_canary.coordinator.service import Coordinator


class CoordinatorTransport(Protocol):
    def register(self, **request: Any) -> dict[str, Any]: ...
    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]: ...
    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None: ...
    def leave(self, member_id: str) -> None: ...
    def close(self) -> None: ...


_ERRORS: dict[str, type[E.CanaryError]] = {
    name: cls
    for name, cls in vars(E).items()
    if isinstance(cls, type) and issubclass(cls, E.CanaryError)
}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        message = str(body.get("message", resp.text))
        cls = _ERRORS.get(str(body.get("error")), E.TransportError)
    except ValueError:
        message, cls = resp.text[:200], E.TransportError
    if resp.status_code == 410:
        cls = E.LeaseExpired
    elif resp.status_code >= 500 and not cls.retriable:
        cls = E.CoordinatorUnavailable
    raise cls(message, status=resp.status_code)


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, E.CanaryError) and exc.retriable and not isinstance(exc, E.LeaseExpired)


class HttpTransport:
    """The coordinator over HTTP (httpx)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, retry_seconds: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout)
        self.retry_seconds = retry_seconds

    def _call(
        self, path: str, body: Any = None, *, timeout: float | None = None, retry: bool = True
    ) -> Any:
        def once() -> Any:
            try:
                resp = self._client.post(
                    path,
                    json=body,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.HTTPError as exc:
                raise E.CoordinatorUnavailable(
                    f"coordinator at {self.base_url} did not answer: {exc or type(exc).__name__}"
                ) from None
            _raise_for(resp)
            return resp.json()

        if not retry:
            return once()
        for attempt in _Retrying(
            stop=stop_after_delay(self.retry_seconds),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(_retriable),
            reraise=True,
        ):
            with attempt:
                return once()
        raise AssertionError("unreachable")  # pragma: no cover

    def register(self, **request: Any) -> dict[str, Any]:
        return dict(self._call("/v1/members", request))

    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]:
        # No retry here: the session's loop is the retry, and it must see failures to stop
        # processing when its lease runs out.
        wait = float(request.get("wait", 0.0))
        return dict(
            self._call(
                f"/v1/members/{member_id}/heartbeat", request, timeout=wait + 5.0, retry=False
            )
        )

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        self._call(f"/v1/members/{member_id}/release", {"released": released})

    def leave(self, member_id: str) -> None:
        self._call(f"/v1/members/{member_id}/leave", {})

    def close(self) -> None:
        self._client.close()


class MemoryTransport:
    """In-process twin: calls a :class:`Coordinator` directly (unit tests, embedded use)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def register(self, **request: Any) -> dict[str, Any]:
        return self.c.register(**request)

    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]:
        from pubsub_canary.wire import obs_from_dict

        metrics = request.get("metrics")
        return self.c.heartbeat(
            member_id,
            known=request.get("known"),
            wait=float(request.get("wait", 0.0)),
            metrics=obs_from_dict(metrics) if metrics else None,
            positions={int(k): int(v) for k, v in (request.get("positions") or {}).items()},
            released=[tuple(x) for x in request.get("released") or []],  # type: ignore[misc]
            warm=(
                {int(k): int(v) for k, v in request["warm"].items()}
                if request.get("warm") is not None
                else None
            ),
        )

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        self.c.release(member_id, released)

    def leave(self, member_id: str) -> None:
        self.c.leave(member_id)

    def close(self) -> None:
        pass
