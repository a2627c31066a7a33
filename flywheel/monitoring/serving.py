"""A monitoring window read from the service's prediction log: the features the champion was served
with, and the probabilities it answered, in [start, end).

Only the champion's own answers count (not a canary's challenger rows, nor shadow rows): the window is
judged against the champion's reference profile. Entities repeated inside the window are kept: traffic
is what the model saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from flywheel.schemas import DatasetDefinition


@dataclass(frozen=True)
class ServingWindow:
    frame: pd.DataFrame  # one row per served prediction: the dataset's feature columns (+ entity, `at`)
    probabilities: np.ndarray  # P(positive) the champion answered, row by row
    version: str
    start: datetime
    end: datetime

    @property
    def rows(self) -> int:
        return len(self.frame)


def read_serving_window(log_url: str, model: str, version: str, start: datetime, end: datetime,
                        dataset: DatasetDefinition) -> ServingWindow:
    """The champion v`version`'s served rows of `model` in [start, end), oldest first."""
    import sqlalchemy as sa

    from flywheel.predictionlog import PREDICTIONS_TABLE
    from flywheel.rollout import _db_time

    engine = sa.create_engine(log_url)
    try:
        try:
            t = sa.Table(PREDICTIONS_TABLE, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:  # the service has not logged anything yet
            rows: list[dict] = []
        else:
            q = (sa.select(t.c.at, t.c.entity, t.c.probability, t.c.features)
                 .where(t.c.model == model, t.c.version == str(version), t.c.arm == "champion",
                        t.c.shadow.is_(False), t.c.at >= _db_time(start, engine), t.c.at < _db_time(end, engine))
                 .order_by(t.c.id))
            with engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q)]
    finally:
        engine.dispose()
    names = dataset.feature_names
    features = [json.loads(r["features"]) for r in rows]
    frame = pd.DataFrame({n: [f.get(n) for f in features] for n in names})
    for n in dataset.numeric_features:
        frame[n] = pd.to_numeric(frame[n], errors="coerce").astype("float64")
    ids = pd.Series([r["entity"] for r in rows], dtype=object)  # the log keeps ids as text
    frame[dataset.entity] = pd.to_numeric(ids).astype("int64") if dataset.entity_type == "int" and len(ids) else ids
    at = pd.to_datetime([r["at"] for r in rows], utc=True)
    frame["at"] = at
    # the dataset's suite dates rows: a served row is dated by when it was served (and reached us then)
    for col in (dataset.timestamp, dataset.created_timestamp):
        if col:
            frame[col] = at
    return ServingWindow(frame=frame, probabilities=np.array([r["probability"] for r in rows], dtype=float),
                         version=str(version), start=start, end=end)


def read_served_predictions(log_url: str, model: str, version: str, start: datetime, end: datetime) -> pd.DataFrame:
    """The champion v`version`'s answers of `model` in [start, end) that recorded their feature snapshot:
    entity (text), at, feature_time, probability; what the outcome join needs, without the features."""
    import sqlalchemy as sa

    from flywheel.predictionlog import PREDICTIONS_TABLE
    from flywheel.rollout import _db_time

    cols = ["entity", "at", "feature_time", "probability"]
    engine = sa.create_engine(log_url)
    try:
        try:
            t = sa.Table(PREDICTIONS_TABLE, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            return pd.DataFrame(columns=cols)
        if "feature_time" not in t.c:  # a log written before snapshots were recorded: nothing joins
            return pd.DataFrame(columns=cols)
        q = (sa.select(t.c.entity, t.c.at, t.c.feature_time, t.c.probability)
             .where(t.c.model == model, t.c.version == str(version), t.c.arm == "champion", t.c.shadow.is_(False),
                    t.c.feature_time.is_not(None), t.c.entity.is_not(None), t.c.probability.is_not(None),
                    t.c.at >= _db_time(start, engine), t.c.at < _db_time(end, engine))
             .order_by(t.c.id))
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(q)]
    finally:
        engine.dispose()
    frame = pd.DataFrame(rows, columns=cols)
    frame["entity"] = frame["entity"].astype(str)
    frame["at"] = pd.to_datetime(frame["at"], utc=True)
    frame["feature_time"] = pd.to_datetime(frame["feature_time"], utc=True)
    frame["probability"] = frame["probability"].astype(float)
    return frame
