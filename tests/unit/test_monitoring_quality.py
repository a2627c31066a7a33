"""Data-quality counts of a window against the profile (flywheel/monitoring/quality.py), no GX here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.monitoring.config import QualitySettings
from flywheel.monitoring.profile import profile_frame
from flywheel.monitoring.quality import QualityResult, profile_quality, with_expectations
from flywheel.schemas import DatasetDefinition, FeatureSpec

DS = DatasetDefinition(name="toy", source="x", entity="id", timestamp="ts", label="y", features=[
    FeatureSpec(name="amount", type="float", min=0, max=100), FeatureSpec(name="plan", type="category")])
CFG = QualitySettings()


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    n = 2000
    amount = np.where(rng.random(n) < 0.05, np.nan, rng.uniform(10, 60, n))
    return profile_frame(pd.DataFrame({"amount": amount, "plan": rng.choice(["basic", "pro"], n)}), DS)


def _window(n: int = 1000, **cols) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    base = {"amount": rng.uniform(10, 60, n), "plan": rng.choice(["basic", "pro"], n)}
    return pd.DataFrame({**base, **cols})


def test_a_clean_window_has_no_problems(profile) -> None:
    q = profile_quality(profile, _window(), CFG)
    assert q.passed and q.problems == [] and q.rows == 1000
    amount = q.feature("amount")
    assert amount.missing_share == 0 and amount.reference_missing_share == pytest.approx(0.05, abs=0.01)
    assert amount.out_of_range == 0 and amount.outside_reference == 0


def test_missing_share_above_the_reference_by_more_than_the_limit(profile) -> None:
    n = 1000
    amount = np.where(np.arange(n) < 140, np.nan, 20.0)  # 14%: within 0.05 + 0.10
    assert profile_quality(profile, _window(amount=amount), CFG).passed
    amount = np.where(np.arange(n) < 200, np.nan, 20.0)  # 20%
    q = profile_quality(profile, _window(amount=amount), CFG)
    assert q.problems == [f"amount: 20.00% missing (reference {profile.features['amount'].missing_share:.2%}; "
                          "more than 10% above it)"]


def test_values_outside_the_declared_range_and_outside_the_reference(profile) -> None:
    amount = np.full(1000, 30.0)
    amount[:3] = [-999.0, 150.0, np.inf]  # outside [0, 100]
    amount[3:8] = 80.0  # inside the declared range, beyond the reference's max (about 60): information only
    q = profile_quality(profile, _window(amount=amount), CFG)
    f = q.feature("amount")
    assert (f.out_of_range, f.outside_reference) == (3, 8)
    assert q.problems == ["amount: 3 value(s) (0.30%) outside the dataset's range [0.0, 100.0]"]
    assert profile_quality(profile, _window(amount=amount), CFG.model_copy(update={"max_out_of_range_share": 0.01})
                           ).passed


def test_categories_the_reference_never_had(profile) -> None:
    plan = np.array(["basic"] * 985 + ["enterprise"] * 15, dtype=object)
    q = profile_quality(profile, _window(plan=plan), CFG)
    f = q.feature("plan")
    assert f.new_categories == ["enterprise"] and f.new_category_share == pytest.approx(0.015)
    assert q.problems == ["plan: 15 value(s) (1.50%) of categories the reference lacks, e.g. ['enterprise']"]


def test_a_missing_or_retyped_column_is_a_problem_not_a_crash(profile) -> None:
    q = profile_quality(profile, _window().drop(columns="plan").assign(amount=lambda d: d["amount"].astype(str)
                                                                        + " EUR"), CFG)
    assert q.problems == ["amount: not numeric in the window (numeric in the reference)",
                          "plan: column missing from the window"]
    assert not q.feature("plan").present and not q.feature("amount").numeric_ok


def test_expectation_failures_join_the_problems_once() -> None:
    base = QualityResult(rows=10, features=[])
    q = with_expectations(base, [
        {"expectation": "ExpectColumnValuesToBeBetween", "column": "amount", "unexpected_count": 2,
         "unexpected_percent": 20.0},
        {"expectation": "ExpectColumnValuesToBeInTypeList", "column": "plan", "observed_value": "int64"}])
    assert q.expectations_run and not q.passed
    assert q.problems == ["Great Expectations ExpectColumnValuesToBeBetween(amount): 2 unexpected (20.00%)",
                          "Great Expectations ExpectColumnValuesToBeInTypeList(plan): observed int64"]
