"""The CLI: bad input fails with a clear message and exit code 2, good input does its job."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from flywheel.cli import app

runner = CliRunner()


def test_data_generate_writes_batches(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--days", "2", "--rows-per-day", "30",
                              "--missing", "monthly_charges=0.5", "--rename", "region=area"])
    assert res.exit_code == 0, res.output
    files = sorted(tmp_path.glob("batch_*.parquet"))
    assert len(files) == 2
    df = pd.read_parquet(files[0])
    assert len(df) == 30 and "area" in df.columns and "region" not in df.columns


def test_data_generate_rejects_malformed_pair(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--days", "1", "--missing", "oops"])
    assert res.exit_code == 2
    assert "--missing expects KEY=VALUE, got 'oops'" in res.output
    assert not list(tmp_path.iterdir()), "nothing written on bad input"


def test_data_generate_rejects_unknown_fault_column(tmp_path: Path) -> None:
    res = runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--days", "1", "--rename", "nope=x"])
    assert res.exit_code == 2 and "unknown column 'nope'" in res.output


def test_data_generate_rejects_bad_format_and_date(tmp_path: Path) -> None:
    assert runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--format", "xlsx"]).exit_code == 2
    res = runner.invoke(app, ["data", "generate", "--out", str(tmp_path), "--start", "31/01/2026"])
    assert res.exit_code == 2 and "Invalid isoformat" in res.output


def test_config_show_and_schema(home: Path) -> None:
    res = runner.invoke(app, ["config", "show", "--config-dir", str(home / "configs"), "--profile", "ci"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["train"]["search"]["trials"] == 2
    schema = json.loads(runner.invoke(app, ["config", "show", "--schema"]).stdout)
    assert "train" in schema["properties"] and "validate" in schema["properties"]


def test_config_show_names_bad_key(home: Path) -> None:
    (home / "configs" / "ci.yaml").write_text("trian: {}\n")
    res = runner.invoke(app, ["config", "show", "--config-dir", str(home / "configs"), "--profile", "ci"])
    assert res.exit_code == 2 and "ci.yaml: trian: Extra inputs are not permitted" in res.output
