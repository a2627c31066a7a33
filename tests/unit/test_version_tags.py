"""The model version's own tags: the few the code reads back from the version (not from its run)."""

from __future__ import annotations

from flywheel.registry import TAG_TRIGGER
from flywheel.serving import TAG_FEATURE_SERVICE
from tasks.register import version_tags


def test_the_trigger_reaches_the_version_where_the_rollout_reads_it() -> None:
    lineage = {TAG_FEATURE_SERVICE: "churn_ab12", "flywheel.family": "logistic_regression",
               "flywheel.data_hash": "3ed33126d3c107f9e53e923a", TAG_TRIGGER: "drift_detected",
               "flywheel.train_config": "{...}", "flywheel.as_of": "2026-12-03T00:00:00+00:00"}
    assert version_tags(lineage) == {TAG_FEATURE_SERVICE: "churn_ab12", "flywheel.family": "logistic_regression",
                                     "flywheel.data_hash": "3ed33126d3c1", TAG_TRIGGER: "drift_detected"}


def test_a_run_started_by_hand_has_no_trigger_tag() -> None:
    assert TAG_TRIGGER not in version_tags({TAG_FEATURE_SERVICE: "churn_ab12"})
