"""configs/triggers.yaml, the notify and clock settings: the shipped files load; each invalid one fails
naming the file, the key and why. And the clock: wall by default, simulated days in seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from flywheel.clock import ManualClock, SimulatedClock, WallClock, build_clock
from flywheel.errors import ConfigError
from flywheel.settings import load_settings
from flywheel.trigger_policy import TriggerPolicy, check_cron, deployment_schedules, load_policy, parse_duration


def _policy_file(home: Path) -> Path:
    return home / "configs" / "triggers.yaml"


def _edit(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_shipped_policy_loads_with_the_documented_defaults(home: Path) -> None:
    s = load_settings(profile="ci", config_dir=home / "configs", environ={})
    policy = load_policy(s.resolve(s.triggers.policy_file))
    assert policy.discipline.cooldown == timedelta(hours=6)
    assert policy.schedules.monitoring.cron == "0 * * * *" and policy.schedules.monitoring.active
    assert policy.schedules.training.active is False, "weekly training is off by default"
    assert policy.rules.model_stale.max_age == timedelta(days=30)
    assert policy.liveness.monitoring_max_silence == timedelta(hours=3)
    # the one deliberate departure from the code's defaults: the shipped drift rule retrains on served features
    assert policy.rules.drift_detected.training_source == "served_features"
    assert all(getattr(policy.rules, k).training_source is None for k in
               ("performance_degraded", "volume_reached", "model_stale")), "the others: the dataset's own source"
    shipped = policy.rules.model_copy(update={"drift_detected": TriggerPolicy().rules.drift_detected})
    assert policy.model_copy(update={"rules": shipped}) == TriggerPolicy(), \
        "otherwise the file states the code's defaults: one story in both"


def test_batch_scoring_keeps_one_cron_source(home: Path) -> None:
    s = load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_BATCH__CRON": "15 1 * * *"})
    schedules = deployment_schedules(load_policy(s.resolve(s.triggers.policy_file)), s.batch.cron)
    assert schedules["batch-scoring"].cron == "15 1 * * *", "batch scoring runs on batch.cron"
    assert set(schedules) == {"monitoring", "materialization", "batch-scoring", "training"}
    assert schedules["training"].cron == "0 3 * * 1" and not schedules["training"].active


def test_a_cron_for_batch_scoring_in_the_policy_is_refused_pointing_at_the_setting(home: Path) -> None:
    _edit(_policy_file(home), lambda d: d["schedules"]["batch_scoring"].update(cron="0 2 * * *"))
    with pytest.raises(ConfigError, match=r"triggers\.yaml: schedules\.batch_scoring: .*batch\.cron"):
        load_policy(_policy_file(home))


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (lambda d: d["rules"]["drift_detected"].update(enabld=True), "rules.drift_detected.enabld", "Extra inputs"),
        (lambda d: d["rules"]["performance_degraded"].update(metric="f2"), "rules.performance_degraded.metric",
         "roc_auc"),
        (lambda d: d["rules"]["performance_degraded"].update(min_value=1.5), "rules.performance_degraded.min_value",
         "less than or equal to 1"),
        (lambda d: d["rules"]["volume_reached"].update(min_new_labelled_rows=0),
         "rules.volume_reached.min_new_labelled_rows", "greater than or equal to 1"),
        (lambda d: d["rules"]["model_stale"].update(max_age="30 days"), "rules.model_stale.max_age",
         "is not a duration"),
        (lambda d: d["rules"]["model_stale"].update(max_age="0d"), "rules.model_stale.max_age", "positive"),
        (lambda d: d["discipline"].update(cooldown="-1h"), "discipline.cooldown", "not a duration"),
        (lambda d: d["discipline"].update(cooldown=-5), "discipline.cooldown", "must not be negative"),
        (lambda d: d["liveness"].update(outcomes_max_silence=0), "liveness.outcomes_max_silence", "positive"),
        (lambda d: d["schedules"]["monitoring"].update(cron="0 * * *"), "schedules.monitoring.cron", "5 fields"),
        (lambda d: d["schedules"]["training"].update(cron="0 25 * * 1"), "schedules.training.cron",
         "hour '25' is not in 0-23"),
        (lambda d: d["schedules"]["training"].update(cron="0 3 * * 5-1"), "schedules.training.cron",
         "runs backwards"),
        (lambda d: d.update(rule={}), "rule", "Extra inputs"),
        (lambda d: d["rules"]["drift_detected"].update(training_source="prediction_log"),
         "rules.drift_detected.training_source", "'offline_store' or 'served_features'"),
        (lambda d: d["rules"]["volume_reached"].update(training_source=True),
         "rules.volume_reached.training_source", "'offline_store' or 'served_features'"),
        # an explicit request names no evidence: it trains on the dataset's own source, and says so by refusing
        (lambda d: d["rules"]["retrain_requested"].update(training_source="served_features"),
         "rules.retrain_requested.training_source", "Extra inputs"),
    ],
)
def test_invalid_policy_names_the_file_key_and_reason(home: Path, change, key: str, reason: str) -> None:
    _edit(_policy_file(home), change)
    with pytest.raises(ConfigError) as err:
        load_policy(_policy_file(home))
    problems = err.value.problems
    assert any(src.endswith("triggers.yaml") and k == key and reason in why for src, k, why in problems), problems


def test_missing_policy_file_fails_at_settings_load(home: Path) -> None:
    _policy_file(home).unlink()
    with pytest.raises(ConfigError, match=r"triggers\.policy_file: file not found: .*triggers\.yaml"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


@pytest.mark.parametrize("expr", ["0 * * * *", "*/15 2-4 1,15 jan-jun mon-fri", "30 3 * * 7", "0 0 1 */3 *"])
def test_valid_cron_expressions(expr: str) -> None:
    assert check_cron(expr) == expr


@pytest.mark.parametrize(("text", "expected"), [("90s", 90), ("15m", 900), ("6h", 21600), ("30d", 2592000),
                                                 ("1w", 604800), (3600, 3600), ("1.5h", 5400)])
def test_durations(text, expected: float) -> None:
    assert parse_duration(text).total_seconds() == expected


# ------------------------------------------------------------------------------------- notify, clock


def test_notify_targets_load_and_name_only_the_secrets_variable(home: Path) -> None:
    env = {"FLYWHEEL_NOTIFY__TARGETS": '[{"url": "https://alerts.example.com/h", "secret_env": "ALERTS_SECRET"}]'}
    s = load_settings(profile="ci", config_dir=home / "configs", environ=env)
    assert [t.secret_env for t in s.notify.targets] == ["ALERTS_SECRET"] and s.notify.attempts == 3


@pytest.mark.parametrize(
    ("target", "reason"),
    [({"url": "ftp://x", "secret_env": "S"}, "not an http"),
     ({"url": "https://x", "secret_env": "MY-SECRET"}, "not an environment variable name"),
     ({"url": "https://x", "secret_env": "FLYWHEEL_ALERTS"}, "FLYWHEEL_\\* variables are settings keys"),
     ({"url": "https://x"}, "Field required"),
     ({"url": "https://x", "secret_env": "S", "secret": "hunter2"}, "Extra inputs")],
)
def test_invalid_notify_target_is_named(home: Path, target: dict, reason: str) -> None:
    (home / "configs" / "ci.yaml").write_text(yaml.safe_dump({"notify": {"targets": [target]}}))
    with pytest.raises(ConfigError, match=rf"ci\.yaml: notify\.targets\.0\.?.*: .*{reason}"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_clock_is_wall_by_default_and_simulated_by_config(home: Path) -> None:
    s = load_settings(profile="ci", config_dir=home / "configs", environ={})
    assert isinstance(build_clock(s.clock), WallClock)
    env = {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": "2026-03-01T00:00:00Z",
           "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "2", "FLYWHEEL_CLOCK__ANCHOR": "2026-12-02T10:00:00Z"}
    s = load_settings(profile="ci", config_dir=home / "configs", environ=env)
    wall = datetime(2026, 12, 2, 10, 0, 10, tzinfo=UTC)  # 10 wall seconds after the anchor
    clock = build_clock(s.clock, wall=lambda: wall)
    assert clock.now() == datetime(2026, 3, 6, tzinfo=UTC), "2 s per day: 10 s are 5 days"


def test_simulated_clock_without_a_timezone_is_refused(home: Path) -> None:
    env = {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": "2026-03-01 00:00:00",
           "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "2"}
    with pytest.raises(ConfigError, match=r"FLYWHEEL_CLOCK__START: clock\.start: .*timezone"):
        load_settings(profile="ci", config_dir=home / "configs", environ=env)


def test_simulated_and_manual_clocks() -> None:
    walls = iter([datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)])
    clock = SimulatedClock(datetime(2026, 3, 1, tzinfo=UTC), seconds_per_day=1.0, wall=lambda: next(walls))
    assert clock.now() == datetime(2026, 3, 4, tzinfo=UTC), "anchored when built: 3 wall seconds are 3 days"
    manual = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    assert manual.advance(timedelta(hours=7)) == manual.now() == datetime(2026, 3, 1, 7, tzinfo=UTC)
    with pytest.raises(ValueError, match="seconds_per_day"):
        SimulatedClock(datetime(2026, 3, 1, tzinfo=UTC), seconds_per_day=0)


def test_prefect_yaml_schedules_agree_with_the_policy(home: Path) -> None:
    """deployments/prefect.yaml is static (`prefect deploy` reads it): its schedules must say what the policy says."""
    from tests.conftest import PROJECT

    s = load_settings(profile="ci", config_dir=home / "configs", environ={})
    wanted = deployment_schedules(load_policy(s.resolve(s.triggers.policy_file)), s.batch.cron)
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    checked = []
    for dep in spec["deployments"]:
        if dep["name"] in wanted and dep.get("schedules"):
            (sched,) = dep["schedules"]
            want = wanted[dep["name"]]
            assert (sched["cron"], sched.get("active", True)) == (want.cron, want.active), dep["name"]
            checked.append(dep["name"])
    assert {"training", "batch-scoring", "monitoring", "materialization"} <= set(checked)
