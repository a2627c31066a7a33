"""The model card: every section present, values rendered, the version placeholder filled later."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.modelcard import VERSION_PLACEHOLDER, fill_version, render_model_card
from flywheel.schemas import DatasetDefinition, load_dataset

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def churn() -> DatasetDefinition:
    return load_dataset(PROJECT / "configs/datasets/churn.yaml")


def _card(dataset: DatasetDefinition, version: str | None = "3") -> str:
    return render_model_card(
        "churn",
        version,
        dataset,
        "churn_features_v1",
        {"family": "hist_gradient_boosting", "learning_rate": 0.1, "weights": {"a": 1}},
        {"roc_auc": 0.81234, "ece": 0.031},
        {"region=north": {"rows": 410.0, "roc_auc": 0.8}, "region=south": {"rows": 20.0, "roc_auc": float("nan")}},
        "**Verdict: PASSED** (every gated rule passed)\n\n| rule | value |\n|---|---|\n| primary | 0.81 |",
        {"flywheel.git_sha": "abc123", "flywheel.data_hash": "f" * 64},
        ["Synthetic data only.", "Not for pricing | credit decisions."],
    )


def test_card_has_every_section(churn: DatasetDefinition) -> None:
    card = _card(churn)
    assert card.startswith("# Model card: churn v3\n")
    for heading in ("Intended use", "Data", "Features", "Training parameters", "Metrics (holdout)",
                    "Metrics per slice", "Gates", "Lineage", "Limitations"):  # fmt: skip
        assert f"\n## {heading}\n" in card, heading


def test_card_content(churn: DatasetDefinition) -> None:
    card = _card(churn)
    # features with their types and domains
    assert "| tenure_months | int | no | [0, 240] |" in card
    assert "| contract_type | category | yes | monthly, annual, two_year |" in card
    assert "churn_features_v1" in card
    assert "| roc_auc | 0.8123 |" in card
    assert "| region=north | 0.8000 | 410.0000 |" in card and "| region=south | n/a |" in card
    assert "**Verdict: PASSED**" in card
    assert "| flywheel.git_sha | abc123 |" in card
    assert '| weights | {"a": 1} |' in card
    assert "- Not for pricing \\| credit decisions." not in card  # list items are not table cells
    assert "- Not for pricing | credit decisions." in card
    assert "churned" in card and "yes" in card and "age_group" in card  # label, positive class, protected


def test_version_placeholder_is_filled_after_registration(churn: DatasetDefinition) -> None:
    draft = _card(churn, version=None)
    assert VERSION_PLACEHOLDER in draft
    assert fill_version(draft, "7") == _card(churn, version="7")


def test_empty_sections_say_so(churn: DatasetDefinition) -> None:
    card = render_model_card("churn", "1", churn, "svc", {}, {}, {}, "", {}, [])
    assert "(no slices)" in card and "(no gate report)" in card and "- none recorded" in card


def test_feature_importance_column(churn: DatasetDefinition) -> None:
    card = render_model_card(
        "churn", "1", churn, "svc", {}, {}, {}, "", {}, [], feature_importance={"tenure_months": 0.12}
    )
    assert "Permutation importance (holdout)" in card
    assert "| tenure_months | int | no | [0, 240] |  | 0.1200 |" in card
    assert "| region | category | no | north, south, east, west |  | n/a |" in card


def test_write_model_card_task_reads_the_training_result(churn: DatasetDefinition) -> None:
    from types import SimpleNamespace

    from flywheel.schemas import GateReport, GateResult
    from tasks.register import write_model_card

    trained = SimpleNamespace(
        family="random_forest",
        params={"max_depth": 6},
        metric="roc_auc",
        trials=4,
        holdout_metrics={"roc_auc": 0.77},
        slice_metrics={"region=north": {"rows": 300.0, "roc_auc": None}},
        feature_importance={"tenure_months": 0.2},
    )
    report = GateReport(results=[GateResult(rule="primary", value=0.77, threshold=">= 0.6", passed=True)])
    card = write_model_card.fn("churn", churn, "churn_v1", trained, report, {"flywheel.as_of": "2026-01-15"})
    assert card.startswith(f"# Model card: churn v{VERSION_PLACEHOLDER}")
    assert "| family | random_forest |" in card and "| max_depth | 6 |" in card and "| search_trials | 4 |" in card
    assert "| roc_auc | 0.7700 |" in card and "| region=north | n/a | 300.0000 |" in card
    assert "Verdict: PASSED" in card and "2026-01-15" in card and "age_group" in card
