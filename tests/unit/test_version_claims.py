"""Registration claims (flywheel/version_claims.py) on a real SQLite file, and the retry rule for database outages."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from flywheel.version_claims import VersionClaims
from tasks._prefect import store_unavailable

KEY = ("churn", "d" * 64, "c" * 64)


@pytest.fixture
def claims(tmp_path: Path) -> VersionClaims:
    return VersionClaims(f"sqlite:///{tmp_path}/flywheel.db")


def test_first_claim_wins_and_the_second_sees_it_in_flight(claims: VersionClaims) -> None:
    first = claims.claim(*KEY, holder="run-a")
    second = claims.claim(*KEY, holder="run-b")
    assert first.won and first.version is None
    assert not second.won and second.holder == "run-a" and second.version is None


def test_a_recorded_version_is_reported_to_every_later_claim(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    assert claims.record(*KEY, holder="run-a", version="3")
    later = claims.claim(*KEY, holder="run-b")
    assert (later.won, later.version, later.holder) == (False, "3", "run-a")


def test_the_holder_claiming_again_is_a_retry_and_wins(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    again = claims.claim(*KEY, holder="run-a")
    assert again.won and again.holder == "run-a"


def test_only_the_holder_records_a_version(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    assert not claims.record(*KEY, holder="run-b", version="9")
    assert claims.get(*KEY).version is None


def test_another_config_or_data_is_another_claim(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    assert claims.claim(KEY[0], KEY[1], "e" * 64, holder="run-b").won
    assert claims.claim(KEY[0], "f" * 64, KEY[2], holder="run-c").won


def test_a_released_claim_can_be_taken_by_another(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    assert claims.release(*KEY, holder="run-a")
    assert claims.claim(*KEY, holder="run-b").won


def test_a_claim_with_a_version_is_never_released(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    claims.record(*KEY, holder="run-a", version="1")
    assert not claims.release(*KEY, holder="run-a")
    assert claims.get(*KEY).version == "1"


def test_an_expired_claim_without_a_version_is_taken_over(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="crashed", lease_s=-1)  # its lease is over already
    taken = claims.claim(*KEY, holder="run-b")
    assert taken.won and taken.took_over_from == "crashed"
    assert claims.get(*KEY).holder == "run-b"


def test_an_expired_claim_with_a_version_is_not_taken_over(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a", lease_s=-1)
    claims.record(*KEY, holder="run-a", version="2")
    later = claims.claim(*KEY, holder="run-b")
    assert (later.won, later.version) == (False, "2")


def test_wait_returns_the_version_the_holder_records(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    timer = threading.Timer(0.3, claims.record, args=(*KEY,), kwargs={"holder": "run-a", "version": "5"})
    timer.start()
    try:
        got = claims.wait(*KEY, holder="run-b", timeout_s=20, poll_s=0.05)
    finally:
        timer.cancel()
    assert (got.won, got.version) == (False, "5")


def test_wait_gives_up_after_its_timeout_without_taking_the_claim(claims: VersionClaims) -> None:
    claims.claim(*KEY, holder="run-a")
    got = claims.wait(*KEY, holder="run-b", timeout_s=0.2, poll_s=0.05)
    assert (got.won, got.version, got.holder) == (False, None, "run-a")


def test_eight_concurrent_claims_have_one_winner(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flywheel.db"
    VersionClaims(url)  # the table first, as the first store use does
    barrier, won, errors = threading.Barrier(8), [], []

    def claim(i: int) -> None:
        try:
            store = VersionClaims(url)
            barrier.wait()
            if store.claim(*KEY, holder=f"run-{i}").won:
                won.append(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(won) == 1, won


def test_store_unavailable_recognises_connection_errors_only() -> None:
    from mlflow.exceptions import MlflowException

    down = sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    assert store_unavailable(down)
    try:
        try:
            raise down
        except sa.exc.OperationalError as exc:
            raise MlflowException(str(exc), error_code="TEMPORARILY_UNAVAILABLE") from exc
    except MlflowException as wrapped:
        assert store_unavailable(wrapped)
    assert not store_unavailable(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not store_unavailable(ValueError("bad data"))
    assert not store_unavailable(MlflowException("no such model", error_code="RESOURCE_DOES_NOT_EXIST"))
