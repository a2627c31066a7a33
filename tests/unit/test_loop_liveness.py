"""Liveness seen from outside the loop (flywheel/liveness.py): the check that does not need the monitoring flow
to run. Recorded rows in a real SQLite project database (alias audit, monitoring windows, outcomes), a
ManualClock or a pinned project clock; read by the check itself, by `flywheel loop check`, by the service's
/metrics (its real text) and the webhook receiver's /health. Each condition alone makes it fail."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from flywheel import migrations
from flywheel.audit import AuditLog
from flywheel.clock import ManualClock
from flywheel.liveness import read
from flywheel.monitoring.exporter import MonitoringCollector, Watched
from flywheel.monitoring.history import MonitoringHistory
from flywheel.outcomes import OUTCOMES
from flywheel.trigger_policy import Liveness
from tests.unit.test_monitoring_history import _judged

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = Liveness(monitoring_max_silence=timedelta(hours=3), outcomes_max_silence=timedelta(days=2))
FRESH = {"monitoring": timedelta(hours=1), "outcomes": timedelta(hours=10)}
STALE = {"monitoring": timedelta(hours=5), "outcomes": timedelta(days=3)}


def record(url: str, *, champion: timedelta | None = timedelta(days=30), monitoring: timedelta | None = None,
           outcomes: timedelta | None = None, model: str = "churn", dataset: str = "churn", day: int = 0) -> None:
    """Rows as the loop writes them: the model became champion, a window judged, an outcome arrived, each
    that long before NOW (None: never)."""
    if champion is not None:
        AuditLog(url).append(model, "champion", None, "1", "first champion", "test", at=NOW - champion)
    if monitoring is not None:
        history = MonitoringHistory(url)
        try:
            history.record(_judged(0.01, day, [], model=model).model_copy(update={"judged_at": NOW - monitoring}))
        finally:
            history.close()
    engine = sa.create_engine(url)
    migrations.ensure(engine, [OUTCOMES])
    if outcomes is not None:
        with engine.begin() as conn:  # SQLite keeps naive UTC (flywheel/outcomes.py `_time`)
            conn.execute(OUTCOMES.insert().values(
                dataset=dataset, entity="c1", event_time=(NOW - outcomes - timedelta(days=1)).replace(tzinfo=None),
                label="churned", arrived_at=(NOW - outcomes).replace(tzinfo=None), batch_id="b" * 64, context=None))
    engine.dispose()


def check(url: str, now: datetime = NOW):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return read(conn, "churn", "churn", now, POLICY)
    finally:
        engine.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/flywheel.db"


# ------------------------------------------------------------------------------------------ the check


def test_fresh_monitoring_and_outcomes_are_alive(url: str) -> None:
    record(url, monitoring=FRESH["monitoring"], outcomes=FRESH["outcomes"])
    loop = check(url)
    assert not loop.silent and loop.summaries == ()
    assert (loop.monitoring.age_s, loop.outcomes.age_s) == (3600, 36000)
    assert (loop.monitoring.limit_s, loop.outcomes.limit_s) == (3 * 3600, 2 * 86400)
    assert loop.monitoring.last_at == NOW - FRESH["monitoring"] and loop.champion_since == NOW - timedelta(days=30)


def test_stale_monitoring_alone_makes_the_loop_silent(url: str) -> None:
    record(url, monitoring=STALE["monitoring"], outcomes=FRESH["outcomes"])
    loop = check(url)
    assert loop.silent and (loop.monitoring.silent, loop.outcomes.silent) == (True, False)
    assert loop.monitoring.age_s == 5 * 3600
    (summary,) = loop.summaries
    assert "no judged monitoring window for 5.0 hours" in summary and "max silence 3h" in summary


def test_stale_outcomes_alone_make_the_loop_silent(url: str) -> None:
    record(url, monitoring=FRESH["monitoring"], outcomes=STALE["outcomes"])
    loop = check(url)
    assert loop.silent and (loop.monitoring.silent, loop.outcomes.silent) == (False, True)
    assert loop.outcomes.age_s == 3 * 86400


def test_both_stale(url: str) -> None:
    record(url, monitoring=STALE["monitoring"], outcomes=STALE["outcomes"])
    loop = check(url)
    assert (loop.monitoring.silent, loop.outcomes.silent) == (True, True) and len(loop.summaries) == 2


def test_monitoring_that_never_ran_is_silent_once_the_champion_served_longer_than_the_limit(url: str) -> None:
    record(url, champion=timedelta(hours=4), outcomes=FRESH["outcomes"])
    loop = check(url)
    assert (loop.monitoring.silent, loop.outcomes.silent) == (True, False)
    assert loop.monitoring.last_at is None and loop.monitoring.age_s == 4 * 3600, "counted from the champion"
    assert "no judged monitoring window recorded since" in loop.summaries[0]
    # the same rows an hour after the champion started: not owed yet
    young = check(url, NOW - timedelta(hours=3, minutes=30))
    assert not young.monitoring.silent


def test_nothing_recorded_and_no_champion_is_silent_at_once(url: str) -> None:
    loop = check(url)  # not even the tables exist
    assert loop.silent and (loop.monitoring.silent, loop.outcomes.silent) == (True, True)
    assert math.isinf(loop.monitoring.age_s) and loop.champion_since is None


def test_only_what_was_known_by_now_counts_and_other_models_do_not(url: str) -> None:
    record(url, monitoring=STALE["monitoring"], outcomes=FRESH["outcomes"])
    record(url, champion=None, monitoring=FRESH["monitoring"], model="other", dataset="other")
    assert check(url).monitoring.silent, "another model's window is not this one's"
    # another window, judged after NOW (a clock ahead): not yet known at NOW
    record(url, champion=None, monitoring=-timedelta(hours=1), day=1)
    assert check(url).monitoring.age_s == 5 * 3600


# ------------------------------------------------------------------------------------------ /metrics


def scrape_text(url: str, clock: ManualClock) -> str:
    collector = MonitoringCollector(url, [Watched("churn", "churn")], POLICY, clock)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        return generate_latest(registry).decode()
    finally:
        collector.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_exporter_exports_the_ages_limits_and_silence_on_the_project_clock(url: str) -> None:
    record(url, monitoring=FRESH["monitoring"], outcomes=FRESH["outcomes"])
    clock = ManualClock(NOW)
    got = samples(scrape_text(url, clock))
    assert got[("flywheel_monitoring_last_run_age_seconds", (("model", "churn"),))] == 3600
    assert got[("flywheel_outcomes_last_arrival_age_seconds", (("dataset", "churn"), ("model", "churn")))] == 36000
    assert got[("flywheel_loop_max_silence_seconds", (("model", "churn"), ("what", "monitoring")))] == 3 * 3600
    assert got[("flywheel_loop_max_silence_seconds", (("model", "churn"), ("what", "outcomes")))] == 2 * 86400
    assert got[("flywheel_loop_silent", (("model", "churn"),))] == 0

    clock.advance(timedelta(hours=2, seconds=1))  # nothing ran since: monitoring is now 3 h 1 s quiet
    got = samples(scrape_text(url, clock))
    assert got[("flywheel_monitoring_last_run_age_seconds", (("model", "churn"),))] == 3 * 3600 + 1
    assert got[("flywheel_loop_silent", (("model", "churn"),))] == 1


def test_the_exporter_says_never_as_infinity(url: str) -> None:
    text = scrape_text(url, ManualClock(NOW))
    assert 'flywheel_monitoring_last_run_age_seconds{model="churn"} +Inf' in text
    assert 'flywheel_loop_silent{model="churn"} 1.0' in text


def test_the_services_metrics_endpoint_carries_the_loop_liveness(home: Path) -> None:
    """The service's real /metrics, its project clock pinned at NOW (a simulated clock at wall speed)."""
    from fastapi.testclient import TestClient

    from flywheel.service import create_app
    from flywheel.settings import load_settings

    anchor = datetime.now(UTC)
    env = {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": NOW.isoformat(),
           "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400", "FLYWHEEL_CLOCK__ANCHOR": anchor.isoformat()}
    settings = load_settings("ci", home / "configs", environ=env)
    record(settings.audit_db_url, monitoring=STALE["monitoring"], outcomes=FRESH["outcomes"])
    with TestClient(create_app(settings, admin_token="t" * 32, poll=False)) as client:
        text = client.get("/metrics").text
    got = samples(text)
    age = got[("flywheel_monitoring_last_run_age_seconds", (("model", "churn"),))]
    assert 5 * 3600 <= age < 5 * 3600 + 120, age
    assert got[("flywheel_loop_silent", (("model", "churn"),))] == 1


