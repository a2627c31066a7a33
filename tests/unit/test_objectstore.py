"""The production artifact store: the bucket job (`flywheel objectstore ensure-bucket`) against a real S3 API
server (moto's, on a free 127.0.0.1 port, stopped at the end), and experiments that keep a server-proxied
artifact location (`mlflow-artifacts:/...`) as the URI it is, not as a local folder."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.objectstore import ensure_bucket
from tests.e2e.stackproc import free_port

KEYS = {"AWS_ACCESS_KEY_ID": "objectstore-test-key", "AWS_SECRET_ACCESS_KEY": "objectstore-test-secret-key"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)


def test_the_bucket_is_created_once(s3_endpoint: str, keys: None) -> None:
    import boto3

    assert ensure_bucket("flywheel-once", s3_endpoint) is True
    assert ensure_bucket("flywheel-once", s3_endpoint) is False, "idempotent: a second run finds it"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert "flywheel-once" in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_an_unreachable_store_is_one_clear_error(keys: None) -> None:
    where = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FlywheelError, match=f"object store {where}"):
        ensure_bucket("flywheel-nowhere", where)


def test_the_cli_job_reads_the_endpoint_the_mlflow_server_reads(s3_endpoint: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **KEYS}
    cli = [str(Path(sys.executable).parent / "flywheel"), "objectstore", "ensure-bucket", "flywheel-cli"]
    first = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "bucket flywheel-cli: created" in first.stderr, first.stderr
    again = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "bucket flywheel-cli: exists" in again.stderr, again.stderr


def test_a_proxied_artifact_location_stays_a_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from tasks.train import ensure_experiment

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = ensure_experiment(client, "proxied", "mlflow-artifacts:/flywheel", logging.getLogger("test"))
    assert client.get_experiment(exp_id).artifact_location == "mlflow-artifacts:/flywheel"
    assert not any(tmp_path.glob("mlflow-artifacts*")), "no local folder named after the URI"
    local = ensure_experiment(client, "local", "artifacts", logging.getLogger("test"))
    assert client.get_experiment(local).artifact_location == (tmp_path / "artifacts").as_uri(), "a folder: absolute"
