"""The operator's client for the coordinator's API (used by the CLI and the demo)."""

from __future__ import annotations

from typing import Any

import httpx

from pubsub_canary.client.transport import _raise_for
from pubsub_canary.errors import CoordinatorUnavailable


class OperatorClient:
    def __init__(self, base_url: str, timeout: float = 15.0, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def _req(self, method: str, path: str, **kw: Any) -> Any:
        try:
            try:
                resp = self._client.request(method, path, **kw)
            except httpx.RemoteProtocolError:
                # The server closed an idle keep-alive connection as we reused it: the request
                # was not taken, so sending it once more is safe.
                resp = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise CoordinatorUnavailable(
                f"coordinator at {self.base_url} did not answer ({type(exc).__name__}); is it "
                "running? start it with 'pubsub-canary coordinator' or pass --coordinator URL"
            ) from None
        _raise_for(resp)
        return resp.json()

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._req("POST", "/v1/rollouts", json=spec))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/rollouts/{name}"))

    def list(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/rollouts"))

    def act(self, name: str, action: str, by: str = "operator") -> dict[str, Any]:
        return dict(self._req("POST", f"/v1/rollouts/{name}/{action}", params={"by": by}))

    def healthy(self) -> bool:
        try:
            return self._client.get("/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()
