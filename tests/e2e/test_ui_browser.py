"""The UIs as a person uses them: headless Debian chromium (driven by Playwright) on a `flywheel up` stack
with the MLflow UI, after one champion (`flywheel train`) and one sabotaged run of the training deployment,
started from its custom-run form (Shuffle Labels switched on, Submit), that its gates reject.

Checked: the Prefect UI lists the deployments with their schedules and named triggers; the training
deployment's custom-run form shows TrainingParams as typed fields; the rejected run is found by its
`outcome:rejected` tag and its artifacts tab shows the summary and the gate report naming the versions; the
MLflow UI's model page shows the versions with the champion alias and the rejected one's status tag; the
service's /docs renders with every request answered locally. Screenshots go to the test's tmp folder.

Chromium comes from `make browsers` (Debian's package; Playwright's own download needs the internet); the
test skips, saying why, only where it cannot be installed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PROJECT
from tests.e2e.stackproc import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")
TIMEOUT_MS = 45_000  # a busy 2-core machine renders the UIs slowly


def chromium_path() -> str:
    """Debian's chromium, installed by `make browsers` when missing; a skip naming why when it cannot be."""
    found = shutil.which("chromium")
    if not found:
        make = subprocess.run(["make", "-s", "browsers"], cwd=PROJECT, capture_output=True, text=True, timeout=900)
        found = shutil.which("chromium")
        if not found:
            pytest.skip(f"chromium is not installed and `make browsers` could not install it: "
                        f"{(make.stdout + make.stderr).strip()[-300:]}")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (`uv sync` installs the dev group)")
    return found


@pytest.fixture(scope="module")
def stack(local_stack: Stack) -> Stack:
    """The session's stack (tests/e2e/conftest.py) with champion v1 trained by the CLI; v2 comes from the training
    deployment with shuffled labels (its gates reject it), run by the stack's serve process."""
    train = local_stack.cli("train", timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    return local_stack


def _deployments(api: str) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}


