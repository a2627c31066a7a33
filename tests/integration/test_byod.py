"""Bring your own data: a second dataset, other column names and types, one CSV file, no code changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

LOANS_YAML = """
name: loans
description: Loan applications; does the applicant default?
source: data/raw/loans.csv
format: csv
entity: applicant_id
entity_type: string
timestamp: applied_at
label: status
positive_label: default
features:
  - {name: income_k, type: float, min: 0, max: 1000}
  - {name: loan_k, type: float, min: 0, max: 500}
  - {name: years_employed, type: int, min: 0, max: 60}
  - {name: has_mortgage, type: bool}
  - {name: grade, type: category, allowed: [A, B, C, D]}
  - {name: purpose, type: category, allowed: [car, home, education, other]}
slices: [grade, channel]
split: {holdout_days: 10, validation_share: 0.25}
behavioral:
  version: "loans-1"
  tests:
    - {name: empty_application, kind: minimum_functionality}
    - {name: bigger_loan_more_risk, kind: directional, feature: loan_k, delta: 100, direction: increase,
       min_share: 0.7}
"""


def _loans(n: int = 9000, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    income = rng.gamma(4, 15, n).round(1)
    loan = rng.gamma(2, 10, n).round(1)
    years = rng.integers(0, 30, n)
    grade = rng.choice(list("ABCD"), n, p=[0.3, 0.3, 0.25, 0.15])
    logit = -2.5 + 0.06 * loan - 0.03 * income - 0.04 * years + pd.Series(grade).map(
        {"A": -1.0, "B": 0.0, "C": 0.7, "D": 1.4}).to_numpy()
    status = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "default", "repaid")
    applied = pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(np.sort(rng.integers(0, 60 * 86400, n)), "s")
    return pd.DataFrame({
        "applicant_id": [f"APP-{i:06d}" for i in range(n)],
        "applied_at": applied,
        "income_k": income,
        "loan_k": loan,
        "years_employed": years,
        "has_mortgage": rng.random(n) < 0.4,
        "grade": grade,
        "purpose": rng.choice(["car", "home", "education", "other"], n),
        "channel": rng.choice(["web", "branch"], n),
        "status": status,
    })


def test_own_dataset_runs_the_whole_pipeline(tmp_path: Path) -> None:
    from flows.training import TrainingParams, training_pipeline

    home = make_home(tmp_path)
    (home / "data" / "raw").mkdir(parents=True)
    _loans().to_csv(home / "data" / "raw" / "loans.csv", index=False)
    (home / "configs" / "datasets" / "loans.yaml").write_text(LOANS_YAML)

    state = training_pipeline(
        TrainingParams(profile="ci", config_dir=str(home / "configs"), dataset="configs/datasets/loans.yaml"),
        return_state=True,
    )

    assert state.is_completed(), state.message
    result = state.result()
    assert result.model_name == "loans"
    assert result.feature_service.startswith("loans_")
    assert result.outcome == "champion", f"gates failed on a learnable dataset: {result.failed_rules}"
