"""The human report of a window: Evidently's DataDriftPreset and DataSummaryPreset as one HTML file.

Monitoring never reads the training set again, so the report's reference is rebuilt from the profile:
`report.reference_rows` rows (5,000 by default; fewer when the reference itself was smaller, then exactly
its values) drawn column by column from each feature's quantile function or category counts, with the
reference's missing shares (`profile.reference_sample`). Only the marginals are real: the reference's
correlation plots mean nothing. The current side is the window itself, sampled down to
`report.max_current_rows` when larger (Evidently does not sample and is slow on large frames). Each column
is compared with the method and threshold the project's verdict used, so the report names the same test;
the scores in the report come from the rebuilt sample and can differ slightly from the recorded ones,
which are computed from the profile itself. A column the window lacks, or holds nothing usable in, is
left out of the report (Evidently raises on an empty column); the data-quality verdict names it.
Evidently is imported here only (4-9 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.monitoring.config import ReportSettings
from flywheel.monitoring.drift import DriftResult
from flywheel.monitoring.profile import (
    MonitoringError,
    NumericSummary,
    ReferenceProfile,
    numeric_values,
    reference_sample,
)


def report_frames(profile: ReferenceProfile, window: pd.DataFrame, cfg: ReportSettings
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference sample, current sample) with the profile's feature columns, numeric ones as float."""
    reference = reference_sample(profile, cfg.reference_rows, cfg.seed)
    current = window.sample(n=cfg.max_current_rows, random_state=cfg.seed) if len(window) > cfg.max_current_rows \
        else window
    cols = [c for c in profile.features if c in current.columns]
    current = current[cols].copy()
    keep = []
    for name in cols:  # a broken column (not numeric, nothing but nulls) is left out: Evidently raises on it
        if isinstance(profile.features[name], NumericSummary):
            try:
                current[name] = numeric_values(current[name], name)
            except MonitoringError:
                continue
            usable = np.isfinite(current[name]).any() and np.isfinite(reference[name].astype(float)).any()
        else:
            usable = current[name].notna().any() and reference[name].notna().any()
        if usable:
            keep.append(name)
    return reference[keep], current[keep].reset_index(drop=True)


def write_report(profile: ReferenceProfile, window: pd.DataFrame, drift: DriftResult, path: Path,
                 cfg: ReportSettings) -> Path:
    """Write the window's HTML report to `path` (its folder created); returns `path`."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    reference, current = report_frames(profile, window, cfg)
    cols = list(current.columns)
    numeric = [c for c in cols if profile.features[c].kind == "numeric"]
    categorical = [c for c in cols if c not in numeric]
    judged = {c.column: c for c in drift.columns if c.judged and c.column in cols}
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    report = Report([
        DataDriftPreset(columns=cols, per_column_method={c: j.method for c, j in judged.items()},
                        per_column_threshold={c: j.threshold for c, j in judged.items()}),
        DataSummaryPreset(),
    ])
    snapshot = report.run(Dataset.from_pandas(current, data_definition=definition),
                          Dataset.from_pandas(reference, data_definition=definition))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    snapshot.save_html(str(tmp))
    tmp.replace(path)
    return path
