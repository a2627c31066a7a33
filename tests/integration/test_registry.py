"""Model registry against a real MLflow (SQLite + local artifacts in tmp): skops allow-list, digests,
safe loading, audited alias moves, rejection, model card, and the register_model task's outcomes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import KNNImputer, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from flywheel import registry as reg
from flywheel.audit import AuditLog
from flywheel.errors import ModelIntegrityError, RegistryError
from flywheel.registry import ALLOWED_TYPES, Registry, log_model, trusted_types_for
from flywheel.schemas import GateReport, GateResult

pytestmark = pytest.mark.integration

NUMERIC = ["tenure_months", "monthly_charges", "support_tickets_30d", "avg_session_minutes",
           "payment_delay_days", "num_products"]  # fmt: skip
CATEGORICAL = ["contract_type", "payment_method", "region", "segment"]
FEATURES = NUMERIC + CATEGORICAL
TREE = "sklearn.tree._tree.Tree"
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"

ESTIMATORS: dict[str, Any] = {
    "logistic_regression": lambda: LogisticRegression(max_iter=300),
    "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=15, random_state=0),
    "random_forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0),
    "dummy": lambda: DummyClassifier(strategy="prior"),
}
EXPECTED_TYPES = {
    "logistic_regression": ["numpy.dtype"],
    "hist_gradient_boosting": ["numpy.dtype", TREE_PREDICTOR],
    "random_forest": ["numpy.dtype", TREE],
    "dummy": ["numpy.dtype"],
}


def pipeline_for(estimator: Any, knn: bool = False) -> Pipeline:
    if knn:
        num, cat = KNNImputer(n_neighbors=3), SimpleImputer(strategy="constant", fill_value="__missing__")
    else:
        num, cat = SimpleImputer(strategy="median"), SimpleImputer(strategy="most_frequent")
    pre = ColumnTransformer([
        ("num", make_pipeline(num, StandardScaler()), NUMERIC),
        ("cat", make_pipeline(cat, OneHotEncoder(handle_unknown="ignore")), CATEGORICAL),
    ])  # fmt: skip
    return Pipeline([("features", pre), ("model", estimator)])


@pytest.fixture(scope="module")
def frame(small_batches: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(small_batches[:3], ignore_index=True)
    rng = np.random.default_rng(0)
    df.loc[rng.random(len(df)) < 0.1, "monthly_charges"] = np.nan  # the pipelines must cope with gaps
    df.loc[rng.random(len(df)) < 0.1, "payment_method"] = None
    return df


@pytest.fixture(scope="module")
def xy(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    return frame[FEATURES], (frame["churned"] == "yes").astype(int)


@pytest.fixture(scope="module")
def lr_pipeline(xy: tuple[pd.DataFrame, pd.Series]) -> Pipeline:
    return pipeline_for(ESTIMATORS["logistic_regression"]()).fit(*xy)


@pytest.fixture(scope="module")
def rf_pipeline(xy: tuple[pd.DataFrame, pd.Series]) -> Pipeline:
    return pipeline_for(ESTIMATORS["random_forest"]()).fit(*xy)


@pytest.fixture
def env(mlflow_uri: str, tmp_path: Path) -> dict[str, Any]:
    """A registry on the test's MLflow, an experiment whose artifacts live in tmp, an audit log."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    experiment_id = client.create_experiment("flywheel-test", artifact_location=str(tmp_path / "artifacts"))
    audit = AuditLog(f"sqlite:///{tmp_path}/flywheel.db")
    return {"uri": mlflow_uri, "experiment_id": experiment_id, "registry": Registry(mlflow_uri, audit),
            "audit": audit, "client": client}  # fmt: skip


def log_and_register(env: dict[str, Any], pipeline: Any, x: pd.DataFrame, tags: dict[str, str] | None = None,
                     name: str = "churn") -> tuple[str, str, str]:  # fmt: skip
    """(run_id, model_uri, version)"""
    import mlflow

    with mlflow.start_run(experiment_id=env["experiment_id"]) as run:
        uri = log_model(pipeline, x.head(5))
    version = env["registry"].register(uri, name, run.info.run_id, tags or {"flywheel.git_sha": "abc"})
    return run.info.run_id, uri, version


def local_files(env: dict[str, Any], name: str, version: str) -> Path:
    """The version's files in the artifact store (local paths in these tests)."""
    path = Path(env["client"].get_model_version_download_uri(name, version).removeprefix("file://"))
    assert path.is_dir(), path
    return path


# ------------------------------------------------------------------------------ allow-list


