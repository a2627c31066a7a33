"""The S3-compatible object store that holds MLflow's artifacts in the production stack (MinIO in compose, any
S3 API in the cloud). Only the MLflow server talks to it with keys: clients log and load models through the
server (`mlflow-artifacts:/`), so the worker and the service never hold the store's credentials."""

from __future__ import annotations

import os

from flywheel.errors import FlywheelError

ENDPOINT_VAR = "MLFLOW_S3_ENDPOINT_URL"  # the variable the MLflow server reads: one name for both


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client on `endpoint_url` (default: MLFLOW_S3_ENDPOINT_URL; AWS itself when unset); the keys
    come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) as boto3 reads them."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get(ENDPOINT_VAR) or None
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def ensure_bucket(name: str, endpoint_url: str | None = None) -> bool:
    """Create the bucket unless it exists; True when it was created. Idempotent (a compose one-shot job)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url)
    where = endpoint_url or os.environ.get(ENDPOINT_VAR) or "AWS S3"
    try:
        client.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise FlywheelError(f"bucket {name!r} on {where}: {exc}") from None
    except BotoCoreError as exc:
        raise FlywheelError(f"object store {where}: {exc}") from None
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise FlywheelError(f"could not create bucket {name!r} on {where}: {exc}") from None
        return False
    return True
