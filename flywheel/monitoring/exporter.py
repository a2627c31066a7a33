"""Monitoring figures for Prometheus, read from the project database at scrape time.

The monitoring flow runs as short-lived flow runs that Prometheus cannot scrape, so the service's `/metrics`
carries their outcome instead: per model, the newest judged window of the monitoring history (drift per
feature, share drifted, alarms, rows, when it ended) and the trigger decisions so far; and, for the models it
is told to watch, the loop's liveness seen from outside (flywheel/liveness.py): how long since monitoring last
judged a window and since an outcome last arrived, on the project clock, and `flywheel_loop_silent` when
either is over its limit (configs/triggers.yaml `liveness`), which a stopped monitoring flow cannot report
itself (deployments/prometheus/alerts.yml alerts on it). Reading at scrape
time keeps one source of truth (the tables) and costs two small queries per scrape. A database that cannot
be read yields `flywheel_monitoring_up 0` instead of failing the whole scrape: the service's own metrics
must still arrive.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from flywheel import migrations
from flywheel.clock import Clock, WallClock
from flywheel.db import project_engine
from flywheel.liveness import LoopLiveness
from flywheel.liveness import read as read_liveness
from flywheel.monitoring.history import windows
from flywheel.trigger_decisions import DECISIONS
from flywheel.trigger_policy import Liveness

log = logging.getLogger("flywheel.monitoring")

# name -> help; the Grafana dashboard (deployments/grafana/) may only query these and the service's own
MONITORING_METRICS: dict[str, str] = {
    "flywheel_monitoring_up": "1 when the monitoring history could be read at this scrape",
    "flywheel_monitoring_window_rows": "rows in the newest judged window",
    "flywheel_monitoring_window_end_timestamp_seconds": "end of the newest judged window (project clock)",
    "flywheel_monitoring_share_drifted": "share of features drifted in the newest window (after FDR control)",
    "flywheel_monitoring_drift_alarm": "1 while the drift alarm is raised (after persistence)",
    "flywheel_monitoring_drift_streak": "consecutive drifted windows",
    "flywheel_monitoring_data_quality_alarm": "1 when the newest window failed data quality",
    "flywheel_monitoring_feature_drift_score": "per-feature drift score in the newest window",
    "flywheel_monitoring_feature_drift_threshold": "the threshold the feature's score is judged against",
    "flywheel_monitoring_feature_drifted": "1 when the feature drifted in the newest window",
    "flywheel_monitoring_prediction_drift_score": "drift score of the prediction distribution",
    "flywheel_trigger_decisions": "trigger decisions recorded so far, by kind and outcome",
    "flywheel_monitoring_last_run_age_seconds": "project-clock seconds since monitoring last judged a window of "
                                                "the model (since it became champion if never; +Inf if neither)",
    "flywheel_outcomes_last_arrival_age_seconds": "project-clock seconds since an outcome of the model's dataset "
                                                  "last arrived (since it became champion if never; +Inf if neither)",
    "flywheel_loop_max_silence_seconds": "the configured limit of each age (configs/triggers.yaml liveness)",
    "flywheel_loop_silent": "1 when monitoring or outcomes have been silent for longer than configured",
}


@dataclass(frozen=True)
class Watched:
    """A model whose loop liveness is exported: its outcomes are its dataset's."""

    model: str
    dataset: str


