"""`flywheel monitor` input checks that need no store: bad input exits 2 and says what to fix."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.datagen import GeneratorSpec, generate

runner = CliRunner()


def _batch(home: Path) -> Path:
    (_, frame), = generate(GeneratorSpec(seed=1, days=1, rows_per_day=50))
    path = home / "data" / "batch.parquet"
    frame.to_parquet(path)
    return path


def _monitor(home: Path, *args: str):
    return runner.invoke(app, ["monitor", "--profile", "ci", "--config-dir", str(home / "configs"), "--no-report",
                               *args])


def test_a_missing_batch_or_reference_file_is_named(home: Path) -> None:
    res = _monitor(home, "--current", str(home / "nope.parquet"), "--reference-data", str(home / "ref.parquet"))
    assert res.exit_code == 2 and "current batch file not found" in res.output and "nope.parquet" in res.output
    res = _monitor(home, "--current", str(_batch(home)), "--reference-data", str(home / "ref.parquet"))
    assert res.exit_code == 2 and "reference data file not found" in res.output


def test_a_file_that_is_not_a_batch_is_refused(home: Path) -> None:
    junk = home / "data" / "junk.parquet"
    junk.write_text("not parquet")
    res = _monitor(home, "--current", str(junk), "--reference-data", str(junk))
    assert res.exit_code == 2 and "cannot read current batch file" in res.output


def test_an_invalid_policy_file_fails_naming_the_key(home: Path) -> None:
    policy = home / "configs" / "monitoring.yaml"
    data = yaml.safe_load(policy.read_text())
    data["defaults"]["alarm"]["persistence"] = 0
    policy.write_text(yaml.safe_dump(data))
    res = _monitor(home, "--current", str(_batch(home)), "--reference-data", str(_batch(home)))
    assert res.exit_code == 2, res.output
    assert "defaults.alarm.persistence" in res.output and "greater than or equal to 1" in res.output


def test_a_key_feature_the_dataset_lacks_is_a_config_error(home: Path) -> None:
    policy = home / "configs" / "monitoring.yaml"
    data = yaml.safe_load(policy.read_text())
    data["datasets"]["churn"]["alarm"]["key_features"] = ["tenure_months", "shoe_size"]
    policy.write_text(yaml.safe_dump(data))
    res = _monitor(home, "--current", str(_batch(home)), "--reference-data", str(_batch(home)))
    assert res.exit_code == 2 and "alarm.key_features: 'shoe_size' is not a feature" in res.output


def test_a_judged_batch_is_recorded_at_the_project_clocks_time(home: Path) -> None:
    """The loop's liveness compares `judged_at` with the project clock: `flywheel monitor` records it on that
    clock (a simulated one years from the wall's here), not on the wall's."""
    from datetime import UTC, datetime, timedelta

    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.settings import load_settings

    sim = datetime(2031, 3, 1, tzinfo=UTC)
    env = {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": sim.isoformat(),
           "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400", "FLYWHEEL_CLOCK__ANCHOR": datetime.now(UTC).isoformat()}
    batch = _batch(home)
    res = runner.invoke(app, ["monitor", "--profile", "ci", "--config-dir", str(home / "configs"), "--no-report",
                              "--current", str(batch), "--reference-data", str(batch)], env=env)
    assert res.exit_code == 0, res.output
    history = MonitoringHistory(load_settings("ci", home / "configs", environ={}).audit_db_url)
    try:
        judged = history.last_judged("churn")
    finally:
        history.close()
    assert judged is not None and sim <= judged < sim + timedelta(minutes=10), f"judged_at {judged}"
