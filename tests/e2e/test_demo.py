"""`make demo` for real, on a busy machine: `flywheel up` then `flywheel demo` (profile ci, a temp home,
free ports), while a busy-loop process holds one of the two cores.

The demo checks its own story and exits 1 naming the step that broke; this test asserts it exits 0 AND
reads the outcomes back from the stores itself: the registry's aliases and status tags (v1 champion then
archived, v2 promoted, v3 rejected with no alias), the audit log (the promotion made by the rollout's flow
run), the stack's Prefect server (the rollout run ended `Promoted`, the sabotaged training run
`Rejected`). All of it on `make demo`'s simulated clock (a day per 600 wall seconds, anchored by `up`):
`flywheel status` tells the simulated time, the decisions were taken at simulated times (hours ahead of
the wall clock) and the cooldown held within its 6 hours of them. Then `flywheel down`, and no process
`up` started is left.

It starts a stack of its own rather than sharing the session's (tests/e2e/conftest.py, used by the browser and
stack modules): `make demo`'s `flywheel up` is one of the commands under test (from a fresh home, with a core
busy), the demo's story needs a home with no model yet (v1, v2, v3 in order), and it ends by stopping its stack.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.e2e.stackproc import Stack, ours, read_records, stack_home

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def busy_core() -> Iterator[int]:
    """A child process spinning `while True: pass` (one core's worth of CPU), killed by its pid after."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_home(tmp_path_factory.mktemp("demo")) as st:
        yield st


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _flow_runs(api: str, body: dict) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()


@pytest.mark.timeout(2400)
def test_make_demo_proves_its_story_on_a_busy_machine(demo_stack: Stack, busy_core: int) -> None:
    st = demo_stack
    took: dict[str, float] = {}
    # -------------------------------------------------------------- make demo: the two commands
    secret = {"FLYWHEEL_WEBHOOK_SECRET": secrets.token_hex(16),  # as the Makefile does: a throwaway one
              "FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "600"}  # and its clock
    t0 = time.monotonic()
    up = st.cli("up", timeout=600, env={"FLYWHEEL_ROLLOUT__STRATEGY": "demo", **secret})  # as the Makefile runs it
    took["up"] = time.monotonic() - t0
    st.records = read_records(st.run_dir)
    assert up.returncode == 0, _tail(up.stdout + up.stderr)

    t0 = time.monotonic()
    demo = st.cli("demo", timeout=1800, env=secret)
    took["demo"] = time.monotonic() - t0
    out = demo.stdout + demo.stderr
    print(f"\n`flywheel up` {took['up']:.0f} s, `flywheel demo` {took['demo']:.0f} s (one core busy)\n"
          f"{_tail(out, 200)}")
    assert demo.returncode == 0, _tail(out)
    flat = " ".join(out.split())
    assert "story checked: champion v1, challenger v2 promoted by the canary rollout, sabotaged v3 rejected" \
           in flat, _tail(out)
    assert "lifecycle checked: drift alarm at window 2, one drift trigger fired" in flat, _tail(out)
    assert "Timeline" in out and "4. window 3" in out and "4. webhook" in out, _tail(out)
    assert "late labels: realized ROC AUC" in flat and "4. outcomes" in out, _tail(out)
    assert "rows of served features)" in flat and "4. served" in out, _tail(out)  # the step column wraps its name
    assert "simulated time" in out and "simulated h after the fire, inside the 6 h cooldown" in flat, _tail(out)
    status = st.cli("status", timeout=120)
    told = status.stdout + status.stderr  # the CLI's console writes to stderr
    assert status.returncode == 0 and "clock" in told and "simulated:" in told, told

    # -------------------------------------------------------------- the outcomes, read back from the stores
    from flywheel.audit import AuditLog
    from flywheel.registry import TAG_STATUS, Registry
    from flywheel.settings import load_settings

    settings = load_settings("ci", st.home / "configs", environ={})
    registry = Registry(settings.mlflow_tracking_uri, AuditLog(settings.audit_db_url))
    tags = {v: registry.version_tags("churn", v).get(TAG_STATUS) for v in ("1", "2", "3")}
    assert tags["1"] == "archived" and tags["3"] == "rejected", tags
    moves = [(e.alias, e.from_version, e.to_version, e.actor) for e in registry.audit.entries("churn")]
    promotion = [m for m in moves if m[0] == "champion" and m[2] == "2"]
    assert len(promotion) == 1 and promotion[0][1] == "1", moves
    assert promotion[0][3].startswith("prefect-flow-run:"), f"promoted by the rollout run, not by hand: {moves}"
    assert not [m for m in moves if m[2] == "3"], f"no alias ever pointed at the sabotaged v3: {moves}"

    rollouts = _flow_runs(st.api, {"deployments": {"name": {"any_": ["rollout"]}}})
    ended = {(r["parameters"]["params"].get("challenger_version"), r["state"]["name"]) for r in rollouts}
    assert ("2", "Promoted") in ended, ended
    local = _flow_runs(st.api, {"flows": {"name": {"any_": ["training-pipeline"]}},
                                "flow_runs": {"deployment_id": {"is_null_": True}}})
    assert sorted(r["state"]["name"] for r in local) == ["Completed", "Completed", "Rejected"], local

    # -------------------------------------------------------------- step 4, from the stores
    from flywheel.trigger_decisions import TriggerDecisions

    store = TriggerDecisions(settings.audit_db_url)
    drift = [d for d in store.decisions("churn") if d.kind == "drift_detected"]
    store.dispose()
    fired = [d for d in drift if d.fired]
    assert len(fired) == 1, [(d.outcome, d.reason) for d in drift]
    cooled = [d for d in drift if d.suppressed_by == "cooldown"]
    assert cooled, [(d.outcome, d.reason) for d in drift]
    # on the simulated clock: taken hours ahead of the wall clock, the suppression within 6 h of the fire
    assert fired[0].at > datetime.now(UTC), (fired[0].at, datetime.now(UTC))
    assert timedelta(0) < cooled[0].at - fired[0].at < timedelta(hours=6), (fired[0].at, cooled[0].at)
    trained = _flow_runs(st.api, {"deployments": {"name": {"any_": ["training"]}}})
    by_trigger = [r for r in trained if r["id"] == fired[0].flow_run_id]
    assert len(by_trigger) == 1, (fired[0], [r["id"] for r in trained])
    assert by_trigger[0]["parameters"]["params"]["reason"] == fired[0].reason, by_trigger[0]["parameters"]
    assert by_trigger[0]["state"]["name"] in ("Completed", "Rejected"), by_trigger[0]["state"]
    # the drift rule's training_source reached the run, and its MLflow run says it trained on served features
    assert by_trigger[0]["parameters"]["params"]["training_source"] == "served_features", by_trigger[0]["parameters"]
    (retrained,) = [v for v in registry.client.search_model_versions("name = 'churn'")
                    if v.tags.get("flywheel.trigger") == "drift_detected"]
    run_tags = registry.client.get_run(retrained.run_id).data.tags
    assert run_tags["flywheel.training_source"] == "served_features", run_tags
    assert int(run_tags["flywheel.training_rows"]) >= 1000, run_tags  # outcomes.min_training_rows
    hooked = [r for r in trained if r["parameters"]["params"].get("reason", "").startswith("demo step 4: a signed")]
    assert len(hooked) == 1, [r["parameters"] for r in trained]

    # the drifted windows' realized performance, filled in after their labels landed, beside the estimate
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.monitoring.realized import PerformanceHistory

    history, perf = MonitoringHistory(settings.audit_db_url), PerformanceHistory(settings.audit_db_url)
    try:
        drifted = {w.key: w for w in history.windows("churn") if w.status == "drift" and w.rows >= 500}
        filled = [e for e in perf.evaluations("churn") if e.key in drifted and e.realized]
    finally:
        history.close()
        perf.close()
    assert filled, [(e.key, e.labelled_rows) for e in perf.evaluations("churn")]
    assert all(e.realized_roc_auc is not None and e.estimated_roc_auc is not None for e in filled), filled
    assert all(drifted[e.key].estimated_roc_auc is not None for e in filled), "estimated when it was served"
    assert all(e.outcomes_as_of > drifted[e.key].window_end for e in filled), "the labels landed after the window"

    # -------------------------------------------------------------- and the stack stops
    down = st.cli("down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    left = [f"{r['name']} (pid {r['pid']})" for r in st.records if ours(r) is not None]
    assert not left, f"still running after `flywheel down`: {left}"
    assert not list(st.run_dir.glob("*.pid"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{st.api}/health", timeout=2)
