"""configs/monitoring.yaml and the settings' `monitor` section: valid files load, invalid ones fail naming
the file, the key and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel.errors import ConfigError
from flywheel.monitoring.config import DatasetPolicy, MonitoringPolicy, load_policy
from flywheel.settings import load_settings
from tests.conftest import PROJECT


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_policy_loads_with_churns_key_features() -> None:
    policy = load_policy(PROJECT / "configs" / "monitoring.yaml")
    churn = policy.for_dataset("churn")
    assert churn.alarm.key_features == ["support_tickets_30d", "payment_delay_days"]
    assert (churn.alarm.min_rows, churn.alarm.persistence, churn.alarm.drift_share) == (500, 2, 0.5)
    assert policy.for_dataset("loans") == policy.defaults, "a dataset without a section gets the defaults"
    assert policy.defaults.drift.numeric.method == "auto" and policy.defaults.quality.great_expectations


def test_settings_point_at_the_policy_file_and_an_env_variable_moves_it(home: Path) -> None:
    s = load_settings(profile="ci", config_dir=home / "configs", environ={})
    assert s.resolve(s.monitor.policy_file) == (home / "configs" / "monitoring.yaml").resolve()
    moved = load_settings(profile="ci", config_dir=home / "configs",
                          environ={"FLYWHEEL_MONITOR__POLICY_FILE": "configs/other.yaml"})
    assert moved.monitor.policy_file == Path("configs/other.yaml")


def test_an_unknown_monitor_setting_fails_naming_the_file(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", {"monitor": {"policy_fle": "x.yaml"}})
    with pytest.raises(ConfigError, match=r"ci\.yaml: monitor\.policy_fle: Extra inputs are not permitted"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_a_dataset_section_is_laid_over_the_defaults_key_by_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", {"defaults": {"alarm": {"persistence": 3, "min_rows": 100}},
                                        "datasets": {"loans": {"alarm": {"min_rows": 50},
                                                               "drift": {"columns": {"income": {"method": "psi"}}}}}})
    loans = load_policy(path).for_dataset("loans")
    assert (loans.alarm.min_rows, loans.alarm.persistence) == (50, 3)
    assert loans.drift.columns["income"].method == "psi"


@pytest.mark.parametrize(("data", "key", "reason"), [
    ({"defaults": {"alarm": {"persistance": 2}}}, "defaults.alarm.persistance", "Extra inputs"),
    ({"defaults": {"drift": {"numeric": {"method": "hellinger"}}}}, "defaults.drift.numeric.method", "Input should be"),
    ({"defaults": {"alarm": {"drift_share": 0}}}, "defaults.alarm.drift_share", "greater than 0"),
    ({"defaults": {"alarm": {"fdr": 1.5}}}, "defaults.alarm.fdr", "less than 1"),
    ({"defaults": {"drift": {"columns": {"x": {"method": "ks", "threshold": 5}}}}}, "defaults.drift.columns.x",
     "threshold must be below 1"),
    ({"defaults": {"drift": {"numeric": {"method": "chisquare"}}}}, "defaults.drift", "categorical columns only"),
    ({"defaults": {"drift": {"psi_bins": 7}}}, "defaults.drift", "must divide 1000"),
    ({"datasets": {"churn": {"alarms": {}}}}, "datasets", "churn.alarms: not a section"),
    ({"datasets": {"churn": {"alarm": {"persistence": 0}}}}, "datasets", "churn.alarm.persistence: Input should"),
])
def test_invalid_policies_fail_naming_file_key_and_reason(tmp_path: Path, data: dict, key: str, reason: str) -> None:
    path = _write(tmp_path / "monitoring.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    src, where, why = err.value.problems[0]
    assert src == str(path) and where == key and reason in why, err.value.problems


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"monitoring\.yaml: <root>: file not found"):
        load_policy(tmp_path / "monitoring.yaml")


def test_policy_columns_are_checked_against_the_profiles_features() -> None:
    policy = MonitoringPolicy.model_validate({"defaults": {
        "alarm": {"key_features": ["tenure", "nope"]},
        "drift": {"columns": {"ghost": {"method": "psi"}, "region": {"method": "ks"}, "tenure": {"method": "z"}}}}})
    with pytest.raises(ConfigError) as err:
        policy.defaults.check_columns(["tenure"], ["region"], "m.yaml")
    keys = [k for _, k, _ in err.value.problems]
    assert keys == ["alarm.key_features", "drift.columns.ghost", "drift.columns.region.method",
                    "drift.columns.tenure.method"], err.value.problems
    DatasetPolicy().check_columns(["tenure"], ["region"], "m.yaml")  # nothing named: nothing to complain about