@pytest.mark.parametrize("knn", [False, True], ids=["simple", "knn+constant"])
@pytest.mark.parametrize("family", list(ESTIMATORS))
def test_trusted_types_per_family(family: str, knn: bool, xy: tuple[pd.DataFrame, pd.Series]) -> None:
    pipe = pipeline_for(ESTIMATORS[family](), knn=knn).fit(*xy)
    types = trusted_types_for(pipe)
    assert types == EXPECTED_TYPES[family]
    assert set(types) <= ALLOWED_TYPES


def test_allow_list_is_exactly_what_the_families_need() -> None:
    assert set().union(*map(set, EXPECTED_TYPES.values())) == ALLOWED_TYPES


def test_project_training_pipelines_fit_the_allow_list(frame: pd.DataFrame) -> None:
    """The pipelines flywheel.training really builds (every family and imputation) need nothing more."""
    training = pytest.importorskip("flywheel.training")
    from flywheel.schemas import load_dataset
    from flywheel.settings import ImputationConfig

    dataset = load_dataset(Path(__file__).resolve().parents[2] / "configs/datasets/churn.yaml")
    small = frame.head(300)
    for family in ("logistic_regression", "hist_gradient_boosting", "random_forest"):
        for imputation in (ImputationConfig(), ImputationConfig(numeric="knn", categorical="missing_category")):
            pipe = training.fit(training.build_pipeline(family, {}, dataset, imputation, 1), small, dataset)
            assert set(trusted_types_for(pipe)) <= ALLOWED_TYPES, (family, imputation)
    assert set(trusted_types_for(training.fit(training.build_baseline(dataset), small, dataset))) <= ALLOWED_TYPES


class HomeMadeClassifier(ClassifierMixin, BaseEstimator):
    """Not in any allow-list: skops would have to import and instantiate this module's class."""

    def fit(self, x: Any, y: Any) -> HomeMadeClassifier:
        self.classes_ = np.unique(y)
        self.prior_ = float(np.mean(y))
        return self

    def predict_proba(self, x: Any) -> np.ndarray:
        return np.tile([1 - self.prior_, self.prior_], (len(x), 1))


def test_unknown_estimator_type_is_refused(xy: tuple[pd.DataFrame, pd.Series]) -> None:
    pipe = pipeline_for(HomeMadeClassifier()).fit(*xy)
    with pytest.raises(ModelIntegrityError, match="HomeMadeClassifier"):
        trusted_types_for(pipe)


def test_pip_requirements_are_exact_pins() -> None:
    pins = reg.pip_requirements()
    names = {p.split("==")[0] for p in pins}
    assert {"scikit-learn", "skops", "pandas", "numpy", "mlflow", "scipy"} <= names
    assert all("==" in p for p in pins)


