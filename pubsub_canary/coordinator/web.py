"""The coordinator's status page: one static HTML file that polls the JSON API.

The page (``static/index.html``: vanilla JS, inline CSS, SVG charts, no build step and nothing
loaded from elsewhere) reads ``GET /v1/rollouts`` and ``GET /v1/rollouts/{name}`` every second
and calls the operator actions. It learns from ``GET /ui/config.json`` whether the operator
endpoints need a token; the token itself stays in the browser.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

_PAGE = files("pubsub_canary.coordinator").joinpath("static", "index.html")

#: The page loads nothing from elsewhere and must not be framed (its buttons steer rollouts).
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
}


def add_web_routes(app: FastAPI) -> None:
    """Serve the status page at ``/`` and its settings at ``/ui/config.json``."""
    page = _PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def status_page() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)

    @app.get("/ui/config.json", include_in_schema=False)
    def ui_config(request: Request) -> dict[str, Any]:
        return {
            "operator_token_required": bool(
                getattr(request.app.state, "operator_token_required", False)
            ),
        }
