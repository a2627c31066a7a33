"""Parity with Evidently: the project's per-column verdicts from the profile equal a full Evidently 0.7
DataDriftPreset run on the same frames (real Evidently, verdicts read from the snapshot's tests).

Generated frames: references of 5k-20k rows, windows of 2k-5k, columns of ten shapes, some shifted and
some not. A column whose score lies within BAND (0.002) of its threshold on either side is left out of the
verdict comparison (a quantile profile's Wasserstein distance is within 0.001 of scipy's) and counted.
"""

from __future__ import annotations

import pytest

from flywheel.monitoring.config import DriftSettings
from flywheel.monitoring.drift import drift_from_profile
from flywheel.monitoring.profile import profile_frame
from tests.benchmarks.bench_monitoring import (
    BAND,
    EVIDENTLY_NAMES,
    compare,
    dataset_for,
    evidently_verdicts,
    make_frames,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = [(5_000, 2_000, 0), (10_000, 3_000, 1), (20_000, 5_000, 2), (8_000, 4_000, 3)]
NEAR_THRESHOLD: dict[tuple[int, int, int], list[str]] = {}


def _ours(reference, current, numeric, categorical) -> dict[str, dict]:
    profile = profile_frame(reference, dataset_for(numeric, categorical))
    drift = drift_from_profile(profile, current, DriftSettings())
    return {c.column: {"method": c.method, "score": c.score, "threshold": c.threshold, "drifted": c.drifted}
            for c in drift.columns}


@pytest.mark.parametrize(("reference_rows", "current_rows", "seed"), CASES)
def test_verdicts_equal_evidentlys_data_drift_preset(reference_rows: int, current_rows: int, seed: int) -> None:
    reference, current, numeric, categorical = make_frames(reference_rows, current_rows, 20, seed)
    ours = _ours(reference, current, numeric, categorical)
    theirs = evidently_verdicts(reference, current, numeric, categorical)
    result = compare(ours, theirs)
    NEAR_THRESHOLD[(reference_rows, current_rows, seed)] = result["within_band"]
    assert result["method_differs"] == [], "the same test is chosen for every column"
    assert result["disagreements"] == [], {c: (ours[c], theirs[c]) for c in result["disagreements"]}
    assert 0 < len(result["drifted"]) < len(ours), "the case mixes drifted and stable columns"
    assert len(result["within_band"]) <= 2, f"{result['within_band']} scored within {BAND} of the threshold"
    assert result["max_score_diff"] < BAND, "every score, not only every verdict, is Evidently's within the band"


def test_small_reference_p_value_tests_equal_evidentlys() -> None:
    # <= 1000 reference rows: KS, chi-square and Z-test; the profile holds such references exactly
    reference, current, numeric, categorical = make_frames(800, 1500, 20, 7)
    ours = _ours(reference, current, numeric, categorical)
    theirs = evidently_verdicts(reference, current, numeric, categorical)
    result = compare(ours, theirs, band=0.0)
    assert {o["method"] for o in ours.values()} == {"ks", "chisquare", "z"}
    assert result["method_differs"] == [] and result["disagreements"] == []
    assert result["max_score_diff"] < 1e-9, "exact profiles give Evidently's p-values"
    assert set(EVIDENTLY_NAMES) >= {o["method"] for o in ours.values()}