# ------------------------------------------------------------------------------------------ the CLI


def cli(home: Path, *args: str, at: datetime = NOW):
    from flywheel.cli import app

    env = {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": at.isoformat(),
           "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400", "FLYWHEEL_CLOCK__ANCHOR": datetime.now(UTC).isoformat(),
           "COLUMNS": "200"}
    return CliRunner().invoke(app, ["loop", "check", "--profile", "ci", "--config-dir", str(home / "configs"), *args],
                              env=env)


@pytest.mark.parametrize(("monitoring", "outcomes", "code", "says"), [
    (FRESH["monitoring"], FRESH["outcomes"], 0, ["loop alive"]),
    (STALE["monitoring"], FRESH["outcomes"], 1, ["SILENT", "silent: churn: no judged monitoring window for 5.0 hours"]),
    (FRESH["monitoring"], STALE["outcomes"], 1, ["SILENT", "silent: churn: no outcome (delayed label) for 3.0 days"]),
    (None, FRESH["outcomes"], 1, ["none recorded", "no judged monitoring window recorded since"]),
])
def test_loop_check_exits_non_zero_when_the_loop_is_silent(home: Path, monitoring: timedelta | None,
                                                           outcomes: timedelta, code: int, says: list[str]) -> None:
    from flywheel.settings import load_settings

    record(load_settings("ci", home / "configs", environ={}).audit_db_url, monitoring=monitoring, outcomes=outcomes)
    result = cli(home)
    assert result.exit_code == code, result.output
    assert "model churn (dataset churn, champion since 2026-11-01T12:00:00+00:00)" in result.output
    for text in says:
        assert text in result.output, result.output
    assert sum("SILENT" in line for line in result.output.splitlines()) == (1 if code else 0)


