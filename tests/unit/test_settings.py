"""Config validation: valid layers load; every invalid layer fails naming the file, the key and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel.errors import ConfigError
from flywheel.schemas import load_dataset, load_gates
from flywheel.settings import load_settings


def _write(path: Path, data: object) -> None:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)


@pytest.mark.parametrize("profile", ["local", "ci", "production"])
def test_every_shipped_profile_loads(home: Path, profile: str) -> None:
    s = load_settings(profile=profile, config_dir=home / "configs", environ={})
    assert s.profile == profile
    assert s.paths.home == home.resolve()
    assert load_dataset(s.resolve(s.dataset)).name == "churn"
    gates = load_gates(s.resolve(s.evaluate.gates_file), s.evaluate.gate_overrides)
    assert (gates.latency.service_budget_ms, gates.latency.model_share_ms) == (10.0, 3.0)  # no profile relaxes it


def test_layers_merge_in_order_base_profile_env(home: Path) -> None:
    s = load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_TRAIN__SEED": "7"})
    assert s.train.search.trials == 2, "ci.yaml should override base.yaml"
    assert s.train.search.method == "random", "keys the profile does not set keep the base value"
    assert s.train.seed == 7, "FLYWHEEL_TRAIN__SEED should override both files"


def test_home_placeholder_is_resolved_in_store_urls(home: Path) -> None:
    s = load_settings(profile="local", config_dir=home / "configs", environ={})
    assert s.mlflow_tracking_uri == f"sqlite:///{home.resolve()}/data/mlflow.db"
    assert "{home}" not in s.audit_db_url


def test_unknown_key_names_the_file_and_key(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", {"train": {"serch": {"trials": 3}}})
    with pytest.raises(ConfigError) as err:
        load_settings(profile="ci", config_dir=home / "configs", environ={})
    (src, key, reason), = err.value.problems
    assert src.endswith("ci.yaml") and key == "train.serch" and "Extra inputs" in reason


def test_wrong_type_names_the_file_and_key(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", {"train": {"search": {"trials": "many"}}})
    with pytest.raises(ConfigError, match=r"ci\.yaml: train\.search\.trials: .*integer"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_out_of_bounds_value_in_base_names_base(home: Path) -> None:
    base = yaml.safe_load((home / "configs" / "base.yaml").read_text())
    base["validate"]["missing"]["max_share"] = 1.5
    _write(home / "configs" / "base.yaml", base)
    with pytest.raises(ConfigError, match=r"base\.yaml: validate\.missing\.max_share: .*less than or equal"):
        load_settings(profile="local", config_dir=home / "configs", environ={})


def test_bad_env_var_is_named(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"FLYWHEEL_TRAIN__SEARCH__METHOD: train\.search\.method"):
        load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_TRAIN__SEARCH__METHOD": "magic"})


def test_missing_profile_file_fails(home: Path) -> None:
    (home / "configs" / "ci.yaml").unlink()
    with pytest.raises(ConfigError, match=r"ci\.yaml: <root>: file not found"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_unknown_profile_fails(home: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'staging'"):
        load_settings(profile="staging", config_dir=home / "configs", environ={})


def test_malformed_yaml_fails_naming_file(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"ci\.yaml: <root>: not valid YAML"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_non_mapping_yaml_fails(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_bad_dataset_path_is_named(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"FLYWHEEL_DATASET: dataset: file not found: .*nope\.yaml"):
        load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_DATASET": "configs/nope.yaml"})


def test_search_space_for_unlisted_family_fails(home: Path) -> None:
    _write(home / "configs" / "ci.yaml", {"train": {"families": ["logistic_regression"],
                                                     "search_space": {"random_forest": {"n_estimators": [10]}}}})
    with pytest.raises(ConfigError, match="random_forest"):
        load_settings(profile="ci", config_dir=home / "configs", environ={})


def test_settings_are_frozen(settings) -> None:
    with pytest.raises(Exception, match="frozen"):
        settings.train = None  # type: ignore[misc]


# ---------------------------------------------------------------------- dataset definitions and gates


def _churn(home: Path) -> dict:
    return yaml.safe_load((home / "configs" / "datasets" / "churn.yaml").read_text())


def test_dataset_unknown_feature_type_names_key(home: Path, tmp_path: Path) -> None:
    d = _churn(home)
    d["features"][0]["type"] = "decimal"
    p = tmp_path / "bad.yaml"
    _write(p, d)
    with pytest.raises(ConfigError, match=r"bad\.yaml: features\.0\.type"):
        load_dataset(p)


def test_dataset_duplicate_features_fail(home: Path, tmp_path: Path) -> None:
    d = _churn(home)
    d["features"].append(dict(d["features"][0]))
    p = tmp_path / "dup.yaml"
    _write(p, d)
    with pytest.raises(ConfigError, match="duplicate feature names: \\['tenure_months'\\]"):
        load_dataset(p)


def test_dataset_missing_required_key(home: Path, tmp_path: Path) -> None:
    d = _churn(home)
    del d["label"]
    p = tmp_path / "nolabel.yaml"
    _write(p, d)
    with pytest.raises(ConfigError, match=r"nolabel\.yaml: label: Field required"):
        load_dataset(p)


def test_behavioral_test_on_unknown_feature_fails(home: Path, tmp_path: Path) -> None:
    d = _churn(home)
    d["behavioral"]["tests"][1]["feature"] = "zodiac_sign"
    p = tmp_path / "b.yaml"
    _write(p, d)
    with pytest.raises(ConfigError, match="unknown feature 'zodiac_sign'"):
        load_dataset(p)


def test_gates_typo_fails(home: Path) -> None:
    p = home / "configs" / "gates.yaml"
    g = yaml.safe_load(p.read_text())
    g["calibration"]["max_eec"] = 0.1
    _write(p, g)
    with pytest.raises(ConfigError, match=r"gates\.yaml: calibration\.max_eec: Extra inputs"):
        load_gates(p)


def _gates_with_baseline(home: Path, baseline: dict) -> Path:
    p = home / "configs" / "gates.yaml"
    g = yaml.safe_load(p.read_text())
    g["baseline"] = baseline
    _write(p, g)
    return p


def test_gates_baseline_kinds_load(home: Path) -> None:
    shipped = load_gates(home / "configs" / "gates.yaml").baseline
    assert (shipped.kind, shipped.max_depth, shipped.min_margin) == ("best_single_feature", 3, 0.05)
    tree = load_gates(_gates_with_baseline(home, {"kind": "shallow_tree", "min_margin": 0.03})).baseline
    assert (tree.kind, tree.max_depth, tree.min_margin) == ("shallow_tree", 2, 0.03)
    # a profile can switch the kind through evaluate.gate_overrides
    over = load_gates(home / "configs" / "gates.yaml", {"baseline": {"kind": "shallow_tree", "max_depth": 1}})
    assert (over.baseline.kind, over.baseline.max_depth) == ("shallow_tree", 1)


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"kind": "single_best_feature"}, r"baseline: Input tag 'single_best_feature' .*expected tags: "
                                          r"'best_single_feature', 'shallow_tree'"),
        ({"min_margin": 0.05}, r"baseline: Unable to extract tag using discriminator 'kind'"),
        ({"kind": "shallow_tree", "max_depth": 5}, r"baseline\.shallow_tree\.max_depth: .*less than or equal to 4"),
        ({"kind": "best_single_feature", "feature": "tenure_months"},
         r"baseline\.best_single_feature\.feature: Extra inputs"),
    ],
    ids=["unknown-kind", "no-kind", "too-deep", "unknown-key"],
)
def test_gates_bad_baseline_fails_at_load(home: Path, baseline: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"gates\.yaml: " + message):
        load_gates(_gates_with_baseline(home, baseline))


def test_bad_baseline_kind_in_a_profile_override_is_named(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.gate_overrides\.baseline: Input tag 'tree'"):
        load_gates(home / "configs" / "gates.yaml", {"baseline": {"kind": "tree"}})


def test_search_startup_trials_are_checked_against_trials(home: Path) -> None:
    def load(profile: str, startup: str | None = None):
        env = {"FLYWHEEL_TRAIN__SEARCH__STARTUP_TRIALS": startup} if startup else {}
        return load_settings(profile=profile, config_dir=home / "configs", environ=env).train.search

    shipped = load("local")
    assert (shipped.trials, shipped.startup_trials, shipped.n_startup_trials) == (4, None, 1)  # 3 of 4 modelled
    assert load("ci").n_startup_trials == 1  # ci.yaml's 2 trials: 1 random, 1 proposed by TPE
    assert load("local", "2").n_startup_trials == 2
    # ci.yaml lowers trials to 2: a start-up count of 2 would leave TPE nothing to propose
    with pytest.raises(ConfigError, match=r"STARTUP_TRIALS: train\.search\.startup_trials: .*must be smaller"):
        load("ci", "2")
