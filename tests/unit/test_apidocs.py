"""The API docs of the service and the webhook receiver work air-gapped: /docs names no outside host, its
assets answer from the package, and `/` sends a person to /docs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from flywheel.apidocs import offline_docs_app
from flywheel.hmacsig import Secret
from flywheel.settings import load_settings
from flywheel.webhook import create_app


def assert_docs_offline(client: httpx.Client) -> None:
    """/docs and /redoc load only same-origin assets, and each of them answers 200."""
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200, (page, r.text[:200])
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text)
        external = [u for u in urls if re.match(r"(https?:)?//", u)]
        assert not external, f"{page} loads from outside hosts: {external}"
        assets = [u for u in urls if u.startswith("/static-offline-docs/")]
        assert assets, f"{page} references no packaged asset"
        for url in assets:
            a = client.get(url)
            assert a.status_code == 200 and len(a.content) > 100, url
    assert client.get("/openapi.json").status_code == 200
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (307, 308) and root.headers["location"] == "/docs"


def test_an_offline_docs_app_serves_swagger_ui_from_the_package() -> None:
    assert_docs_offline(TestClient(offline_docs_app(title="t")))


def test_the_webhook_receiver_docs_work_offline(home: Path) -> None:
    settings = load_settings("ci", home / "configs", environ={})
    app = create_app(settings, [Secret("current", "s" * 32)], "http://127.0.0.1:9/api", model_name="churn")
    assert_docs_offline(TestClient(app))
    assert "/static-offline-docs" not in str(app.openapi()["paths"])  # the assets are not API endpoints