def test_loop_check_names_an_unreadable_database(home: Path) -> None:
    (home / "configs" / "ci.yaml").write_text("stores: {audit_db_url: 'sqlite:///{home}/a-file/flywheel.db'}\n")
    (home / "a-file").write_text("not a folder")
    result = cli(home)
    assert result.exit_code == 2 and "project database" in result.output, result.output


# ------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_loads_the_alert_rules_and_they_query_exported_metrics(url: str) -> None:
    import re

    import yaml

    from tests.unit.test_monitoring_exporter import ROOT, _exported_names

    prom = yaml.safe_load((ROOT / "deployments/prometheus/prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./deployments/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"][
        "volumes"], "the rule file sits beside prometheus.yml in the container"
    rules = {r["alert"]: r for g in yaml.safe_load((ROOT / "deployments/prometheus/alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert {"FlywheelLoopSilent", "FlywheelMonitoringStale", "FlywheelOutcomesStale"} <= set(rules)
    assert "flywheel_loop_silent" in rules["FlywheelLoopSilent"]["expr"]
    queried = {n for r in rules.values() for n in re.findall(r"\bflywheel_[a-z0-9_]+", r["expr"])}
    exported = _exported_names(url)
    assert queried <= exported, f"alerted on but never exported: {sorted(queried - exported)}"


def test_the_webhook_receivers_health_carries_the_loop_liveness_as_detail(home: Path) -> None:
    import socket

    from fastapi.testclient import TestClient

    from flywheel.hmacsig import Secret
    from flywheel.settings import load_settings
    from flywheel.webhook import create_app

    settings = load_settings("ci", home / "configs", environ={})
    record(settings.audit_db_url, monitoring=STALE["monitoring"], outcomes=FRESH["outcomes"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/api"  # no Prefect: the status says so, not the detail
    app = create_app(settings, [Secret("current", "c" * 32)], closed, model_name="churn")
    with TestClient(app) as client:
        health = client.get("/health")
    assert health.status_code == 503 and health.json()["prefect_api"].startswith("unreachable")
    loop = health.json()["loop"]
    assert (loop["model"], loop["silent"], loop["monitoring_max_silence_s"]) == ("churn", True, 3 * 3600)
    assert loop["monitoring_age_s"] > 5 * 3600 and "no judged monitoring window" in loop["summaries"][0]
