"""How far the label-free performance estimate sits from the realized metrics, per seed and drift.

    uv run python -m tests.benchmarks.bench_performance_estimate                    # 28,000-row windows
    uv run python -m tests.benchmarks.bench_performance_estimate --rows-per-day 1000 --window-days 7
    uv run python -m tests.benchmarks.bench_performance_estimate --quick   # one seed, 7 + 7 days of 300 rows

For each seed: a logistic regression (C=1, flywheel.training.build_pipeline) is fitted on `--train-days`
drift-free days of the project's generator, then judged on the next `--window-days` days generated
again with covariate drift 0, 0.25, .., 1 and with concept drift 0.25, 0.5, 1 (same seed, same
customers). Each window prints the estimate, the realized metric on the real labels, estimate -
realized, whether the interval covered it, and the ECE; then a per-seed table (the figures behind
COVARIATE_TOLERANCE in flywheel/monitoring/performance.py and docs_snippets/performance_estimate.md).
`--quick` is the correctness-only size tests/unit/test_bench_performance_estimate.py runs (its errors are
those of 2,100-row windows and say nothing about the tolerance).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from flywheel.datagen import DriftSpec, GeneratorSpec, generate
from flywheel.gates import expected_calibration_error
from flywheel.monitoring.performance import (
    COVARIATE_TOLERANCE,
    estimate_error,
    estimate_performance,
    realized_performance,
)
from flywheel.schemas import load_dataset
from flywheel.settings import ImputationConfig
from flywheel.training import build_pipeline, fit, labels, predict_scores
from tests.benchmarks.common import cli
from tests.conftest import PROJECT

DRIFTS = [("covariate", s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] + [("concept", s) for s in (0.25, 0.5, 1.0)]
FULL: dict[str, Any] = {"seeds": tuple(range(1, 13)), "train_days": 14, "window_days": 14, "rows_per_day": 2000,
                        "n_boot": 200}
QUICK: dict[str, Any] = {"seeds": (1,), "train_days": 7, "window_days": 7, "rows_per_day": 300, "n_boot": 50}


def measure(seeds: tuple[int, ...], train_days: int, window_days: int, rows_per_day: int, n_boot: int
            ) -> dict[str, Any]:
    """Every window (seed x drift) with its estimate, realized metrics and error, and the per-seed summary."""
    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    windows: list[dict[str, Any]] = []
    table = []
    for seed in seeds:
        days = train_days + window_days
        base = GeneratorSpec(seed=seed, days=days, rows_per_day=rows_per_day, drift_from_day=train_days)
        train = pd.concat([df for _, df in generate(base)[:train_days]], ignore_index=True)
        model = fit(build_pipeline("logistic_regression", {"C": 1.0}, ds, ImputationConfig(), seed), train, ds)
        worst_auc = worst_acc = 0.0
        for kind, strength in DRIFTS:
            spec = base.model_copy(update={"drift": DriftSpec(**{kind: strength})})
            frame = pd.concat([df for _, df in generate(spec)[train_days:]], ignore_index=True)
            p, y = predict_scores(model, frame, ds), labels(frame, ds).to_numpy()
            est, real = estimate_performance(p, n_boot, 0.95, seed), realized_performance(y, p)
            err = estimate_error(est, real)
            ece = expected_calibration_error(y, p, 10)
            windows.append({"seed": seed, "kind": kind, "strength": strength, "estimate": est.as_dict(),
                            "realized": real.as_dict(), "error": err.as_dict(), "ece": ece})
            print(
                f"seed {seed:>2} {kind:>9} {strength:.2f} n={real.n} positives {real.positive_rate:.3f} "
                f"(expected {est.expected_positive_rate:.3f}) ECE {ece:.3f} | "
                f"AUC est {est.roc_auc.value:.4f} real {real.roc_auc:.4f} err {err.roc_auc.error:+.4f} "
                f"covered {err.roc_auc.covered!s:>5} | ACC est {est.accuracy.value:.4f} real {real.accuracy:.4f} "
                f"err {err.accuracy.error:+.4f} covered {err.accuracy.covered!s:>5}",
                flush=True,
            )
            if kind == "covariate":
                worst_auc = max(worst_auc, err.roc_auc.abs_error)
                worst_acc = max(worst_acc, err.accuracy.abs_error)
            elif strength == 1.0:
                concept = (err.roc_auc.error, err.accuracy.error)
        table.append({"seed": seed, "covariate_max_abs_error": {"roc_auc": worst_auc, "accuracy": worst_acc},
                      "concept_1_gap": {"roc_auc": concept[0], "accuracy": concept[1]}})
    return {"size": {"seeds": list(seeds), "train_days": train_days, "window_days": window_days,
                     "rows_per_day": rows_per_day, "n_boot": n_boot}, "windows": windows, "seeds": table}


def render(result: dict[str, Any]) -> str:
    """The per-seed table."""
    lines = [f"\nCOVARIATE_TOLERANCE = {COVARIATE_TOLERANCE}",
             "| seed | covariate only: max abs error AUC / accuracy | concept 1.0: gap AUC / accuracy |",
             "|---:|---|---|"]
    for row in result["seeds"]:
        wa, wc = row["covariate_max_abs_error"]["roc_auc"], row["covariate_max_abs_error"]["accuracy"]
        ga, gc = row["concept_1_gap"]["roc_auc"], row["concept_1_gap"]["accuracy"]
        lines.append(f"| {row['seed']} | {wa:.3f} / {wc:.3f} | {ga:+.3f} / {gc:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, FULL, QUICK, measure, render)


if __name__ == "__main__":
    main()
