"""The shared statistics (flywheel/stats.py): PSI, used by the rollout guard and monitoring, and BH."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel import rollout, stats


def test_rollout_uses_the_shared_psi() -> None:
    assert rollout.psi is stats.psi, "one PSI implementation, imported by the rollout guards"


def test_psi_of_a_sample_against_itself_is_zero_and_grows_with_the_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 50_000)
    assert stats.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    small, large = stats.psi(ref, rng.normal(0.1, 1, 50_000)), stats.psi(ref, rng.normal(0.5, 1, 50_000))
    assert 0 < small < large


def test_psi_of_a_03_sigma_shift_is_about_009_where_it_stays_under_01() -> None:
    # the figure configs/monitoring.yaml quotes against the Wasserstein distance (0.30)
    rng = np.random.default_rng(1)
    value = stats.psi(rng.normal(0, 1, 200_000), rng.normal(0.3, 1, 200_000))
    assert 0.08 < value < 0.1


def test_psi_from_shares_is_the_formula_with_epsilon() -> None:
    e, a = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    eps = stats.PSI_EPSILON
    want = sum((x + eps - (y + eps)) * np.log((x + eps) / (y + eps)) for x, y in zip(a, e, strict=True))
    assert stats.psi_from_shares(e, a) == pytest.approx(want)


def test_psi_bin_edges_open_the_outer_bins_and_drop_repeats() -> None:
    edges = stats.psi_bin_edges(np.array([0.0, 1.0, 1.0, 2.0, 3.0]))
    assert edges.tolist() == [-np.inf, 1.0, 2.0, np.inf]
    assert stats.psi_bin_edges(np.array([4.0, 4.0])).tolist() == [-np.inf, np.inf]


def test_benjamini_hochberg_step_up() -> None:
    # m = 5, q = 0.05: rank thresholds 0.01, 0.02, 0.03, 0.04, 0.05. Sorted: 0.001 (passes), 0.025 (above
    # 0.02), 0.028 (passes 0.03), 0.045 (above 0.04), 0.3. The largest passing rank is 3, so the three
    # smallest are rejected, 0.025 included (step-up), and 0.045 is not although it is below q
    p = [0.045, 0.001, 0.025, 0.3, 0.028]
    assert stats.benjamini_hochberg(p, 0.05) == [False, True, True, False, True]
    assert stats.benjamini_hochberg([0.2, 0.3], 0.05) == [False, False]
    assert stats.benjamini_hochberg([], 0.05) == []


def test_benjamini_hochberg_is_stricter_than_each_test_alone() -> None:
    p = [0.03] * 3 + [0.9] * 17  # three tests "significant" alone at 0.05, not after the correction
    assert not any(stats.benjamini_hochberg(p, 0.05))


def test_benjamini_hochberg_rejects_a_bad_q() -> None:
    with pytest.raises(ValueError, match="q must be in"):
        stats.benjamini_hochberg([0.1], 1.5)
