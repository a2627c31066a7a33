"""Batch scoring and the skew check on a real trained home: Prefect (test harness), MLflow, Feast.

One project home per module: three weeks of churn batches, trained once with as_of T, which also
loads the online store up to T. Batch scoring at T must then agree with the model applied to the
online vectors, and the skew check must pass until the online store is tampered with.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from flywheel import featurestore as fs
from flywheel import scoring
from flywheel.audit import AuditLog
from flywheel.datagen import GeneratorSpec, write_batches
from flywheel.errors import FlywheelError, RegistryError, SkewError
from flywheel.registry import Registry
from flywheel.runtime import RunContext, start_run_context
from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SPEC = GeneratorSpec(seed=5, days=21, rows_per_day=400, customers=2000)
T = datetime(2026, 3, 1, tzinfo=UTC)  # every label of January is known by then; all features within the TTL
UNKNOWN = 10**9


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> dict[str, Any]:
    from flows.training import TrainingParams, training_pipeline

    home = make_home(tmp_path_factory.mktemp("scoring-home"))
    # these tests are about scoring, not gates: a wall-clock latency gate must not flake them on a busy machine
    ci = yaml.safe_load((home / "configs" / "ci.yaml").read_text())
    ci.setdefault("evaluate", {}).setdefault("gate_overrides", {})["latency"] = {"service_budget_ms": 10_000}
    (home / "configs" / "ci.yaml").write_text(yaml.safe_dump(ci))
    write_batches(SPEC, home / "data" / "incoming" / "churn")
    result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs"), as_of=T))
    assert result.outcome == "champion", f"the first model must become champion: {result}"
    ctx = start_run_context("ci", home / "configs")
    model = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url)).load(ctx.model_name, alias="champion")
    repo = fs.render_repo(ctx.settings.stores, ctx.settings.paths.home)
    return {"home": home, "ctx": ctx, "model": model, "repo": repo, "service": result.feature_service}


def _ctx(trained: dict[str, Any]) -> RunContext:
    return trained["ctx"]


def _score(trained: dict[str, Any], **kwargs: Any):
    from flows.batch_scoring import BatchScoringParams, batch_scoring

    params = BatchScoringParams(profile="ci", config_dir=str(trained["home"] / "configs"), **kwargs)
    return batch_scoring(params, return_state=True)


def _outputs(trained: dict[str, Any]) -> list[Path]:
    ctx = _ctx(trained)
    out = ctx.settings.resolve(ctx.settings.batch.output_dir)
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_batch_scoring_writes_every_entity_with_the_champion(trained: dict[str, Any]) -> None:
    ctx = _ctx(trained)
    state = _score(trained, at=T)
    assert state.is_completed(), state.message
    result = state.result()
    expected = ctx.settings.resolve(ctx.settings.batch.output_dir) / "churn" / "v1" / "20260301T000000.parquet"
    assert Path(result.path) == expected and _outputs(trained) == [expected]

    frame = pd.read_parquet(expected)
    assert list(frame.columns) == ["customer_id", *scoring.OUTPUT_COLUMNS]
    every = scoring.offline_entities(ctx.dataset, ctx.offline_dir, T)
    assert sorted(frame["customer_id"]) == sorted(every) and frame["customer_id"].is_unique
    assert (result.rows, result.scored_rows, result.no_feature_rows) == (len(every), len(every), 0)
    assert set(frame["model_version"]) == {"1"} and set(frame["feature_service"]) == {trained["service"]}
    assert (frame["feature_time"] == pd.Timestamp(T)).all()
    assert frame["probability"].between(0, 1).all()
    assert ((frame["probability"] >= 0.5).astype(int) == frame["prediction"]).all()
    # entities whose latest snapshot lacked a value were still scored, with the gap recorded
    assert frame["imputed_features"].notna().sum() > 0 and frame["reason"].isna().all()

    from prefect.artifacts import Artifact

    artifact = Artifact.get("batch-scoring-churn")
    assert artifact is not None and "churn v1" in artifact.data and f"| entities | {len(every)} |" in artifact.data
    trained["scored"] = frame


def test_batch_equals_online_for_the_same_entity_and_time(trained: dict[str, Any]) -> None:
    # given the batch scores at T (the fixture's training run loaded the online store up to T)
    frame = trained.get("scored")
    if frame is None:  # run on its own (-k): score first
        frame = pd.read_parquet(_score(trained, at=T).result().path)
    ctx, model = _ctx(trained), trained["model"]
    sample = frame.sample(40, random_state=3)
    # when the same model is applied to each entity's ONLINE feature vector, as Feast returns it
    store = fs.open_store(trained["repo"])
    online = fs.get_online_features(store, model.tags["flywheel.feature_service"], sample["customer_id"].tolist())
    online_p = model.pipeline.predict_proba(online[ctx.dataset.feature_names])[:, 1]
    # then it gives exactly the batch probability
    assert online_p.tolist() == pytest.approx(sample["probability"].tolist(), abs=1e-12)


def test_entities_file_scores_unknown_entities_as_null_with_reason(trained: dict[str, Any], tmp_path: Path) -> None:
    ctx = _ctx(trained)
    known = scoring.offline_entities(ctx.dataset, ctx.offline_dir, T).head(5).tolist()
    path = tmp_path / "ids.csv"
    pd.DataFrame({"customer_id": [*known, UNKNOWN, known[0]]}).to_csv(path, index=False)
    at = datetime(2026, 2, 15, 12, tzinfo=UTC)

    state = _score(trained, entities=str(path), at=at)

    assert state.is_completed(), state.message
    result = state.result()
    frame = pd.read_parquet(result.path).set_index("customer_id")
    assert Path(result.path).name == "20260215T120000.parquet"
    assert (result.rows, result.scored_rows, result.no_feature_rows) == (6, 5, 1)
    assert frame.loc[UNKNOWN, "reason"] == scoring.REASON_NO_FEATURES
    assert pd.isna(frame.loc[UNKNOWN, "probability"]) and pd.isna(frame.loc[UNKNOWN, "prediction"])
    assert frame.loc[known, "probability"].notna().all()


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("customer\n1\n", FlywheelError, "has no column 'customer_id'"),
        ("customer_id\n", FlywheelError, "has no rows"),
        (None, RegistryError, "no version of model 'churn' holds alias 'staging'"),
    ],
    ids=["missing-entity-column", "empty-file", "unknown-alias"],
)
def test_bad_input_fails_clearly_and_writes_nothing(
    trained: dict[str, Any], tmp_path: Path, content: str | None, error: type[Exception], message: str
) -> None:
    before = _outputs(trained)
    kwargs: dict[str, Any] = {"at": datetime(2026, 2, 1, tzinfo=UTC)}
    if content is None:
        kwargs["alias"] = "staging"
    else:
        (tmp_path / "ids.csv").write_text(content)
        kwargs["entities"] = str(tmp_path / "ids.csv")

    state = _score(trained, **kwargs)

    assert state.is_failed()
    with pytest.raises(error, match=message):
        state.result()
    assert _outputs(trained) == before, "nothing was written"


def test_skew_check_passes_on_a_clean_store(trained: dict[str, Any]) -> None:
    from tasks.score import check_skew

    ctx = _ctx(trained)
    report = check_skew.fn(trained["repo"], trained["model"], ctx.dataset, ctx.settings.batch, ctx.offline_dir,
                           seed=0)
    # the online store is loaded up to the newest arrival (not past it), and the check compares there
    assert report.passed and report.offline_time <= T, report.summary()
    assert len(report.entities) == ctx.settings.batch.skew_sample
    assert report.max_prediction_difference <= ctx.settings.batch.skew_tolerance


def test_skew_check_fails_after_an_online_tamper_and_names_it(
    trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.artifacts import Artifact

    ctx, model = _ctx(trained), trained["model"]
    ds = ctx.dataset
    store = fs.open_store(trained["repo"])
    service = store.get_feature_service(trained["service"])
    view = service.feature_view_projections[0].name
    victim = int(scoring.offline_entities(ds, ctx.offline_dir, T).iloc[7])
    original = fs.get_online_features(store, trained["service"], [victim])
    # when a value reaches the online store that the offline store never had
    tampered = original.copy()
    tampered["monthly_charges"] = tampered["monthly_charges"] + 250.0
    tampered["event_timestamp"] = pd.Timestamp(T)
    tampered[fs.created_column(ds)] = pd.Timestamp(T)
    store.write_to_online_store(view, tampered)
    try:
        # then the check (sampling every entity so the victim is among them) fails the flow, naming it
        monkeypatch.setenv("FLYWHEEL_BATCH__SKEW_SAMPLE", "100000")
        state = _score(trained, at=T, skew_check=True)
        assert state.is_failed()
        with pytest.raises(SkewError) as err:
            state.result()
        text = str(err.value)
        assert f"entity {victim} monthly_charges" in text
        assert f"online={float(original['monthly_charges'].iloc[0]) + 250.0!r}" in text
        report = err.value.report
        assert report.skewed_entities == [str(victim)]
        assert set(report.skewed_features) <= {"monthly_charges", scoring.PREDICTION_FEATURE}
        artifact = Artifact.get("skew-check-churn")
        assert artifact is not None and "FAILED" in artifact.data and f"| {victim} | monthly_charges |" in artifact.data
    finally:
        restored = original.copy()
        restored["event_timestamp"] = pd.Timestamp(T)
        restored[fs.created_column(ds)] = pd.Timestamp(T)
        store.write_to_online_store(view, restored)
    # and with the value put back, the same entity passes again
    from tasks.score import check_skew

    report = check_skew.fn(trained["repo"], model, ds, ctx.settings.batch, ctx.offline_dir, entities=[victim])
    assert report.passed, report.summary()


def test_partitions_on_a_dask_cluster_write_the_same_rows_and_scores(trained: dict[str, Any], tmp_path: Path) -> None:
    """batch.parallelism: the entities cut into partitions, each a task on a LocalCluster of 2 worker processes,
    joined into the one file the serial path writes, row for row."""
    from distributed import LocalCluster

    from flywheel.settings import ParallelismConfig
    from tasks.score import score_entities

    ctx, model = _ctx(trained), trained["model"]
    ids = scoring.offline_entities(ctx.dataset, ctx.offline_dir, T)
    ids = pd.concat([ids, pd.Series([UNKNOWN])], ignore_index=True)  # one without features, in the last partition
    serial = score_entities.fn(trained["repo"], model, ctx.dataset, ids, T, tmp_path / "serial", T)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        fanned = score_entities.fn(trained["repo"], model, ctx.dataset, ids, T, tmp_path / "dask", T,
                                   ParallelismConfig(address=cluster.scheduler_address), partition_rows=300)
    a, b = pd.read_parquet(serial.path), pd.read_parquet(fanned.path)
    assert len(ids) > 3 * 300, "several partitions"
    assert (fanned.rows, fanned.scored_rows, fanned.no_feature_rows) == (serial.rows, serial.scored_rows, 1)
    assert a["customer_id"].tolist() == b["customer_id"].tolist() == ids.tolist()
    assert b["scored_at"].nunique() == 1, "one scoring time for the whole file"
    columns = [c for c in a.columns if c != "scored_at"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    # each partition read only its entities' rows: together, exactly what the one serial pass read (not a
    # whole-store scan per partition, as when every partition ran get_historical_features over the store)
    assert fanned.feature_rows_read == serial.feature_rows_read == _rows_ready(ctx, ids, T)


def _rows_ready(ctx: RunContext, ids: Any, at: datetime) -> int:
    """The offline feature rows of these entities that a join at `at` can use (event and arrival by then)."""
    rows = pd.read_parquet(fs.offline_path(fs.dataset_dir(ctx.offline_dir, ctx.dataset), fs.FEATURES_FILE))
    ready = rows[[ctx.dataset.timestamp, fs.created_column(ctx.dataset)]].max(axis=1) <= pd.Timestamp(at)
    return int((rows[ctx.dataset.entity].isin(set(ids)) & ready).sum())


def test_a_partitions_retrieval_reads_only_its_entities_rows(trained: dict[str, Any]) -> None:
    """What a Dask worker runs for one partition: the offline read of its entities only, with the values the
    whole population's read gives them."""
    ctx, model = _ctx(trained), trained["model"]
    reader = scoring.offline_reader(fs.open_store(trained["repo"]), model.tags[scoring.TAG_FEATURE_SERVICE])
    every = scoring.offline_entities(ctx.dataset, ctx.offline_dir, T)
    part = scoring.partitions(every, 300)[2]

    scored = scoring.score_partition(reader, model, ctx.dataset, part, T, T)

    all_features, all_read = reader.read(ctx.dataset, every, T)
    assert scored.feature_rows_read == _rows_ready(ctx, part, T) > 0
    assert all_read == _rows_ready(ctx, every, T) and scored.feature_rows_read < all_read / 4
    assert scored.frame["customer_id"].tolist() == part
    part_features, _ = reader.read(ctx.dataset, part, T)
    pd.testing.assert_frame_equal(part_features, all_features.loc[part])


def test_partitions_are_cut_in_order_and_an_empty_list_fails() -> None:
    assert scoring.partitions([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    with pytest.raises(FlywheelError, match="no entities"):
        scoring.partitions([], 2)


def test_every_row_is_scored_at_the_project_clocks_now(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """`scored_at` is the project clock's now (here a simulated clock years from the wall's), not the wall's."""
    sim = datetime(2031, 3, 1, tzinfo=UTC)
    for key, value in {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": sim.isoformat(),
                       "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400",
                       "FLYWHEEL_CLOCK__ANCHOR": datetime.now(UTC).isoformat()}.items():
        monkeypatch.setenv(key, value)
    state = _score(trained, at=T - timedelta(days=1))  # its own file: the other tests' stays as it is
    assert state.is_completed(), state.message
    stamps = pd.read_parquet(state.result().path)["scored_at"]
    assert stamps.nunique() == 1 and sim <= stamps.iloc[0].to_pydatetime() < sim + timedelta(minutes=15), stamps
