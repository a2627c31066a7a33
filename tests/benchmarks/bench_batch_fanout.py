"""Batch scoring serial vs partitions fanned out on a local Dask cluster (Prefect's Dask task runner).

    uv run python -m tests.benchmarks.bench_batch_fanout [--quick] [--rows N] [--entities N] [--workers N]

The demo churn dataset generated at `--rows` feature rows over `--entities` customers (default 1,000,000 rows,
250,000 entities; `--quick`: 12,000 rows, 3,000 entities, the correctness-only size), ingested into an offline
store in a temp folder with the dataset's Feast definitions applied, and a logistic regression fitted on a sample.
`tasks.score.score_entities` (the batch scoring flow's task: the offline features at `at` through the model's
feature service, the predictions, one parquet file) runs twice on every entity: serial (one retrieval for all),
then in partitions of `--partition-rows` on `--workers` local Dask workers of one thread each. Reported: both wall
times and the ratio, the cluster's start-up apart, whether both files hold the same rows and scores, and the
offline feature rows each run read (the partitions read only their own entities' rows: together, what serial reads).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.benchmarks.common import BenchResult, Record, cli, sized_bench

PROJECT = Path(__file__).resolve().parents[2]
FULL = {"rows": 1_000_000, "entities": 250_000, "workers": 2, "partition_rows": 50_000}
QUICK = {"rows": 12_000, "entities": 3_000, "workers": 2, "partition_rows": 1_000}


def measure(rows: int, entities: int, workers: int, partition_rows: int, seed: int = 5) -> dict[str, Any]:
    """Both runs against a temporary Prefect server; the Dask workers inherit its URL from the environment."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-batch-fanout-") as tmp, \
            prefect_test_harness(server_startup_timeout=900):
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        try:
            return _measure(Path(tmp), rows, entities, workers, partition_rows, seed)
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def _measure(home: Path, rows: int, entities: int, workers: int, partition_rows: int, seed: int) -> dict[str, Any]:
    import pandas as pd

    from flywheel import featurestore as fs
    from flywheel import scoring, training
    from flywheel.datagen import GeneratorSpec, generate
    from flywheel.registry import LoadedModel
    from flywheel.schemas import load_dataset
    from flywheel.settings import ImputationConfig, ParallelismConfig, StoresConfig
    from tasks.score import score_entities

    dataset = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    days = 28
    spec = GeneratorSpec(seed=seed, days=days, rows_per_day=max(1, rows // days), customers=entities)
    offline = home / "offline"
    frames = []
    for i, (_, df) in enumerate(generate(spec)):
        fs.ingest_batch(df, dataset, offline, f"batch_{i:02d}")
        frames.append(df)
    frame = pd.concat(frames, ignore_index=True)
    at = pd.Timestamp(frame[dataset.timestamp].max()).to_pydatetime() + timedelta(seconds=1)
    repo = fs.render_repo(StoresConfig(feast_repo=Path("repo"), feast_registry=Path("registry.db")), home)
    service = fs.apply_definitions(fs.open_store(repo), dataset, 60, offline)
    sample = frame.sample(min(len(frame), 20_000), random_state=seed)
    pipeline = training.fit(training.build_pipeline("logistic_regression", {}, dataset, ImputationConfig(), seed),
                            sample, dataset)
    model = LoadedModel(pipeline=pipeline, name="churn", version="1", run_id=None, source="bench", digests={},
                        trusted_types=[], tags={scoring.TAG_FEATURE_SERVICE: service})
    ids = scoring.offline_entities(dataset, offline, at)
    load_before = os.getloadavg()
    out: dict[str, Any] = {"size": {"rows": len(frame), "entities": len(ids), "workers": workers,
                                    "partition_rows": partition_rows}}
    files = {}
    for name, par in (("serial", ParallelismConfig()), ("dask", ParallelismConfig(workers=workers))):
        t0 = time.perf_counter()
        report = score_entities.fn(repo, model, dataset, ids, at, home / f"out_{name}", at, par, partition_rows)
        wall = time.perf_counter() - t0
        # the scoring's own time (batch_score's summary): the wall minus it is the cluster's start and stop
        out[name] = {"wall_s": wall, "scoring_s": report.seconds, "rows": report.rows,
                     "scored_rows": report.scored_rows, "feature_rows_read": report.feature_rows_read}
        files[name] = pd.read_parquet(report.path)
    a, b = files["serial"], files["dask"]
    columns = [c for c in a.columns if c != "scored_at"]
    out["same_rows_and_scores"] = bool(a[columns].reset_index(drop=True).equals(b[columns].reset_index(drop=True)))
    out["speedup"] = out["serial"]["wall_s"] / out["dask"]["scoring_s"]
    out["speedup_with_cluster"] = out["serial"]["wall_s"] / out["dask"]["wall_s"]
    out["machine"] = {"cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()}
    return out


def render(r: dict[str, Any]) -> str:
    z, s, d, m = r["size"], r["serial"], r["dask"], r["machine"]
    return "\n".join([
        f"{z['rows']:,} feature rows, {z['entities']:,} entities scored; {z['workers']} Dask workers x 1 thread, "
        f"partitions of {z['partition_rows']:,}; machine {m['cores']} cores, load {m['load_before'][0]:.1f} before, "
        f"{m['load_after'][0]:.1f} after",
        "",
        "| run | scoring | whole task (cluster start and stop included) |",
        "|---|---|---|",
        f"| serial | {s['scoring_s']:.1f} s | {s['wall_s']:.1f} s |",
        f"| dask ({z['workers']} workers) | {d['scoring_s']:.1f} s | {d['wall_s']:.1f} s |",
        "",
        f"speed-up {r['speedup']:.2f}x ({r['speedup_with_cluster']:.2f}x counting the cluster); same rows and "
        f"scores: {r['same_rows_and_scores']}",
        f"offline feature rows read: serial {s.get('feature_rows_read', 0):,}, dask partitions together "
        f"{d.get('feature_rows_read', 0):,} (each partition reads only its entities' rows)",
    ])


def records(r: dict[str, Any]) -> list[Record]:
    z = r["size"]
    return [Record(benchmark="batch_fanout", name=f"batch scoring of {z['entities']:,} entities, {z['workers']} "
                   f"Dask workers", ours=r["dask"]["scoring_s"], baseline=r["serial"]["wall_s"],
                   baseline_name="serial scoring", unit="s",
                   note=f"{r['speedup_with_cluster']:.2f}x counting the cluster; same rows and scores "
                   f"{r['same_rows_and_scores']}")]


def bench(quick: bool) -> BenchResult:
    return sized_bench("batch_fanout", quick, FULL, QUICK, measure, records, render)


def main(argv: list[str] | None = None) -> None:
    cli(__doc__, FULL, QUICK, measure, render, argv)


if __name__ == "__main__":
    main()
