"""The production profile on the real services: MLflow tracking + registry and the audit log on
PostgreSQL (127.0.0.1:5432), the Feast online store on Redis (127.0.0.1:6379). Same code, one switch.

Each test run gets its own databases (created and dropped here) and its own Redis database index
(flushed at the end), so it never touches anything else on those servers.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.production, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("prefect_harness")]  # fmt: skip


def test_training_pipeline_on_postgres_and_redis(production_env: dict) -> None:
    from mlflow import MlflowClient
    from sqlalchemy import create_engine, text

    from flows.training import TrainingParams, training_pipeline
    from flywheel import featurestore
    from flywheel.audit import AuditLog
    from flywheel.datagen import GeneratorSpec, write_batches
    from flywheel.runtime import start_run_context

    home = production_env["home"]
    write_batches(GeneratorSpec(seed=3, days=21, rows_per_day=300, customers=3000),
                  home / "data" / "incoming" / "churn")  # fmt: skip

    state = training_pipeline(TrainingParams(profile="production", config_dir=str(home / "configs")),
                              return_state=True)  # fmt: skip

    assert state.is_completed(), state.message
    result = state.result()
    assert (result.outcome, result.version) == ("champion", "1")
    ctx = start_run_context("production", home / "configs")
    assert ctx.tracking_uri.startswith("postgresql") and ctx.audit_db_url.startswith("postgresql")
    # the registry and the alias live in PostgreSQL
    client = MlflowClient(tracking_uri=ctx.tracking_uri, registry_uri=ctx.tracking_uri)
    # (MLflow 3.17 returns the version as an int from PostgreSQL and as a str from SQLite)
    assert str(client.get_model_version_by_alias("churn", "champion").version) == "1"
    # the audit row is in PostgreSQL, and PostgreSQL itself refuses to rewrite history
    entries = AuditLog(ctx.audit_db_url).entries("churn")
    assert [(e.alias, e.to_version) for e in entries] == [("champion", "1")]
    with pytest.raises(Exception, match="append-only"), create_engine(ctx.audit_db_url).begin() as conn:
        conn.execute(text("UPDATE flywheel_alias_audit SET reason = 'edited'"))
    # the online features were materialized into Redis and read back through the model's service
    assert production_env["redis"].dbsize() > 0
    store = featurestore.open_store(featurestore.render_repo(ctx.settings.stores, ctx.settings.paths.home))
    online = featurestore.get_online_features(store, result.feature_service, [1, 2, 3])
    assert online["tenure_months"].notna().any()
