"""Monitoring figures on the service's /metrics (flywheel/monitoring/exporter.py), read from a real SQLite
project database, and the provisioned Grafana dashboard checked against the metric names the code exports."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.monitoring.exporter import MONITORING_METRICS, MonitoringCollector, Watched
from flywheel.monitoring.history import MonitoringHistory
from flywheel.trigger_decisions import TriggerDecisions
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import drift_signal
from tests.unit.test_monitoring_history import DAY, T0, _judged

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deployments" / "grafana" / "dashboards" / "flywheel.json"


def _scrape(collector: MonitoringCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/flywheel.db"


def _record_windows(url: str) -> None:
    history = MonitoringHistory(url)
    try:
        statuses: list = []
        for day, score in enumerate([0.3, 0.3]):  # persistence 2: the second window raises the alarm
            rec = _judged(score, day, statuses)
            history.record(rec)
            statuses.append(rec.status)
        history.record(_judged(0.01, 0, [], model="other"))
    finally:
        history.close()


def test_the_newest_window_of_each_model_is_exported(db_url: str) -> None:
    _record_windows(db_url)
    decisions = TriggerDecisions(db_url)
    try:
        signal = drift_signal(True, model="churn", event_id="drift:w2", occurred=T0, evidence={})
        decisions.decide_and_record(signal, TriggerPolicy(), False, T0 + 2 * DAY)
        decisions.decide_and_record(signal, TriggerPolicy(), False, T0 + 2 * DAY)  # a repeat: suppressed
    finally:
        decisions.dispose()
    collector = MonitoringCollector(db_url)
    samples = _scrape(collector)
    collector.close()

    series = (("model", "churn"), ("reference", "v1"), ("version", "1"))
    assert samples[("flywheel_monitoring_up", ())] == 1
    assert samples[("flywheel_monitoring_drift_alarm", series)] == 1, "the second drifted window raised it"
    assert samples[("flywheel_monitoring_drift_streak", series)] == 2
    assert samples[("flywheel_monitoring_share_drifted", series)] == 1.0
    assert samples[("flywheel_monitoring_window_rows", series)] == 1000
    end = datetime.fromtimestamp(samples[("flywheel_monitoring_window_end_timestamp_seconds", series)], UTC)
    assert end == T0 + 2 * DAY - timedelta(seconds=1), "the second window (day 1) is the newest"
    feature = tuple(sorted((("feature", "tenure"), ("method", "wasserstein"), *series)))
    assert samples[("flywheel_monitoring_feature_drift_score", feature)] == pytest.approx(0.3)
    assert samples[("flywheel_monitoring_feature_drifted", feature)] == 1
    other = (("model", "other"), ("reference", "v1"), ("version", "1"))
    assert samples[("flywheel_monitoring_drift_alarm", other)] == 0
    fired = (("kind", "drift_detected"), ("model", "churn"), ("outcome", "fire"))
    suppressed = (("kind", "drift_detected"), ("model", "churn"), ("outcome", "suppressed"))
    assert samples[("flywheel_trigger_decisions", fired)] == 1
    assert samples[("flywheel_trigger_decisions", suppressed)] == 1


def test_an_unreadable_database_says_so_and_the_scrape_still_answers(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    collector = MonitoringCollector(f"sqlite:///{tmp_path}/a-file/flywheel.db")
    samples = _scrape(collector)
    assert samples == {("flywheel_monitoring_up", ()): 0}


def test_an_empty_history_exports_only_up(db_url: str) -> None:
    samples = _scrape(MonitoringCollector(db_url))
    assert samples == {("flywheel_monitoring_up", ()): 1}


def _exported_names(db_url: str) -> set[str]:
    """Every sample name the service (with the monitoring collector) and the webhook receiver export."""
    from flywheel.service import Metrics as ServiceMetrics
    from flywheel.webhook import DeliveryStore, OutboxCollector
    from flywheel.webhook import Metrics as WebhookMetrics

    _record_windows(db_url)
    decisions = TriggerDecisions(db_url)
    signal = drift_signal(True, model="churn", event_id="drift:w2", occurred=T0, evidence={})
    decisions.decide_and_record(signal, TriggerPolicy(), False, T0 + 2 * DAY)
    decisions.dispose()
    service, webhook = ServiceMetrics(), WebhookMetrics()
    # label sets appear once observed: observe one of each, as traffic would
    service.requests.labels("/predict", "POST", "200").inc()
    service.request_seconds.labels("/predict").observe(0.001)
    service.predictions.labels("churn", "1", "champion", "false").inc()
    service.predict_seconds.labels("churn", "1", "champion").observe(0.001)
    service.errors.labels("422").inc()
    service.model_loaded.labels("champion", "1").set(1)
    service.model_refused.labels("champion", "1").inc()
    service.model_failures.labels("champion", "1").inc()
    webhook.requests.labels("/hooks/retrain", "202").inc()
    webhook.verified.labels("current").inc()
    webhook.emitted.labels("flywheel.retrain.requested").inc()
    webhook.seconds.labels("/hooks/retrain").observe(0.01)
    webhook.send_failures.inc()
    # the service watches its model's loop; the receiver exports its outbox backlog
    collector = MonitoringCollector(db_url, [Watched("churn", "churn")])
    service.registry.register(collector)
    webhook.registry.register(OutboxCollector(DeliveryStore(db_url, lease_s=15), time.time))
    names = set()
    for registry in (service.registry, webhook.registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names |= {s.name for s in family.samples}
    collector.close()
    return names


def test_every_dashboard_query_names_an_exported_metric(db_url: str) -> None:
    exported = _exported_names(db_url)
    # these windows were judged without a prediction column: no prediction score to export
    listed = set(MONITORING_METRICS) - {"flywheel_monitoring_prediction_drift_score"}
    assert listed <= exported, f"listed but not exported: {sorted(listed - exported)}"
    dashboard = json.loads(DASHBOARD.read_text())
    assert _queried(dashboard), "the dashboard queries Flywheel's metrics"
    assert not _queried(dashboard) - exported, f"queried but never exported: {sorted(_queried(dashboard) - exported)}"
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    datasources = yaml.safe_load((ROOT / "deployments/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert uids == {d["uid"] for d in datasources["datasources"]}, "every panel queries the provisioned datasource"


def test_a_query_of_a_metric_nobody_exports_is_caught(db_url: str) -> None:
    exported = _exported_names(db_url)
    dashboard = json.loads(DASHBOARD.read_text())
    assert not _queried(dashboard) - exported
    # one panel misspells a metric: the check above names it
    dashboard["panels"][0]["targets"][0]["expr"] = "max(flywheel_monitoring_drift_share) by (model)"
    assert _queried(dashboard) - exported == {"flywheel_monitoring_drift_share"}


def _queried(dashboard: dict) -> set[str]:
    """Every Flywheel metric name a panel's PromQL mentions."""
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\bflywheel_[a-z0-9_]+", target["expr"])}
