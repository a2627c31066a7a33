"""CLI entry points that reach the stores: bad input fails closed with a clear message, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app

pytestmark = [pytest.mark.integration]
runner = CliRunner()


def _args(home: Path) -> list[str]:
    return ["--profile", "ci", "--config-dir", str(home / "configs")]


def test_train_with_missing_dataset_file_names_it(home: Path) -> None:
    res = runner.invoke(app, ["train", "--dataset", str(home / "nope.yaml"), *_args(home)])
    assert res.exit_code == 2, res.output
    assert "nope.yaml" in res.output and "file not found" in res.output


def test_train_with_no_data_says_so(home: Path) -> None:
    res = runner.invoke(app, ["train", *_args(home)])
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.output and "incoming" in res.output


def test_reproduce_unknown_version_fails_clearly(home: Path) -> None:
    res = runner.invoke(app, ["reproduce", "churn", "99", *_args(home)])
    assert res.exit_code == 2, res.output
    assert "no registered version churn v99" in res.output


def test_feature_apply_and_materialize(home: Path) -> None:
    from flywheel.datagen import GeneratorSpec, generate
    from flywheel.featurestore import ingest_batch
    from flywheel.schemas import load_dataset

    ds = load_dataset(home / "configs" / "datasets" / "churn.yaml")
    for day, df in generate(GeneratorSpec(seed=1, days=2, rows_per_day=50, customers=100)):
        ingest_batch(df, ds, home / "data" / "offline", f"batch_{day}")
    res = runner.invoke(app, ["feature", "apply", *_args(home)])
    assert res.exit_code == 0, res.output
    assert "feature service churn_" in res.output
    res = runner.invoke(app, ["feature", "materialize", *_args(home)])
    assert res.exit_code == 0, res.output
    assert "full" in res.output
    res = runner.invoke(app, ["feature", "materialize", *_args(home)])
    assert "up-to-date" in res.output, "nothing arrived since the first load"


def test_feature_apply_with_bad_dataset_definition(home: Path) -> None:
    bad = home / "configs" / "datasets" / "bad.yaml"
    bad.write_text("name: Bad Name\nsource: x\nentity: id\ntimestamp: t\nlabel: y\nfeatures: []\n")
    res = runner.invoke(app, ["feature", "apply", "--dataset", str(bad), *_args(home)])
    assert res.exit_code == 2
    assert "bad.yaml: name" in res.output and "bad.yaml: features" in res.output
