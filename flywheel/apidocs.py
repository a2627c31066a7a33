"""FastAPI apps whose API docs work air-gapped: Swagger UI and ReDoc served from the package, `/` → `/docs`.

FastAPI's own `/docs` loads Swagger UI from a CDN, a blank page without internet; `fastapi-offline` ships
the same assets inside the wheel and serves them under `/static-offline-docs`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline


def offline_docs_app(**kwargs: Any) -> FastAPI:
    """A FastAPI app (same keyword arguments) with offline /docs and /redoc, and `/` redirecting to /docs."""
    app = FastAPIOffline(**kwargs)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app
