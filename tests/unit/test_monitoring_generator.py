"""The alarm discipline measured on the data generator (flywheel/datagen.py), with the shipped policy.

Reference: 14 daily batches of 1,000 rows and a logistic regression fitted on them (its predictions are
profiled too). Then 20 drift-free days, each one window judged in time order; then days with covariate
drift of a stated size (datagen's knob: at 0.15 charges +9%, tickets +0.3 a month, sessions -6%, payment
delay +0.9 days, tenure -1.8 months). Pure: no stores, no Great Expectations (the data is clean).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.datagen import DriftSpec, GeneratorSpec, _customers, generate_day
from flywheel.monitoring.alarms import WindowVerdict
from flywheel.monitoring.config import load_policy
from flywheel.monitoring.profile import profile_frame
from flywheel.monitoring.window import assess_window
from flywheel.schemas import load_dataset
from flywheel.settings import ImputationConfig
from flywheel.training import build_pipeline, fit, predict_scores
from tests.conftest import PROJECT

pytestmark = pytest.mark.slow

REFERENCE_DAYS, CALM_DAYS = 14, 20
INJECTED_COVARIATE = 0.15


def _run(seed: int, covariate: float, drift_days: int) -> list[WindowVerdict]:
    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    policy = load_policy(PROJECT / "configs" / "monitoring.yaml").for_dataset("churn")
    first_drift = REFERENCE_DAYS + CALM_DAYS
    spec = GeneratorSpec(seed=seed, rows_per_day=1000, drift=DriftSpec(covariate=covariate),
                         drift_from_day=first_drift)
    customers = _customers(spec.seed, spec.customers)
    reference = pd.concat([generate_day(spec, d, customers) for d in range(REFERENCE_DAYS)], ignore_index=True)
    model = fit(build_pipeline("logistic_regression", {"C": 1.0}, ds, ImputationConfig(), seed), reference, ds)
    profile = profile_frame(reference, ds, predict_scores(model, reference, ds))
    verdicts: list[WindowVerdict] = []
    for day in range(REFERENCE_DAYS, first_drift + drift_days):
        window = generate_day(spec, day, customers)
        a = assess_window(profile, window, policy, [v.status for v in verdicts], predict_scores(model, window, ds))
        verdicts.append(a.verdict)
    return verdicts


@pytest.mark.parametrize("seed", [11, 12])
def test_drift_free_windows_raise_no_alarm_and_injected_drift_is_flagged_within_k_windows(seed: int) -> None:
    persistence = load_policy(PROJECT / "configs" / "monitoring.yaml").for_dataset("churn").alarm.persistence
    verdicts = _run(seed, INJECTED_COVARIATE, drift_days=persistence)
    calm, drifted = verdicts[:CALM_DAYS], verdicts[CALM_DAYS:]
    false_alarms = [i for i, v in enumerate(calm) if v.alarm]
    why = [calm[i].reasons for i in false_alarms]
    assert len(false_alarms) <= 1, f"alarms on drift-free days {false_alarms}: {why}"
    assert all(v.status == "drift" for v in drifted), [v.reasons for v in drifted]
    assert drifted[-1].alarm, f"covariate drift {INJECTED_COVARIATE} not flagged within {persistence} windows"
    assert not any(v.data_quality_alarm for v in verdicts), "clean generated data has no data-quality problem"


def test_the_drifting_features_are_the_ones_the_generator_moves() -> None:
    (window,) = _run(13, 0.3, drift_days=1)[CALM_DAYS:]
    moved = {"tenure_months", "monthly_charges", "support_tickets_30d", "avg_session_minutes", "payment_delay_days"}
    assert set(window.drifted_features) <= moved and {"support_tickets_30d", "payment_delay_days"} <= set(
        window.drifted_features)
    assert window.prediction_drifted, "more tickets and later payments raise the model's churn probabilities"
    assert np.isclose(window.share_drifted, len(window.drifted_features) / 10)
