"""A batch file as one monitoring window, without a running service (`flywheel monitor`).

The reference is, in order of preference: a registered version's stored profile (an alias such as
`champion`, the default, or a version number), a profile JSON file, or reference data profiled on the fly
(anyone's data, as for training). The window's predictions, when the profile has a prediction
distribution: a column of the batch (`prediction_column`), else the referenced version's model scoring the
batch. Everything a person can get wrong here raises a FlywheelError that says what to fix.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.errors import FlywheelError
from flywheel.monitoring.profile import MonitoringError, ReferenceProfile, numeric_values, profile_frame
from flywheel.monitoring.reference import file_key, load_profile_file, load_version_profile, resolve_version
from flywheel.monitoring.window import window_bounds
from flywheel.schemas import DatasetDefinition

log = logging.getLogger(__name__)


class BatchWindow(BaseModel):
    """Everything `monitor_window` needs about one batch, resolved."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    profile: ReferenceProfile
    window: pd.DataFrame
    predictions: Any = None  # np.ndarray of P(positive), or None
    prediction_note: str = ""
    model: str
    version: str | None
    reference: str  # the series key: v<version>, profile:<sha>, data:<sha>
    reference_label: str  # what a person reads: "champion (v3)", a file name
    start: datetime
    end: datetime


def _read(path: Path, dataset: DatasetDefinition, what: str) -> pd.DataFrame:
    from flywheel.validation import read_batch

    if not Path(path).is_file():
        raise FlywheelError(f"{what} file not found: {path}")
    try:
        return read_batch(Path(path), dataset)
    except Exception as exc:  # pyarrow / pandas parse errors of every kind
        raise FlywheelError(f"cannot read {what} file {path}: {exc}") from None


def prepare_batch(current: Path, dataset: DatasetDefinition, model: str, *, reference: str | None = None,
                  reference_data: Path | None = None, tracking_uri: str | None = None,
                  audit_db_url: str | None = None, prediction_column: str | None = None,
                  start: datetime | None = None, end: datetime | None = None) -> BatchWindow:
    """Resolve the reference, read the batch, date it and find its predictions."""
    if reference is not None and reference_data is not None:
        raise FlywheelError("give either --reference or --reference-data, not both")
    window = _read(current, dataset, "current batch")
    if (start is None) != (end is None):
        raise FlywheelError("give both --window-start and --window-end, or neither")
    if start is None:
        start, end = window_bounds(window, dataset)
    assert end is not None
    if prediction_column is not None and prediction_column not in window.columns:
        raise FlywheelError(f"--prediction-column {prediction_column!r} is not a column of {current}")

    version = None
    loaded = None
    if reference_data is not None:
        profile = profile_frame(_read(reference_data, dataset, "reference data"), dataset)
        key, label = file_key("data", reference_data), f"reference data {Path(reference_data).name}"
    elif reference is not None and (Path(reference).is_file() or reference.endswith(".json")):
        profile = load_profile_file(Path(reference))
        key, label = file_key("profile", Path(reference)), f"profile {Path(reference).name}"
    else:
        if not tracking_uri or not audit_db_url:
            raise FlywheelError("a registry reference needs the MLflow tracking URI and the project database")
        from flywheel.audit import AuditLog
        from flywheel.registry import Registry

        registry = Registry(tracking_uri, AuditLog(audit_db_url))
        alias = reference or "champion"
        version = resolve_version(registry, model, alias)
        profile = load_version_profile(registry, model, version)
        key, label = f"v{version}", f"{alias} (v{version})" if alias.removeprefix("v") != version else f"v{version}"
        if profile.prediction is not None and prediction_column is None:
            loaded = registry.load(model, version=version)
    if profile.dataset != dataset.name:
        raise MonitoringError(f"the reference profile is of dataset {profile.dataset!r}, not {dataset.name!r}")

    predictions, note = None, ""
    if profile.prediction is None:
        note = "the reference has no prediction distribution"
    elif prediction_column is not None:
        predictions = numeric_values(window[prediction_column], f"prediction column {prediction_column!r}")
    elif loaded is not None:
        from flywheel.predictor import served_predictor

        try:  # through the predictor the service serves the version with
            predictions = np.asarray(served_predictor(loaded, dataset).predict_frame(window), float)
        except Exception as exc:  # a broken window (the data-quality verdict says how): no prediction drift
            note = f"the model could not score the window ({type(exc).__name__}: {exc})"
            log.warning(note)
    else:
        note = "no predictions for the window (give --prediction-column)"
    return BatchWindow(profile=profile, window=window, predictions=predictions, prediction_note=note, model=model,
                       version=version, reference=key, reference_label=label, start=start, end=end)


class BatchPerformance(BaseModel):
    """The batch's label-free estimate and, when it carries labels, the realized figures beside it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    estimate: Any = None  # performance.Estimate of every scored row
    realized: Any = None  # performance.Performance on the labelled rows
    error: Any = None  # performance.EstimateError: the estimate on those same rows minus realized
    labelled: int = 0


def batch_performance(batch: BatchWindow, dataset: DatasetDefinition, n_boot: int = 200, confidence: float = 0.95,
                      seed: int = 0) -> BatchPerformance:
    """Estimate of the batch's predictions; realized on its rows whose label is set (a batch file's labels
    are what happened to those rows: judged as they are)."""
    from flywheel.monitoring.performance import estimate_error, estimate_performance, realized_performance

    if batch.predictions is None or len(batch.predictions) == 0:
        return BatchPerformance()
    p = np.asarray(batch.predictions, float)
    ok = np.isfinite(p)
    if not ok.any():
        return BatchPerformance()
    estimate = estimate_performance(p[ok], n_boot, confidence, seed)
    if dataset.label not in batch.window.columns:
        return BatchPerformance(estimate=estimate)
    labels = batch.window[dataset.label]
    labelled = ok & labels.notna().to_numpy()
    if not labelled.any():
        return BatchPerformance(estimate=estimate)
    y = (labels[labelled].astype(str) == str(dataset.positive_label)).to_numpy(int)
    realized = realized_performance(y, p[labelled])
    same_rows = estimate_performance(p[labelled], n_boot, confidence, seed)
    return BatchPerformance(estimate=estimate, realized=realized, error=estimate_error(same_rows, realized),
                            labelled=int(labelled.sum()))
