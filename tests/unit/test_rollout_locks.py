"""The per-model rollout lock on real databases (SQLite; PostgreSQL when 127.0.0.1:5432 answers):
acquire, refuse, release, expire and take over, and racing acquirers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flywheel.locks import LockLost, RolloutLocked, RolloutLocks

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway database on the local PostgreSQL (skipped when there is none)."""
    from tests.production.conftest import throwaway_database

    with throwaway_database("flywheel_locks", migrate=True) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/flywheel.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def model() -> str:
    return f"churn-{uuid.uuid4().hex[:8]}"  # tests sharing the Postgres database do not see each other


@pytest.fixture
def locks(url: str) -> Iterator[RolloutLocks]:
    locks = RolloutLocks(url)
    yield locks
    locks.dispose()


def test_second_rollout_of_the_same_model_is_refused_with_the_holder(locks: RolloutLocks, model: str) -> None:
    info = locks.acquire(model, "run-a", 60, now=T0)
    assert info.holder == "run-a" and info.expires_at == T0 + timedelta(seconds=60)
    with pytest.raises(RolloutLocked, match=r"already in progress.*run-a") as err:
        locks.acquire(model, "run-b", 60, now=T0 + timedelta(seconds=30))
    assert err.value.holder == "run-a"
    # another model is independent
    assert locks.acquire(f"{model}-other", "run-b", 60, now=T0).holder == "run-b"
    assert locks.current(model).holder == "run-a"
    events = [(e.holder, e.event) for e in locks.history(model)]
    assert events == [("run-a", "acquired"), ("run-b", "refused")]


def test_release_then_acquire(locks: RolloutLocks, model: str) -> None:
    locks.acquire(model, "run-a", 60, now=T0)
    assert not locks.release(model, "run-b"), "only the holder releases"
    assert locks.release(model, "run-a")
    assert locks.current(model) is None
    assert locks.acquire(model, "run-b", 60, now=T0).holder == "run-b"


def test_expired_lock_is_taken_over_and_the_expiry_recorded(url: str, locks: RolloutLocks, model: str) -> None:
    locks.acquire(model, "crashed-run", 10, now=T0)
    info = locks.acquire(model, "run-b", 60, now=T0 + timedelta(seconds=11))
    assert info.holder == "run-b" and info.took_over_from == "crashed-run"
    expired = [e for e in locks.history(model) if e.event == "expired"]
    assert len(expired) == 1 and expired[0].holder == "crashed-run" and "taken over by run-b" in expired[0].detail
    # the crashed run, coming back, learns it lost the lock
    with pytest.raises(LockLost, match="no longer held by crashed-run"):
        locks.renew(model, "crashed-run", 60)
    assert not locks.release(model, "crashed-run")
    # a second process sees the same state (it is in the database, not in memory)
    other = RolloutLocks(url)
    assert other.current(model).holder == "run-b"


def test_renew_extends_the_lease(locks: RolloutLocks, model: str) -> None:
    locks.acquire(model, "run-a", 10, now=T0)
    locks.renew(model, "run-a", 60, now=T0 + timedelta(seconds=5))
    with pytest.raises(RolloutLocked):
        locks.acquire(model, "run-b", 60, now=T0 + timedelta(seconds=30))


def test_racing_acquirers_only_one_wins(url: str, model: str) -> None:
    RolloutLocks(url).dispose()  # create the tables once
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        locks = RolloutLocks(url)
        barrier.wait()
        try:
            locks.acquire(model, f"run-{i}", 60)
            outcomes.append("won")
        except RolloutLocked:
            outcomes.append("refused")
        finally:
            locks.dispose()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]


def test_an_operator_takes_a_running_rollouts_lock_and_the_rollout_learns_it(locks: RolloutLocks, model: str
                                                                           ) -> None:
    locks.acquire(model, "prefect-flow-run:a", 600, now=T0)
    info = locks.take_over(model, "prefect-flow-run:a", "supersede (user:ana)", 60, "v7 instead",
                           now=T0 + timedelta(seconds=10))
    assert info.holder == "supersede (user:ana)" and info.took_over_from == "prefect-flow-run:a"
    assert locks.current(model).holder == "supersede (user:ana)"
    # the running rollout's next renewal fails, and its release at the end does nothing
    with pytest.raises(LockLost, match="no longer held by prefect-flow-run:a"):
        locks.renew(model, "prefect-flow-run:a", 600, now=T0 + timedelta(seconds=20))
    assert not locks.release(model, "prefect-flow-run:a")
    events = [(e.holder, e.event) for e in locks.history(model)]
    assert events[:3] == [("prefect-flow-run:a", "acquired"), ("prefect-flow-run:a", "superseded"),
                          ("supersede (user:ana)", "acquired")]
    assert "v7 instead" in locks.history(model)[1].detail
    # taking it from a holder that no longer has it fails (the rollout ended, or someone else was first)
    with pytest.raises(LockLost, match="no longer held by prefect-flow-run:a"):
        locks.take_over(model, "prefect-flow-run:a", "supersede (user:bob)", 60, "late")
    assert locks.release(model, "supersede (user:ana)")
