"""Inference paths, side by side in one run: the sklearn pipeline vs the numpy replay vs ONNX Runtime.

    make bench-inference            # or: uv run python -m tests.benchmarks.bench_inference [--quick]

For logistic regression, histogram gradient boosting and a 100-tree random forest, each fitted by
`flywheel.training.build_pipeline` (median imputation, scaling for the linear model, most-frequent
categorical imputation, one-hot) on the demo churn data, every path is built by
`flywheel.predictor.build_predictor(..., paths=[kind])`, the function the service and the gates use,
and measured on what a request executes (raw feature dicts in, P(positive) out), one thread:

- single row: p50 / p99 over `--calls` calls after warm-up, on rows drawn from the holdout;
- batch of 100 rows: p50 / p99;
- max |P(positive) difference| against `pipeline.predict_proba` on the probe rows (every category,
  an unseen one, missing values, the range ends) plus the whole holdout;
- build time (conversion + session for ONNX, verification included) and the process RSS it added.

`--quick` is the correctness-only size the test suite runs (no timing is asserted anywhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads: single-threaded, as the service runs

import numpy as np
import pandas as pd
import psutil

from tests.benchmarks.common import BenchResult, Record, run_bench

PROJECT = Path(__file__).resolve().parents[2]
# p99 of 1,000 calls rests on its 10 slowest: steady enough here, and half of the 2,000 calls' two minutes, most of
# them the scikit-learn baseline's (make bench's 20-minute budget)
FULL_CALLS, QUICK_CALLS = 1_000, 60
FAMILIES: dict[str, dict[str, Any]] = {
    "logistic_regression": {"C": 1.0},
    "hist_gradient_boosting": {"max_iter": 100, "learning_rate": 0.1, "max_depth": 5},
    "random_forest": {"n_estimators": 100},
}


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _times(fn: Any, inputs: list[Any], warmup: int) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    out = np.empty(len(inputs))
    with threadpool_limits(limits=1):
        for x in inputs[:warmup]:
            fn(x)
        for i, x in enumerate(inputs):
            t0 = time.perf_counter()
            fn(x)
            out[i] = (time.perf_counter() - t0) * 1000.0
    return out


def measure(quick: bool, calls: int) -> list[dict[str, Any]]:
    from flywheel.datagen import GeneratorSpec, generate
    from flywheel.gates import request_rows
    from flywheel.predictor import PATHS, build_predictor, probe_rows
    from flywheel.schemas import load_dataset
    from flywheel.settings import ImputationConfig
    from flywheel.training import build_pipeline, fit

    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    days, per_day = (6, 300) if quick else (28, 1000)
    batches = [df for _, df in generate(GeneratorSpec(seed=42, days=days, rows_per_day=per_day))]
    train, holdout = pd.concat(batches[:-3], ignore_index=True), pd.concat(batches[-3:], ignore_index=True)
    rows = request_rows(holdout, ds.feature_names)
    rng = np.random.default_rng(0)
    singles = [[rows[i]] for i in rng.integers(0, len(rows), calls)]
    batches100 = [[rows[i] for i in rng.integers(0, len(rows), 100)] for _ in range(max(10, calls // 10))]
    n_probe = len(probe_rows(ds, ds.feature_names))
    results = []
    for family, params in FAMILIES.items():
        if quick and family == "random_forest":
            params = {**params, "n_estimators": 10}
        pipeline = fit(build_pipeline(family, params, ds, ImputationConfig(), 42), train, ds)
        for kind in PATHS:
            before = _rss_mb()
            t0 = time.perf_counter()
            try:
                pred = build_predictor(pipeline, ds, verify=holdout, paths=[kind])
            except Exception as exc:
                results.append({"family": family, "path": kind, "error": str(exc)[:200]})
                continue
            build_ms = (time.perf_counter() - t0) * 1000
            rss = _rss_mb() - before
            one = _times(pred.predict_rows, singles, warmup=20)
            hundred = _times(pred.predict_rows, batches100, warmup=3)
            results.append({
                "family": family, "path": kind,
                "single_p50_ms": float(np.percentile(one, 50)), "single_p99_ms": float(np.percentile(one, 99)),
                "batch100_p50_ms": float(np.percentile(hundred, 50)),
                "batch100_p99_ms": float(np.percentile(hundred, 99)),
                "max_abs_diff": pred.max_abs_diff, "verified_rows": pred.verified_rows, "probe_rows": n_probe,
                "build_ms": build_ms, "rss_added_mb": rss,
            })
            del pred
    return results


def render(results: list[dict[str, Any]]) -> str:
    ref = {r["family"]: r for r in results if r["path"] == "pipeline" and "error" not in r}
    lines = [
        "| family | path | single p50 / p99 ms | vs pipeline (p99) | batch-100 p50 / p99 ms | max abs dp "
        "| build ms | RSS added MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['path']} | does not apply: {r['error'][:80]} | | | | | |")
            continue
        base = ref.get(r["family"])
        ratio = "1x"
        if base and r["path"] != "pipeline":
            ratio = f"{base['single_p99_ms'] / r['single_p99_ms']:.0f}x faster"
        lines.append(
            f"| {r['family']} | {r['path']} | {r['single_p50_ms']:.3f} / {r['single_p99_ms']:.3f} | {ratio} "
            f"| {r['batch100_p50_ms']:.2f} / {r['batch100_p99_ms']:.2f} | {r['max_abs_diff']:.1e} "
            f"| {r['build_ms']:.0f} | {r['rss_added_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, few calls: correctness only")
    parser.add_argument("--calls", type=int, default=None, help=f"single-row calls per path (default {FULL_CALLS})")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else FULL_CALLS)
    load = os.getloadavg()
    results = measure(args.quick, calls)
    print(f"# Inference paths ({os.cpu_count()} cores, load {load[0]:.2f} before / {os.getloadavg()[0]:.2f} after, "
          f"{calls} single-row calls per path)\n")
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def records(results: list[dict[str, Any]]) -> list[Record]:
    """Per family, the fastest other path's single-row p99 against the scikit-learn pipeline's."""
    out = []
    for family in dict.fromkeys(r["family"] for r in results):
        ok = [r for r in results if r["family"] == family and "error" not in r]
        base = next((r for r in ok if r["path"] == "pipeline"), None)
        best = min((r for r in ok if r["path"] != "pipeline"), key=lambda r: r["single_p99_ms"], default=None)
        if base and best:
            out.append(Record(benchmark="inference", name=f"{family}: one row, p99 ({best['path']})",
                              ours=best["single_p99_ms"], baseline=base["single_p99_ms"],
                              baseline_name="scikit-learn pipeline", unit="ms",
                              note=f"max |dp| {best['max_abs_diff']:.1e}"))
    return out


def bench(quick: bool) -> BenchResult:
    def run() -> tuple[dict[str, Any], list[Record], list]:
        results = measure(quick, QUICK_CALLS if quick else FULL_CALLS)
        return {"size": {"quick": quick}, "paths": results}, records(results), []

    return run_bench("inference", quick, run, lambda r: render(r["paths"]))


if __name__ == "__main__":
    sys.exit(main())
