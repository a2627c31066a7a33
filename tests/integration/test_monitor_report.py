"""The window's HTML report with real Evidently, and the pieces a monitoring flow will call as tasks
(`tasks/monitor.py` under `.fn`), on a real SQLite history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.datagen import DriftSpec, GeneratorSpec, generate
from flywheel.monitoring.config import DatasetPolicy, ReportSettings
from flywheel.monitoring.drift import drift_from_profile
from flywheel.monitoring.history import window_record
from flywheel.monitoring.profile import profile_frame
from flywheel.monitoring.report import report_frames, write_report
from flywheel.monitoring.window import verdict_markdown
from flywheel.schemas import load_dataset
from flywheel.settings import ValidateConfig
from tasks.monitor import assess_window, previous_window_statuses, record_window, write_window_report
from tests.conftest import PROJECT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DS = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    spec = GeneratorSpec(seed=5, days=9, rows_per_day=800, drift=DriftSpec(covariate=0.3), drift_from_day=8)
    days = [df for _, df in generate(spec)]
    return pd.concat(days[:8], ignore_index=True), days[8]


def test_the_report_compares_the_window_with_a_reference_rebuilt_from_the_profile(frames, tmp_path: Path) -> None:
    reference, window = frames
    profile = profile_frame(reference, DS)
    drift = drift_from_profile(profile, window, DatasetPolicy().drift)
    path = write_report(profile, window, drift, tmp_path / "r" / "w.html", ReportSettings(reference_rows=2000))
    html = path.read_text()
    assert path.is_file() and not (tmp_path / "r" / "w.tmp").exists()
    assert "Dataset Drift" in html and "Jensen-Shannon distance" in html and "support_tickets_30d" in html
    ref, cur = report_frames(profile, window, ReportSettings(reference_rows=2000))
    assert len(ref) == 2000 and len(cur) == len(window) and list(ref.columns) == DS.feature_names
    assert ref["support_tickets_30d"].mean() == pytest.approx(reference["support_tickets_30d"].mean(), abs=0.02)


def test_a_broken_window_still_gets_a_report_without_its_broken_columns(frames, tmp_path: Path) -> None:
    reference, window = frames
    profile = profile_frame(reference, DS)
    broken = window.drop(columns="region").assign(monthly_charges=np.nan, tenure_months="n/a")
    drift = drift_from_profile(profile, broken, DatasetPolicy().drift)
    path = write_report(profile, broken, drift, tmp_path / "broken.html", ReportSettings(reference_rows=1000))
    ref, cur = report_frames(profile, broken, ReportSettings(reference_rows=1000))
    assert path.is_file() and {"region", "monthly_charges", "tenure_months"}.isdisjoint(cur.columns)
    assert list(ref.columns) == list(cur.columns)


def test_the_flow_pieces_judge_record_and_report_a_window(frames, tmp_path: Path) -> None:
    reference, window = frames
    profile = profile_frame(reference, DS)
    policy = DatasetPolicy()
    url = f"sqlite:///{tmp_path}/flywheel.db"
    start = datetime(2026, 1, 9, tzinfo=UTC)
    assert previous_window_statuses.fn(url, "churn", "v1", start) == []
    a = assess_window.fn(profile, window, policy, [], None, DS, ValidateConfig())
    assert a.quality.expectations_run and a.quality.passed, a.quality.problems
    assert a.verdict.status == "drift" and not a.verdict.alarm, "one drifted window: persistence holds the alarm"
    report = write_window_report.fn(profile, window, a.drift, tmp_path / "report.html", policy)
    rec = window_record("churn", "1", "v1", start, start + timedelta(days=1), a.drift, a.quality, a.verdict,
                        str(report), start + timedelta(days=1))
    assert record_window.fn(url, rec) == 1
    assert previous_window_statuses.fn(url, "churn", "v1", start + timedelta(days=2)) == ["drift"]
    md = verdict_markdown("churn", "v1", start, start + timedelta(days=1), a)
    assert md.startswith("## Monitoring `churn` vs `v1`: **drifted**") and "| support_tickets_30d | wasserstein |" in md