def test_log_model_needs_an_active_run(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    with pytest.raises(RegistryError, match="active MLflow run"):
        log_model(lr_pipeline, xy[0].head(3))


# ----------------------------------------------------------------------- register and load


def test_register_and_load_round_trip(env: dict[str, Any], rf_pipeline: Pipeline, xy: Any) -> None:
    x = xy[0]
    run_id, uri, version = log_and_register(env, rf_pipeline, x, {"flywheel.git_sha": "abc", "flywheel.seed": "7"})
    assert uri.startswith("models:/m-")  # MLflow 3: a LoggedModel, not runs:/<run>/model
    assert version == "1"
    registry: Registry = env["registry"]
    tags = registry.version_tags("churn", version)
    assert tags["flywheel.git_sha"] == "abc" and tags["flywheel.seed"] == "7"
    assert tags[reg.TAG_STATUS] == reg.STATUS_REGISTERED
    # the digests are the run's artifact (a long tag would bury the short ones), guarded by a sha256 tag
    assert reg.TAG_DIGESTS not in tags and tags[reg.TAG_DIGESTS_ARTIFACT] == f"flywheel/digests/v{version}.json"
    assert len(tags[reg.TAG_DIGESTS_SHA256]) == 64
    mv = registry.model_version("churn", version)
    assert mv.run_id == run_id and mv.source == uri

    loaded = registry.load("churn", version=version)
    assert loaded.version == version and loaded.run_id == run_id
    assert {"MLmodel", "model.skops", "requirements.txt"} <= set(loaded.digests)
    assert loaded.trusted_types == ["numpy.dtype", TREE]
    np.testing.assert_array_equal(loaded.pipeline.predict_proba(x), rf_pipeline.predict_proba(x))
    requirements = (local_files(env, "churn", version) / "requirements.txt").read_text()
    assert f"scikit-learn=={__import__('sklearn').__version__}" in requirements


def test_runs_uri_is_resolved_to_the_logged_model(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    import mlflow

    with mlflow.start_run(experiment_id=env["experiment_id"]) as run:
        uri = log_model(lr_pipeline, xy[0].head(5))
    version = env["registry"].register(f"runs:/{run.info.run_id}/model", "churn", run.info.run_id, {})
    assert env["registry"].model_version("churn", version).source == uri
    again = env["registry"].register(uri, "churn", run.info.run_id, {})
    links = env["client"].get_logged_model(uri.removeprefix("models:/")).tags["mlflow.modelVersions"]
    assert __import__("json").loads(links) == [{"name": "churn", "version": v} for v in (version, again)]


def test_load_needs_exactly_one_of_version_or_alias(env: dict[str, Any]) -> None:
    with pytest.raises(RegistryError, match="exactly one"):
        env["registry"].load("churn")
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        env["registry"].load("churn", alias="champion")


@pytest.mark.parametrize("tamper", ["changed", "extra", "missing"])
def test_tampered_artifact_is_refused(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any, tamper: str) -> None:
    _, _, version = log_and_register(env, lr_pipeline, xy[0])
    files = local_files(env, "churn", version)
    if tamper == "changed":
        with (files / "model.skops").open("ab") as fh:
            fh.write(b"\0")
        expected = r"changed files \['model.skops'\]"
    elif tamper == "extra":
        (files / "helper.py").write_text("import os\n")
        expected = r"unexpected files \['helper.py'\]"
    else:
        (files / "requirements.txt").unlink()
        expected = r"missing files \['requirements.txt'\]"
    with pytest.raises(ModelIntegrityError, match=expected):
        env["registry"].load("churn", version=version)


def test_untrusted_type_inside_the_artifact_is_refused_on_load(env: dict[str, Any], xy: Any) -> None:
    """A model logged around our log_model (with its own trust list) still cannot load a foreign type."""
    import mlflow
    import mlflow.sklearn
    import skops.io as sio

    pipe = pipeline_for(HomeMadeClassifier()).fit(*xy)
    with mlflow.start_run(experiment_id=env["experiment_id"]) as run:
        info = mlflow.sklearn.log_model(
            pipe, name="model", serialization_format="skops", pip_requirements=reg.pip_requirements(),
            skops_trusted_types=sio.get_untrusted_types(data=sio.dumps(pipe)),
        )  # fmt: skip
    version = env["registry"].register(info.model_uri, "churn", run.info.run_id, {})
    with pytest.raises(ModelIntegrityError, match=r"outside the allow-list.*HomeMadeClassifier"):
        env["registry"].load("churn", version=version)


def test_version_without_digests_is_refused(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    import mlflow

    with mlflow.start_run(experiment_id=env["experiment_id"]):
        uri = log_model(lr_pipeline, xy[0].head(5))
    env["client"].create_registered_model("bare")
    mv = env["client"].create_model_version("bare", uri, model_id=uri.removeprefix("models:/"))
    with pytest.raises(ModelIntegrityError, match="no recorded digests"):
        env["registry"].load("bare", version=str(mv.version))


def test_long_digests_go_to_an_artifact(
    env: dict[str, Any], lr_pipeline: Pipeline, xy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reg, "TAG_MAX_CHARS", 50)
    run_id, _, version = log_and_register(env, lr_pipeline, xy[0])
    tags = env["registry"].version_tags("churn", version)
    assert reg.TAG_DIGESTS not in tags and tags[reg.TAG_DIGESTS_ARTIFACT] == f"flywheel/digests/v{version}.json"
    loaded = env["registry"].load("churn", version=version)
    assert "model.skops" in loaded.digests
    # the digests file itself is protected by the sha256 in the tag
    run_artifacts = Path(env["client"].get_run(run_id).info.artifact_uri.removeprefix("file://"))
    (run_artifacts / tags[reg.TAG_DIGESTS_ARTIFACT]).write_text("{}")
    with pytest.raises(ModelIntegrityError, match=r"digests artifact .* was altered"):
        env["registry"].load("churn", version=version)


# ------------------------------------------------------------------------------ alias moves


def test_alias_moves_are_audited(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    registry: Registry = env["registry"]
    versions = [log_and_register(env, lr_pipeline, xy[0])[2] for _ in range(3)]
    v1, v2, v3 = versions
    assert registry.alias_version("churn", "champion") is None
    assert registry.alias_version("no-such-model", "champion") is None

    first = registry.move_alias("churn", "champion", v1, "first model passed absolute gates", "user:t", {"auc": 0.8})
    assert (first.from_version, first.to_version, first.evidence) == (None, v1, {"auc": 0.8})
    registry.move_alias("churn", "challenger", v2, "passed gates", "user:t")
    assert registry.aliases("churn") == {"champion": v1, "challenger": v2}
    assert registry.version_tags("churn", v2)[reg.TAG_STATUS] == "challenger"
    with pytest.raises(RegistryError, match="is the champion"):
        registry.move_alias("churn", "challenger", v1, "nonsense", "user:t")

    promoted = registry.move_alias("churn", "champion", v2, "approved", "user:boss", {"ticket": "OPS-1"})
    assert (promoted.from_version, promoted.to_version) == (v1, v2)
    assert registry.aliases("churn") == {"champion": v2}  # the challenger alias went with the promotion
    assert registry.alias_version("churn", "challenger") is None
    assert registry.version_tags("churn", v1)[reg.TAG_STATUS] == reg.STATUS_ARCHIVED
    assert registry.version_tags("churn", v2)[reg.TAG_STATUS] == "champion"

    registry.move_alias("churn", "challenger", v3, "passed gates", "user:t")
    removed = registry.remove_alias("churn", "challenger", "withdrawn", "user:t")
    assert removed is not None and (removed.from_version, removed.to_version) == (v3, None)
    assert registry.remove_alias("churn", "challenger", "again", "user:t") is None

    moves = [(e.alias, e.from_version, e.to_version, e.actor) for e in env["audit"].entries("churn")]
    assert moves == [
        ("champion", None, v1, "user:t"),
        ("challenger", None, v2, "user:t"),
        ("challenger", v2, None, "user:boss"),
        ("champion", v1, v2, "user:boss"),
        ("challenger", None, v3, "user:t"),
        ("challenger", v3, None, "user:t"),
    ]
    assert registry.load("churn", alias="champion").version == v2


def test_rejected_version_has_tags_and_no_alias(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    registry: Registry = env["registry"]
    run_id, _, version = log_and_register(env, lr_pipeline, xy[0])
    registry.move_alias("churn", "challenger", version, "passed gates", "user:t")
    report = "# Gate report\n\n**Verdict: REJECTED** (failed: primary)\n"
    registry.mark_rejected("churn", version, "failed gates: primary", report, actor="user:t")
    tags = registry.version_tags("churn", version)
    assert tags[reg.TAG_STATUS] == reg.STATUS_REJECTED
    assert tags[reg.TAG_REJECTION_REASON] == "failed gates: primary"
    assert reg.TAG_GATE_REPORT not in tags, "the report is stored once, as the run's artifact"
    assert registry.aliases("churn") == {}
    assert env["audit"].entries("churn")[-1].to_version is None  # the alias it held was taken, audited
    run_artifacts = Path(env["client"].get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert tags[reg.TAG_GATE_REPORT_ARTIFACT] == reg.GATE_REPORT_PATH
    assert (run_artifacts / tags[reg.TAG_GATE_REPORT_ARTIFACT]).read_text() == report
    with pytest.raises(RegistryError, match="rejected"):
        registry.move_alias("churn", "champion", version, "try anyway", "user:t")


def test_model_card_is_stored_and_read_back(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    registry: Registry = env["registry"]
    _, _, version = log_and_register(env, lr_pipeline, xy[0])
    card = f"# Model card: churn v{version}\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    registry.set_model_card("churn", version, card)
    assert registry.get_model_card("churn", version) == card
    assert registry.model_version("churn", version).description == card
    with pytest.raises(RegistryError, match="no version"):
        registry.get_model_card("churn", "99")


# -------------------------------------------------------------------------- register task


def _report(passed: bool, champion: str | None = None) -> GateReport:
    return GateReport(champion_version=champion, results=[
        GateResult(rule="primary", value=0.8 if passed else 0.5, threshold=">= 0.6", passed=passed),
        GateResult(rule="slice:region=north", value=0.7, threshold=">= 0.6", passed=True, gated=False),
    ])  # fmt: skip


@pytest.mark.slow
def test_register_model_task_outcomes(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    from flywheel.modelcard import VERSION_PLACEHOLDER
    from tasks.register import FIRST_CHAMPION_REASON, register_model

    client, registry = env["client"], env["registry"]

    def run() -> str:
        r = client.create_run(env["experiment_id"])
        client.set_terminated(r.info.run_id)
        return r.info.run_id

    lineage = {"flywheel.git_sha": "abc", "flywheel.data_hash": "d" * 64, "flywheel.seed": "42"}
    args = dict(model_name="churn", lineage=lineage, tracking_uri=env["uri"],
                audit_db_url=env["audit"].url, actor="prefect-flow-run:test")  # fmt: skip
    x = xy[0].head(5)
    card = f"# Model card: churn v{VERSION_PLACEHOLDER}\n"

    first_run = run()
    first = register_model.fn(lr_pipeline, x, first_run, gate_report=_report(True), model_card_md=card, **args)
    assert (first.outcome, first.alias, first.previous_champion, first.version) == ("champion", "champion", None, "1")
    assert first.model_uri.startswith("models:/m-") and first.event is None  # no Prefect here: no event, no crash
    assert registry.get_model_card("churn", "1") == "# Model card: churn v1\n"
    # the version keeps a few short tags; the whole lineage is on its run
    tags = registry.version_tags("churn", "1")
    assert tags["flywheel.data_hash"] == "d" * 12 and "flywheel.git_sha" not in tags, tags
    assert client.get_run(first_run).data.tags["flywheel.git_sha"] == "abc"
    assert all(len(v) <= 200 for v in tags.values()), tags
    assert env["audit"].entries("churn")[0].reason == FIRST_CHAMPION_REASON

    # a retry of the same run's registration reuses its version instead of registering a twin
    again = register_model.fn(lr_pipeline, x, first_run, gate_report=_report(True), model_card_md=card, **args)
    assert (again.version, again.outcome, again.previous_champion) == ("1", "champion", None)

    bad = register_model.fn(lr_pipeline, x, run(), gate_report=_report(False), model_card_md=None, **args)
    assert (bad.outcome, bad.alias, bad.previous_champion, bad.version) == ("rejected", None, "1", "2")
    assert registry.version_tags("churn", "2")[reg.TAG_STATUS] == reg.STATUS_REJECTED
    # its gate report, stored once in its run, names the versions it compared
    bad_tags = registry.version_tags("churn", "2")
    assert reg.TAG_GATE_REPORT not in bad_tags and bad_tags[reg.TAG_GATE_REPORT_ARTIFACT] == reg.GATE_REPORT_PATH
    report_md = registry._read_run_text(registry.model_version("churn", "2").run_id, reg.GATE_REPORT_PATH)
    assert "# Gate report: churn v2 vs no champion" in report_md and "**Verdict: REJECTED**" in report_md

    good = register_model.fn(lr_pipeline, x, run(), gate_report=_report(True, champion="1"), model_card_md=card,
                             **args)
    assert (good.outcome, good.alias, good.previous_champion, good.version) == ("challenger", "challenger", "1", "3")
    assert registry.aliases("churn") == {"champion": "1", "challenger": "3"}
    last = env["audit"].entries("churn")[-1]
    assert (last.alias, last.from_version, last.to_version, last.actor) == (
        "challenger",
        None,
        "3",
        "prefect-flow-run:test",
    )
    assert last.evidence["gates"]["passed"] is True
    good_md = registry._read_run_text(registry.model_version("churn", "3").run_id, reg.GATE_REPORT_PATH)
    assert good_md.startswith("# Gate report: churn v3 vs champion v1") and "**Verdict: PASSED**" in good_md
    loaded = registry.load("churn", alias="challenger")
    np.testing.assert_allclose(loaded.pipeline.predict_proba(xy[0]), lr_pipeline.predict_proba(xy[0]))


def test_emit_outside_prefect_does_not_crash() -> None:
    from tasks.register import emit_model_event

    assert emit_model_event("flywheel.model.challenger-registered", "churn", "3", {"version": "3"}) is None


def test_load_champion_task(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> None:
    from tasks.register import load_champion

    assert load_champion.fn(env["uri"], env["audit"].url, "churn") is None
    _, _, version = log_and_register(env, lr_pipeline, xy[0])
    env["registry"].move_alias("churn", "champion", version, "first", "user:t")
    assert load_champion.fn(env["uri"], env["audit"].url, "churn").version == version


def test_retries_only_transient_failures() -> None:
    from prefect.states import Failed

    from tasks._prefect import retry_transient

    assert retry_transient(None, None, Failed(data=ModelIntegrityError("tampered"))) is False  # type: ignore[arg-type]
    assert retry_transient(None, None, Failed(data=RegistryError("no alias"))) is False  # type: ignore[arg-type]
    assert retry_transient(None, None, Failed(data=ConnectionError("mlflow down"))) is True  # type: ignore[arg-type]
