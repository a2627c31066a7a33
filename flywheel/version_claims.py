"""One registered version per model, data digest and config digest, even when several trainings finish at once.

Table `flywheel_version_claims` has one row per (model, data digest, config digest); its primary key makes the
insert the arbiter, in one process or on many hosts. The training that inserts the row registers the version and
records its number in the row; every other training of the same data and config finds the row and reports that
version (outcome `duplicate`) instead of registering another. A claim whose holder registers nothing carries a
lease: after it expires (the holder crashed before registering) the next training takes the claim over.

The holder is the training's MLflow run id, so a retry of the same registration finds its own claim and resumes.
Times are naive UTC, as in flywheel/locks.py. SQLAlchemy Core only: the same code on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel import migrations
from flywheel.db import project_engine

TABLE = "flywheel_version_claims"
CLAIM_LEASE_S = 600.0  # how long a holder may take to register before another training may take its claim


class Claim(BaseModel):
    """The claim on (model, data, config): `won` when this caller registers; `version` once one is registered."""

    model_config = ConfigDict(frozen=True)

    model: str
    data_digest: str
    config_digest: str
    holder: str
    version: str | None
    won: bool
    took_over_from: str | None = None


CLAIMS = sa.Table(
    TABLE, migrations.METADATA,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("data_digest", sa.String(64), primary_key=True),
    sa.Column("config_digest", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(256), nullable=False),
    sa.Column("version", sa.String(64), nullable=True),
    sa.Column("claimed_at", sa.DateTime(timezone=False), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=False), nullable=False),
)


def _now() -> datetime:
    # wall time: claims are leases between processes (machinery), not the project's logic
    return datetime.now(UTC).replace(tzinfo=None)


class VersionClaims:
    """Claims on (model, data digest, config digest) in the project database at `url`."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "version claims")
        migrations.ensure(self._engine, [CLAIMS])

    def _key(self, model: str, data_digest: str, config_digest: str) -> sa.ColumnElement[bool]:
        c = CLAIMS.c
        return sa.and_(c.model == model, c.data_digest == data_digest, c.config_digest == config_digest)

    def _claim(self, row: sa.Row, holder: str, won: bool, took_over_from: str | None = None) -> Claim:
        return Claim(model=row.model, data_digest=row.data_digest, config_digest=row.config_digest,
                     holder=row.holder, version=row.version, won=won, took_over_from=took_over_from)

    def get(self, model: str, data_digest: str, config_digest: str) -> sa.Row | None:
        with self._engine.connect() as conn:
            return conn.execute(sa.select(CLAIMS).where(self._key(model, data_digest, config_digest))).first()

    def claim(self, model: str, data_digest: str, config_digest: str, holder: str,
              lease_s: float = CLAIM_LEASE_S) -> Claim:
        """Take the claim (won), find it already ours (won, a retry), or find someone else's (not won: its
        version, or None while its holder is still registering)."""
        now = _now()
        values = {"model": model, "data_digest": data_digest, "config_digest": config_digest, "holder": holder,
                  "version": None, "claimed_at": now, "expires_at": now + timedelta(seconds=lease_s)}
        try:
            with self._engine.begin() as conn:
                conn.execute(CLAIMS.insert().values(**values))
            return Claim(**{k: values[k] for k in ("model", "data_digest", "config_digest", "holder", "version")},
                         won=True)
        except sa.exc.IntegrityError:
            pass  # claimed before: by us (a retry), by a registration that finished, or one in flight
        row = self.get(model, data_digest, config_digest)
        if row is None:  # released between our insert and this read: try again from the top
            return self.claim(model, data_digest, config_digest, holder, lease_s)
        if row.holder == holder or row.version is not None or row.expires_at >= now:
            return self._claim(row, holder, won=row.holder == holder)
        # the holder registered nothing within its lease (it crashed): compare-and-set, one taker wins
        with self._engine.begin() as conn:
            done = conn.execute(CLAIMS.update().where(
                self._key(model, data_digest, config_digest), CLAIMS.c.holder == row.holder,
                CLAIMS.c.version.is_(None)).values(holder=holder, claimed_at=now, expires_at=values["expires_at"]))
        if done.rowcount == 1:
            return Claim(model=model, data_digest=data_digest, config_digest=config_digest, holder=holder,
                         version=None, won=True, took_over_from=row.holder)
        return self.claim(model, data_digest, config_digest, holder, lease_s)

    def wait(self, model: str, data_digest: str, config_digest: str, holder: str, timeout_s: float = CLAIM_LEASE_S,
             poll_s: float = 1.0, lease_s: float = CLAIM_LEASE_S) -> Claim:
        """Claim, and while another holder is still registering, poll until it records its version (or its
        lease runs out and the claim becomes ours). A holder that neither registers nor lets go within
        `timeout_s` leaves the claim as it is: the caller gets it with `version` None and `won` False."""
        deadline = time.monotonic() + timeout_s
        while True:
            claim = self.claim(model, data_digest, config_digest, holder, lease_s)
            if claim.won or claim.version is not None or time.monotonic() >= deadline:
                return claim
            time.sleep(poll_s)

    def record(self, model: str, data_digest: str, config_digest: str, holder: str, version: str) -> bool:
        """The holder registered `version`: every later training of the same data and config reports it."""
        with self._engine.begin() as conn:
            done = conn.execute(CLAIMS.update().where(self._key(model, data_digest, config_digest),
                                                      CLAIMS.c.holder == holder).values(version=str(version)))
        return done.rowcount == 1

    def release(self, model: str, data_digest: str, config_digest: str, holder: str) -> bool:
        """Let go of a claim that registered nothing (the holder failed before creating a version)."""
        with self._engine.begin() as conn:
            done = conn.execute(CLAIMS.delete().where(self._key(model, data_digest, config_digest),
                                                      CLAIMS.c.holder == holder, CLAIMS.c.version.is_(None)))
        return done.rowcount == 1

    def dispose(self) -> None:
        self._engine.dispose()
