"""The prediction log: every online prediction, appended off the request path.

Requests put records on an in-memory queue; one background thread writes them in batches every
`flush_seconds` (SQLAlchemy Core, SQLite or Postgres). `close()` stops the thread after a last flush,
so a clean stop loses nothing. A failed write is retried at the next flush (the batch stays queued,
bounded by `max_pending`; past that the oldest records are dropped and counted).

The same database holds `flywheel_routing`: the service's routing policy (one row per model name),
so a restart keeps the canary share or the active blue/green slot.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from flywheel.db import project_engine

PREDICTIONS_TABLE = "flywheel_predictions"
ROUTING_TABLE = "flywheel_routing"
log = logging.getLogger("flywheel.predictionlog")


def _tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    predictions = sa.Table(
        PREDICTIONS_TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
        sa.Column("entity", sa.String(256), nullable=True, index=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("arm", sa.String(32), nullable=False),
        sa.Column("prediction", sa.Boolean, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("features", sa.Text, nullable=False),  # JSON text: portable across both databases
        sa.Column("imputed", sa.Text, nullable=False),  # JSON list of feature names
        sa.Column("explanation", sa.Text, nullable=True),  # JSON, only when asked for
        sa.Column("shadow", sa.Boolean, nullable=False, default=False),
    )
    routing = sa.Table(
        ROUTING_TABLE,
        metadata,
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("policy", sa.Text, nullable=False),  # JSON of flywheel.serving.RoutingPolicy
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
    )
    return predictions, routing


class PredictionLog:
    """Queue + background writer for `flywheel_predictions`; also reads/writes the routing policy."""

    def __init__(self, url: str, flush_seconds: float = 0.5, max_pending: int = 200_000) -> None:
        self.url = url
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._engine = project_engine(url, "prediction log")
        self._metadata = sa.MetaData()
        self.predictions, self.routing = _tables(self._metadata)
        self._metadata.create_all(self._engine, checkfirst=True)
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._pending: deque[dict[str, Any]] = deque()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    # ------------------------------------------------------------------------------ writing

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
            self._thread.start()

    def append(self, record: dict[str, Any]) -> None:
        """Queue one record (non-blocking; the writer thread stores it at its next flush)."""
        self._queue.put(record)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()
        self.flush()

    def flush(self) -> int:
        """Write everything queued so far; returns the number of rows written."""
        with self._flush_lock:
            while True:
                try:
                    self._pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            overflow = len(self._pending) - self.max_pending
            for _ in range(max(overflow, 0)):
                self._pending.popleft()
                self.dropped += 1
            if not self._pending:
                return 0
            rows = [_row(r) for r in self._pending]
            try:
                with self._engine.begin() as conn:
                    conn.execute(self.predictions.insert(), rows)
            except Exception as exc:  # kept queued; the next flush retries
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("prediction log write failed (%d rows kept for retry): %s", len(rows), exc)
                return 0
            self._pending.clear()
            self.last_error = None
            self.written += len(rows)
            return len(rows)

    def close(self) -> None:
        """Stop the writer after a final flush (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
        self._engine.dispose()

    # ------------------------------------------------------------------------------ routing

    def load_policy(self, model: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(self.routing.c.policy).where(self.routing.c.model == model)).first()
        return json.loads(row[0]) if row else None

    def save_policy(self, model: str, policy: dict[str, Any], actor: str) -> None:
        values = {"policy": json.dumps(policy, sort_keys=True), "updated_at": datetime.now(UTC), "updated_by": actor}
        with self._engine.begin() as conn:
            done = conn.execute(self.routing.update().where(self.routing.c.model == model).values(**values))
            if done.rowcount == 0:
                conn.execute(self.routing.insert().values(model=model, **values))

    # ------------------------------------------------------------------------------ reading

    def rows(self, limit: int = 1000, request_id: str | None = None) -> list[dict[str, Any]]:
        """The newest stored rows (JSON columns decoded), oldest first."""
        q = sa.select(self.predictions).order_by(self.predictions.c.id.desc()).limit(limit)
        if request_id:
            q = q.where(self.predictions.c.request_id == request_id)
        with self._engine.connect() as conn:
            out = [dict(r._mapping) for r in conn.execute(q)]
        for r in out:
            r["features"] = json.loads(r["features"])
            r["imputed"] = json.loads(r["imputed"])
            r["explanation"] = json.loads(r["explanation"]) if r["explanation"] else None
        return out[::-1]


def _row(record: dict[str, Any]) -> dict[str, Any]:
    explanation = record.get("explanation")
    return {
        "at": record["at"],
        "request_id": record["request_id"],
        "entity": None if record.get("entity") is None else str(record["entity"]),
        "model": record["model"],
        "version": str(record["version"]),
        "arm": record["arm"],
        "prediction": bool(record["prediction"]),
        "probability": float(record["probability"]),
        "latency_ms": float(record["latency_ms"]),
        "features": json.dumps(record["features"], default=_json_default),
        "imputed": json.dumps(record.get("imputed", [])),
        "explanation": None if explanation is None else json.dumps(explanation, default=_json_default),
        "shadow": bool(record.get("shadow", False)),
    }


def _json_default(value: Any) -> Any:
    # numpy scalars and timestamps from the feature store
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
