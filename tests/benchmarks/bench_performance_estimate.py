"""How far the label-free performance estimate sits from the realized metrics, per seed and drift.

    uv run python -m tests.benchmarks.bench_performance_estimate                    # 28,000-row windows
    uv run python -m tests.benchmarks.bench_performance_estimate --rows-per-day 1000 --window-days 7

For each seed: a logistic regression (C=1, flywheel.training.build_pipeline) is fitted on `--train-days`
drift-free days of the project's generator, then judged on the next `--window-days` days generated
again with covariate drift 0, 0.25, .., 1 and with concept drift 0.25, 0.5, 1 (same seed, same
customers). Each window prints the estimate, the realized metric on the real labels, estimate -
realized, whether the interval covered it, and the ECE; then a per-seed table (the figures behind
COVARIATE_TOLERANCE in flywheel/monitoring/performance.py and docs_snippets/performance_estimate.md).
"""

from __future__ import annotations

import argparse

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
from tests.conftest import PROJECT

DRIFTS = [("covariate", s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] + [("concept", s) for s in (0.25, 0.5, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10,11,12")
    ap.add_argument("--train-days", type=int, default=14)
    ap.add_argument("--window-days", type=int, default=14)
    ap.add_argument("--rows-per-day", type=int, default=2000)
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()
    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    table = []
    for seed in (int(s) for s in args.seeds.split(",")):
        days = args.train_days + args.window_days
        base = GeneratorSpec(seed=seed, days=days, rows_per_day=args.rows_per_day, drift_from_day=args.train_days)
        train = pd.concat([df for _, df in generate(base)[: args.train_days]], ignore_index=True)
        model = fit(build_pipeline("logistic_regression", {"C": 1.0}, ds, ImputationConfig(), seed), train, ds)
        worst_auc = worst_acc = 0.0
        for kind, strength in DRIFTS:
            spec = base.model_copy(update={"drift": DriftSpec(**{kind: strength})})
            frame = pd.concat([df for _, df in generate(spec)[args.train_days :]], ignore_index=True)
            p, y = predict_scores(model, frame, ds), labels(frame, ds).to_numpy()
            est, real = estimate_performance(p, args.n_boot, 0.95, seed), realized_performance(y, p)
            err = estimate_error(est, real)
            print(
                f"seed {seed:>2} {kind:>9} {strength:.2f} n={real.n} positives {real.positive_rate:.3f} "
                f"(expected {est.expected_positive_rate:.3f}) ECE {expected_calibration_error(y, p, 10):.3f} | "
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
        table.append((seed, worst_auc, worst_acc, *concept))
    print(f"\nCOVARIATE_TOLERANCE = {COVARIATE_TOLERANCE}")
    print("| seed | covariate only: max abs error AUC / accuracy | concept 1.0: gap AUC / accuracy |")
    print("|---:|---|---|")
    for seed, wa, wc, ga, gc in table:
        print(f"| {seed} | {wa:.3f} / {wc:.3f} | {ga:+.3f} / {gc:+.3f} |")


if __name__ == "__main__":
    main()
