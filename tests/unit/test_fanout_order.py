"""The order trials are submitted to Dask in: longest expected first (results come back in plan order, checked
against the serial search in tests/integration/test_search_dask.py)."""

from __future__ import annotations

from tasks.fanout import expected_cost


def test_longer_boosting_runs_are_expected_to_cost_more() -> None:
    short = expected_cost("hist_gradient_boosting", {"max_iter": 50, "max_depth": 3})
    longer = expected_cost("hist_gradient_boosting", {"max_iter": 100, "max_depth": 3})
    deeper = expected_cost("hist_gradient_boosting", {"max_iter": 100, "max_depth": 7})
    assert short < longer < deeper


def test_a_logistic_regression_sorts_after_a_long_boosting_run() -> None:
    configs = [("logistic_regression", {"C": 1.0}), ("hist_gradient_boosting", {"max_iter": 100, "max_depth": 7}),
               ("random_forest", {"n_estimators": 300})]
    ordered = sorted(configs, key=lambda c: -expected_cost(*c))
    assert [f for f, _ in ordered] == ["random_forest", "hist_gradient_boosting", "logistic_regression"]


def test_trials_go_longest_first_and_each_once() -> None:
    from tasks.fanout import longest_first

    configs = [("logistic_regression", {"C": c}) for c in (0.1, 1.0, 10.0)] + [
        ("hist_gradient_boosting", {"max_iter": m, "max_depth": d}) for m in (50, 100) for d in (3, 7)]
    order = longest_first(configs)
    assert sorted(order) == list(range(len(configs)))
    assert order[0] == 6, "the longest trial (100 iterations, depth 7) goes first"
    assert order[-3:] == [0, 1, 2], "the logistic regressions last, in plan order"
    assert longest_first([]) == []


def test_a_short_boosting_run_sorts_before_a_logistic_regression() -> None:
    """With the preprocessing shared, a logistic regression's trial is a fraction of the shortest boosting run's
    (at 1M rows: 0.4 s against 4 s); submitted last, it fills a gap instead of leaving one."""
    assert expected_cost("hist_gradient_boosting", {"max_iter": 50, "max_depth": 3}) > \
        expected_cost("logistic_regression", {"C": 1.0})