@pytest.fixture(scope="module")
def rejected_run(stack: Stack, browser: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run of the training deployment started from its custom-run form as a person would (a run name typed,
    the Shuffle Labels switch turned on, Submit), run by the stack's serve process to its end."""
    training = _deployments(stack.api)["training"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(f"{stack.api.removesuffix('/api')}/deployments/deployment/{training['id']}/run")
    pg.get_by_text("Shuffle Labels").first.wait_for()
    pg.locator("input[type=text]").first.fill("sabotaged-from-the-form")  # the form's first field: Run Name
    # TrainingParams' only boolean: shuffle_labels. check() clicks and then asserts the switch is on: on a loaded
    # machine a click before the form has hydrated was lost, and the run went off with the default (CI, 12-02)
    pg.get_by_role("switch").check()
    shots = tmp_path_factory.mktemp("form")
    pg.screenshot(path=str(shots / "training-form-filled.png"), full_page=True)
    pg.get_by_role("button", name="Submit").click()
    deadline, run, found = time.monotonic() + 600, None, []
    while time.monotonic() < deadline:
        found = httpx.post(f"{stack.api}/flow_runs/filter", timeout=10,
                           json={"flow_runs": {"deployment_id": {"any_": [training["id"]]}}}).json()
        # the module's only run with shuffled labels (the flow renames it by its outcome when it ends)
        run = next((r for r in found if r["parameters"]["params"].get("shuffle_labels")), None)
        if run and run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1)
    context.close()
    assert run is not None, ("no run of the training deployment with shuffled labels started from the form: "
                             f"{[r['parameters'] for r in found]}")
    assert run["state"]["name"] == "Rejected", run["state"]
    return run


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Page:
    """A browser page whose requests outside 127.0.0.1 are refused and recorded in `external`."""

    pg: Any
    external: list[str]
    shots: Path

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.pg.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")

    def see(self, text: str, exact: bool = False) -> None:
        """Wait for `text` on the page; on a timeout, a screenshot of what was there instead."""
        try:
            self.pg.get_by_text(text, exact=exact).first.wait_for()
        except Exception:
            self.shot("failed-" + "".join(c if c.isalnum() else "-" for c in text)[:60])
            raise


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    external: list[str] = []

    def guard(route: Any) -> None:  # the UIs must work air-gapped
        url = route.request.url
        if url.startswith(LOCAL):
            route.continue_()
        else:
            external.append(url)
            route.abort()

    context.route("**/*", guard)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield Page(pg, external, tmp_path)
    context.close()


def _url(stack: Stack, name: str) -> str:
    return next(r["url"] for r in stack.records if r["name"] == name)


def test_prefect_ui_lists_the_deployments_with_schedules_and_named_triggers(stack: Stack, page: Page) -> None:
    ui = stack.api.removesuffix("/api")
    page.pg.goto(f"{ui}/deployments")
    for name in ("training", "rollout", "monitoring", "batch-scoring"):
        page.see(name, exact=True)
    page.see("Every hour every day")  # monitoring's cron, as the list renders it
    page.shot("deployments")
    training = _deployments(stack.api)["training"]
    page.pg.goto(f"{ui}/deployments/deployment/{training['id']}?tab=Description")
    page.see("At 03:00 AM, only on Monday")  # the weekly cron, drawn with its toggle off ...
    page.see("Inactive schedule: 0 3 * * 1 (UTC)")  # ... so the description says it is off on purpose
    page.see("train on flywheel.retrain.requested")  # the trigger, by its name
    page.shot("training-deployment")
    page.pg.goto(f"{ui}/automations")
    page.see("roll out on flywheel.model.challenger-registered")
    page.see("Runs the rollout once per flywheel.model.challenger-registered event")
    page.see("train on flywheel.retrain.requested")
    page.shot("automations")


def test_the_training_form_shows_typed_parameters(stack: Stack, page: Page) -> None:
    training = _deployments(stack.api)["training"]
    page.pg.goto(f"{stack.api.removesuffix('/api')}/deployments/deployment/{training['id']}/run")
    # TrainingParams' fields, each with its description
    for text in ("Shuffle Labels", "Fault injection for demos and tests", "Override train.seed", "Reason",
                 "date-time"):  # as_of's type, as the form states it
        page.see(text)
    page.shot("training-run-form")


def test_a_rejected_run_is_found_by_its_tag_and_shows_its_gate_report(stack: Stack, rejected_run: dict,
                                                                       page: Page) -> None:
    found = httpx.post(f"{stack.api}/flow_runs/filter", timeout=10,
                       json={"flow_runs": {"tags": {"all_": ["outcome:rejected"]}}}).json()
    assert [(r["id"], r["name"]) for r in found] == [(rejected_run["id"], "churn-v2-rejected")], found
    assert "churn v2 vs champion v1" in rejected_run["state"]["message"], rejected_run["state"]
    page.pg.goto(f"{stack.api.removesuffix('/api')}/runs/flow-run/{rejected_run['id']}")
    page.see("churn-v2-rejected")
    page.pg.get_by_text("Artifacts", exact=True).first.click()
    page.see("Gates for churn v2 vs champion v1")  # the gate report's card
    page.see("churn v2 vs champion v1: rejected")  # the summary's card (its description)
    page.shot("rejected-run-artifacts")
    # the summary is the flow run's own artifact: the tab starts with it, not with "Flow run: None"
    body = page.pg.inner_text("body")
    tab = body[body.index("\nFlow run\n"):]  # the tab's first section: the flow run's own artifacts
    assert tab.index("summary-churn") < tab.index("\nTask runs\n"), tab[:300]


def test_mlflow_model_page_shows_aliases_and_the_rejected_version(stack: Stack, rejected_run: dict,
                                                                  page: Page) -> None:
    mlflow = _url(stack, "mlflow-ui")
    page.pg.goto(f"{mlflow}/#/models/churn")
    page.see("Version 2")
    page.see("champion")
    page.shot("mlflow-model")
    page.pg.goto(f"{mlflow}/#/models/churn/versions/2")
    page.see("flywheel.status")
    page.see("rejected", exact=True)
    page.shot("mlflow-version-2")
    assert not page.external, page.external


def test_service_docs_render_offline(stack: Stack, page: Page) -> None:
    page.pg.goto(f"{_url(stack, 'service')}/")  # `/` sends a person to /docs
    page.pg.locator(".swagger-ui .info .title").filter(has_text="Flywheel prediction service").wait_for()
    page.pg.locator(".opblock-summary-path").filter(has_text="/predict").first.wait_for()
    assert page.pg.url.endswith("/docs")
    page.shot("service-docs")
    assert not page.external, f"/docs asked outside hosts: {page.external}"
