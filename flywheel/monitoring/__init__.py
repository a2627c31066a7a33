"""Monitoring: the reference profile taken at training time, drift and data quality of serving windows
against it, the alarm discipline, the history of judged windows and the human (Evidently) report.

Modules: `profile` (the reference profile), `drift` (per-feature verdicts, Evidently 0.7's methods),
`quality` (data-quality counts and the Great Expectations suite), `alarms` (minimum sample, false
discovery rate, dataset-level rule, persistence), `history` (the `flywheel_monitoring_windows` table),
`report` (Evidently HTML), `reference` (where profiles are stored), `window` (one window end to end),
`config` (configs/monitoring.yaml). Nothing here imports Prefect; Evidently, Great Expectations and
MLflow are imported inside the functions that need them.
"""
