"""Where an announced batch may be (flywheel/landing.py), and the deployments that act on announced batches
and the materialization cron, as deployments/prefect.yaml declares them and `flywheel up` serves them."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from flywheel.landing import NotALandedBatch, incoming_folder, resolve_landed
from flywheel.settings import load_settings
from tests.conftest import PROJECT


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming" / "churn"
    (folder / "sub").mkdir(parents=True)
    for name in ("batch_1.parquet", "sub/batch_2.csv", "notes.txt"):
        (folder / name).write_text("x")
    (tmp_path / "incoming" / "secret.parquet").write_text("x")
    os.symlink(tmp_path / "incoming" / "secret.parquet", folder / "link.parquet")
    return folder


def test_a_batch_file_under_the_folder_resolves_to_its_absolute_path(incoming: Path) -> None:
    assert resolve_landed("batch_1.parquet", incoming) == (incoming / "batch_1.parquet").resolve()
    assert resolve_landed("sub/batch_2.csv", incoming) == (incoming / "sub/batch_2.csv").resolve()
    assert resolve_landed(str(incoming / "batch_1.parquet"), incoming) == (incoming / "batch_1.parquet").resolve()
    assert resolve_landed(f"file://{incoming}/batch_1.parquet", incoming).name == "batch_1.parquet"
    assert incoming_folder(incoming) == incoming and incoming_folder(incoming / "one.parquet") == incoming


@pytest.mark.parametrize(("uri", "says"), [
    ("../secret.parquet", "is outside the incoming folder"),
    ("sub/../../secret.parquet", "is outside the incoming folder"),
    ("link.parquet", "is outside the incoming folder"),  # a symlink pointing out is followed, then refused
    ("/etc/passwd", "is outside the incoming folder"),
    ("file://evil.example/x.parquet", "another host"),
    ("s3://bucket/batch_1.parquet", "only local paths"),
    ("notes.txt", "is not a batch file"),
    ("batch_9.parquet", "no such file"),
    ("sub", "is not a batch file"),
])
def test_anything_else_is_refused_naming_why(incoming: Path, uri: str, says: str) -> None:
    with pytest.raises(NotALandedBatch, match=says):
        resolve_landed(uri, incoming)


def _deployment(name: str) -> dict:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def test_prefect_yaml_ingests_what_the_receiver_announces() -> None:
    from flywheel.webhook import HOOKS, BatchLandedBody, build_event

    for name, hook in (("ingest", "data-landed"), ("outcomes", "labels-landed")):
        dep = _deployment(name)
        (trigger,) = dep["triggers"]
        assert trigger["expect"] == [HOOKS[hook].event]
        assert trigger["match"] == {"prefect.resource.id": "flywheel.dataset.*"}
        assert trigger["parameters"]["params"] == {"batch": "{{ event.payload.path }}",
                                                   "delivery": "{{ event.payload.delivery }}"}
        assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        event = build_event(HOOKS[hook], BatchLandedBody(dataset="churn", uri="b.parquet"), "d-1",
                            datetime.now(UTC), "churn", extra={"path": "/abs/b.parquet"})
        assert event["payload"]["path"] == "/abs/b.parquet" and event["payload"]["delivery"] == "d-1"
        assert event["resource"]["prefect.resource.id"] == "flywheel.dataset.churn"


@pytest.mark.slow
def test_flywheel_up_serves_them_with_their_triggers_and_the_materialization_cron(home: Path) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.serve_deployments import build_deployments

    settings = load_settings("ci", home / "configs", environ={})
    built = {d.name: d for d in build_deployments(settings, "ci", str(home / "configs"))}
    for name, flow_name in (("ingest", "data-landed"), ("outcomes", "labels-landed")):
        dep = built[name]
        assert dep.flow_name == flow_name and dep.concurrency_limit == 1
        assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
        (trigger,) = dep.triggers
        assert trigger.parameters["params"] == {"batch": "{{ event.payload.path }}",
                                                "delivery": "{{ event.payload.delivery }}", "profile": "ci",
                                                "config_dir": str(home / "configs")}
    mat = built["materialization"]
    assert mat.flow_name == "materialization"
    (schedule,) = mat.schedules
    assert schedule.schedule.cron == "30 * * * *"  # configs/triggers.yaml schedules.materialization


def test_a_run_started_by_hand_is_held_to_the_same_rule(incoming: Path) -> None:
    from flywheel.errors import FlywheelError
    from tasks.landing import check_landed_batch

    assert check_landed_batch.fn("batch_1.parquet", incoming) == (incoming / "batch_1.parquet").resolve()
    with pytest.raises(FlywheelError, match=r"refusing the landed batch: '\.\./secret\.parquet' is outside"):
        check_landed_batch.fn("../secret.parquet", incoming)


def test_the_last_training_is_when_the_newest_version_first_took_an_alias(tmp_path: Path) -> None:
    from flywheel.audit import AuditLog
    from tasks.landing import last_training_at

    url = f"sqlite:///{tmp_path}/flywheel.db"
    audit = AuditLog(url)
    assert last_training_at.fn(url, "churn") is None
    audit.append("churn", "challenger", None, "1", "registered", "test", {})
    v2 = audit.append("churn", "challenger", "1", "2", "registered", "test", {})
    audit.append("churn", "champion", "1", "2", "promoted", "test", {})  # a promotion is no training
    audit.append("fraud", "challenger", None, "1", "registered", "test", {})
    audit.dispose()
    at = last_training_at.fn(url, "churn")
    assert at is not None and at.tzinfo is not None and at.replace(tzinfo=None) == v2.at.replace(tzinfo=None)