class MonitoringCollector(Collector):
    """A prometheus_client collector over the monitoring history and trigger decisions at `url`, and the
    liveness of the `watch`ed models' loops judged against `liveness` at `clock`'s now."""

    def __init__(self, url: str, watch: Sequence[Watched] = (), liveness: Liveness | None = None,
                 clock: Clock | None = None) -> None:
        self.url = url
        self.watch, self.liveness, self.clock = list(watch), liveness or Liveness(), clock or WallClock()
        self._engine: sa.Engine | None = None

    def _connect(self) -> sa.Engine:
        if self._engine is None:
            engine = project_engine(self.url, "monitoring history")
            migrations.ensure(engine, [windows, DECISIONS])
            self._engine = engine
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def describe(self) -> list[Metric]:
        # no database read at registration time
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("flywheel_monitoring_up", MONITORING_METRICS["flywheel_monitoring_up"])
        try:
            newest, decisions, loops = self._read()
        except Exception as exc:  # the service's own metrics must still be scraped
            log.warning("monitoring metrics unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from window_families(newest)
        counts = GaugeMetricFamily("flywheel_trigger_decisions", MONITORING_METRICS["flywheel_trigger_decisions"],
                                   labels=["model", "kind", "outcome"])
        for model, kind, outcome, n in decisions:
            counts.add_metric([model, kind, outcome], n)
        yield counts
        yield from liveness_families(loops)

    def _read(self) -> tuple[list[dict[str, Any]], list[tuple[str, str, str, int]], list[LoopLiveness]]:
        engine = self._connect()
        latest = (sa.select(windows.c.model, sa.func.max(windows.c.window_end).label("end"))
                  .group_by(windows.c.model).subquery())
        query = (sa.select(windows).join(latest, sa.and_(windows.c.model == latest.c.model,
                                                         windows.c.window_end == latest.c.end))
                 .order_by(windows.c.model, windows.c.id.desc()))
        counts = (sa.select(DECISIONS.c.model, DECISIONS.c.kind, DECISIONS.c.outcome, sa.func.count())
                  .group_by(DECISIONS.c.model, DECISIONS.c.kind, DECISIONS.c.outcome))
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
            decisions = [(m, k, o, int(n)) for m, k, o, n in conn.execute(counts)]
            now = self.clock.now()
            loops = [read_liveness(conn, w.model, w.dataset, now, self.liveness) for w in self.watch]
        newest: dict[str, dict[str, Any]] = {}
        for row in rows:  # two series may end at the same time: the one judged last
            newest.setdefault(row["model"], row)
        return list(newest.values()), decisions, loops


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, MONITORING_METRICS[name], labels=labels)


def window_families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """The gauges of each model's newest window (rows of `flywheel_monitoring_windows`)."""
    series = ["model", "version", "reference"]
    per_window = {name: _gauge(name, series) for name in (
        "flywheel_monitoring_window_rows", "flywheel_monitoring_window_end_timestamp_seconds",
        "flywheel_monitoring_share_drifted", "flywheel_monitoring_drift_alarm", "flywheel_monitoring_drift_streak",
        "flywheel_monitoring_data_quality_alarm", "flywheel_monitoring_prediction_drift_score")}
    per_feature = {name: _gauge(name, [*series, "feature", "method"]) for name in (
        "flywheel_monitoring_feature_drift_score", "flywheel_monitoring_feature_drift_threshold",
        "flywheel_monitoring_feature_drifted")}
    for row in rows:
        labels = [row["model"], row["version"] or "", row["reference"]]
        end = row["window_end"]
        values = {
            "flywheel_monitoring_window_rows": row["rows"],
            "flywheel_monitoring_window_end_timestamp_seconds": end.replace(tzinfo=UTC).timestamp(),  # naive UTC
            "flywheel_monitoring_share_drifted": row["share_drifted"],
            "flywheel_monitoring_drift_alarm": int(bool(row["alarm"])),
            "flywheel_monitoring_drift_streak": row["streak"],
            "flywheel_monitoring_data_quality_alarm": int(bool(row["data_quality_alarm"])),
        }
        if row["prediction_score"] is not None:
            values["flywheel_monitoring_prediction_drift_score"] = row["prediction_score"]
        for name, value in values.items():
            per_window[name].add_metric(labels, float(value))
        for feature, score in json.loads(row["scores"]).items():
            flabels = [*labels, feature, str(score.get("method") or "")]
            for name, key in (("flywheel_monitoring_feature_drift_score", "score"),
                              ("flywheel_monitoring_feature_drift_threshold", "threshold"),
                              ("flywheel_monitoring_feature_drifted", "drifted")):
                if score.get(key) is not None:
                    per_feature[name].add_metric(flabels, float(score[key]))
    yield from per_window.values()
    yield from per_feature.values()


def liveness_families(loops: list[LoopLiveness]) -> Iterator[Metric]:
    """Per watched model: the two ages, their limits and whether the loop is silent."""
    if not loops:
        return
    monitoring = _gauge("flywheel_monitoring_last_run_age_seconds", ["model"])
    outcomes = _gauge("flywheel_outcomes_last_arrival_age_seconds", ["model", "dataset"])
    limits = _gauge("flywheel_loop_max_silence_seconds", ["model", "what"])
    silent = _gauge("flywheel_loop_silent", ["model"])
    for loop in loops:
        monitoring.add_metric([loop.model], loop.monitoring.age_s)
        outcomes.add_metric([loop.model, loop.dataset], loop.outcomes.age_s)
        for s in (loop.monitoring, loop.outcomes):
            limits.add_metric([loop.model, s.what], s.limit_s)
        silent.add_metric([loop.model], int(loop.silent))
    yield from (monitoring, outcomes, limits, silent)
