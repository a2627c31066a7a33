"""Cost of ingesting one batch as the offline store grows: the partitioned store vs the old single-file rewrite.

    uv run python -m tests.benchmarks.bench_ingest [--quick] [--rows N] [--levels 10,100,1000] [--repeats K]

A churn batch (default 1,000 rows, the churn dataset's columns) is ingested into an offline store that already
holds 10, 100 and 1,000 batches (`--quick`: 2, 5 and 10 batches of 50 rows, the correctness-only size the test
suite runs). At each level:
- flywheel: `ingest_batch` of K new batches (median wall and CPU time per batch): one part file per table, one
  ledger line and the index's lookups and update (flywheel/ledger.py); no stored rows, no other batch's ledger
  record and no listing of the part folders are read;
- single file: what ingest did before (read the whole batch-id column to find duplicates, then read the whole
  file, append, rewrite it), timed on a single file holding the same rows.
Each batch differs from the others (timestamps shifted by a day per batch), so none is a duplicate.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from tests.benchmarks.common import BenchResult, GrowthPoint, Record, cli, isolated, run_bench

PROJECT = Path(__file__).resolve().parents[2]
FULL = {"rows": 1_000, "levels": (10, 100, 1_000), "repeats": 7}
QUICK = {"rows": 50, "levels": (2, 5, 10), "repeats": 2}


def _dataset() -> Any:
    from flywheel.schemas import load_dataset

    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


def _batches(rows: int, seed: int = 7) -> tuple[Any, pd.DataFrame]:
    from flywheel.datagen import GeneratorSpec, generate_day

    dataset = _dataset()
    base = generate_day(GeneratorSpec(seed=seed, days=1, rows_per_day=rows, customers=max(rows * 4, 100)), 0)
    return dataset, base


def _shifted(base: pd.DataFrame, dataset: Any, i: int) -> pd.DataFrame:
    """Batch number i: the base batch a day later per i (distinct content, same shape)."""
    out = base.copy()
    for col in {dataset.timestamp, dataset.created_timestamp, dataset.label_timestamp} - {None}:
        out[col] = out[col] + pd.Timedelta(days=i)
    return out


def _single_file_append(path: Path, rows: pd.DataFrame, batch_id: str, column: str) -> None:
    """The ingest of earlier versions, for one table: duplicate check on the whole id column, then a rewrite."""
    if path.exists() and batch_id in set(pq.read_table(path, columns=[column]).column(column).to_pylist()):
        return
    frame = pd.concat([pd.read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def measure(rows: int, levels: tuple[int, ...], repeats: int) -> dict[str, Any]:
    from flywheel import featurestore as fs

    dataset, base = _batches(rows)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        offline, legacy = Path(tmp) / "offline", Path(tmp) / "legacy"
        legacy.mkdir()
        n = 0
        for level in levels:
            while n < level:  # grow the store to `level` batches (not timed)
                fs.ingest_batch(_shifted(base, dataset, n), dataset, offline, f"batch_{n:05d}")
                n += 1
            # the same history as single files, written at once (building them by rewrites is quadratic)
            features = pd.concat([fs._feature_rows(_shifted(base, dataset, i), dataset, f"batch_{i:05d}")
                                  for i in range(level)], ignore_index=True)
            labels = pd.concat([fs._label_rows(_shifted(base, dataset, i), dataset, f"batch_{i:05d}")
                                for i in range(level)], ignore_index=True)
            features.to_parquet(legacy / fs.FEATURES_FILE, index=False)
            labels.to_parquet(legacy / fs.LABELS_FILE, index=False)

            ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
            for k in range(repeats):
                batch = _shifted(base, dataset, n)
                t0, c0 = time.perf_counter(), time.process_time()
                report = fs.ingest_batch(batch, dataset, offline, f"batch_{n:05d}")
                ours.append(time.perf_counter() - t0)
                ours_cpu.append(time.process_time() - c0)
                assert not report.skipped and report.feature_rows == rows
                n += 1
                # the old way, on its own copy of the same history plus the batches added so far at this level
                bid = f"batch_{level + k:05d}"
                f_rows, l_rows = fs._feature_rows(batch, dataset, bid), fs._label_rows(batch, dataset, bid)
                t0, c0 = time.perf_counter(), time.process_time()
                _single_file_append(legacy / fs.FEATURES_FILE, f_rows, bid, fs.BATCH_COLUMN)
                _single_file_append(legacy / fs.LABELS_FILE, l_rows, bid, fs.BATCH_COLUMN)
                theirs.append(time.perf_counter() - t0)
                theirs_cpu.append(time.process_time() - c0)
            stored = fs.ingested_batches(dataset, offline)
            total = sum(e["feature_rows"] for e in stored.values())
            parts = len(list((offline / dataset.name / fs.FEATURES_FILE).glob("*.parquet")))
            assert total == n * rows, f"{total} rows stored for {n} batches"
            assert pq.ParquetFile(legacy / fs.FEATURES_FILE).metadata.num_rows == (level + repeats) * rows
            assert parts == n, f"{parts} part files for {n} batches"
            out.append({"existing_batches": level, "stored_rows": level * rows,
                        "flywheel_ms": 1000 * statistics.median(ours),
                        "single_file_ms": 1000 * statistics.median(theirs),
                        "flywheel_cpu_ms": 1000 * statistics.median(ours_cpu),
                        "single_file_cpu_ms": 1000 * statistics.median(theirs_cpu)})
        # the partitioned store reads back whole, in ingest order
        ids = pq.read_table(offline / dataset.name / fs.FEATURES_FILE, columns=[fs.BATCH_COLUMN]).column(0)
        assert ids.to_pylist() == [f"batch_{i:05d}" for i in range(n) for _ in range(rows)]
    return {"rows_per_batch": rows, "repeats": repeats, "levels": out}


def render(result: dict[str, Any]) -> str:
    lines = [f"Ingest of one {result['rows_per_batch']:,}-row batch, median of {result['repeats']} "
             "(wall / CPU of the process; CPU is the steadier figure on a busy machine):", "",
             "| existing batches | stored rows | flywheel (part + ledger + index) | single-file rewrite (before) |",
             "|---:|---:|---:|---:|"]
    for r in result["levels"]:
        lines.append(f"| {r['existing_batches']:,} | {r['stored_rows']:,} | "
                     f"{r['flywheel_ms']:.0f} / {r['flywheel_cpu_ms']:.0f} ms | "
                     f"{r['single_file_ms']:.0f} / {r['single_file_cpu_ms']:.0f} ms |")
    return "\n".join(lines)


GROWTH = {"full": (10_000, 100_000, 1_000_000), "quick": (500, 2_000, 5_000)}


def write_growth_batch(rows: int, path: str) -> dict[str, Any]:
    """Generate one `rows`-row batch into a parquet file (its own process: the generator's peak, about 2.9 GB at 1M
    rows for 4M customers, is not the ingest's and must not be counted as it)."""
    _, base = _batches(rows)
    base.to_parquet(path, index=False)
    return {"rows": len(base)}


def growth_point(path: str) -> dict[str, Any]:
    """Read a generated batch and ingest it into an empty store (run in a fresh process: `common.isolated`); the
    peak counts the batch in memory, as any ingest holds it."""
    from flywheel import featurestore as fs

    dataset, batch = _dataset(), pd.read_parquet(path)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-growth-") as tmp:
        t0 = time.perf_counter()
        report = fs.ingest_batch(batch, dataset, Path(tmp), "growth")
        seconds = time.perf_counter() - t0
    assert report.feature_rows == len(batch)
    return {"seconds": seconds}


def records(r: dict[str, Any]) -> list[Record]:
    last = r["levels"][-1]
    first = r["levels"][0]
    growth = last["flywheel_cpu_ms"] / first["flywheel_cpu_ms"]
    return [
        Record(benchmark="ingest", name=f"one {r['rows_per_batch']:,}-row batch into {last['existing_batches']:,} "
               "stored batches (wall)", ours=last["flywheel_ms"], baseline=last["single_file_ms"],
               baseline_name="single-file rewrite (before)", unit="ms"),
        Record(benchmark="ingest", name=f"CPU per batch at {last['existing_batches']:,} vs "
               f"{first['existing_batches']:,} stored batches", ours=growth, unit="x",
               target="<= 2x (independent of the history)", met=growth <= 2.0),
    ]


def bench(quick: bool) -> BenchResult:
    def run() -> tuple[dict[str, Any], list[Record], list[GrowthPoint]]:
        result = measure(**(QUICK if quick else FULL))
        points = []
        for rows in GROWTH["quick" if quick else "full"]:
            with tempfile.TemporaryDirectory(prefix="bench-ingest-batch-") as tmp:
                path = str(Path(tmp) / "batch.parquet")
                isolated("tests.benchmarks.bench_ingest:write_growth_batch", rows=rows, path=path)
                got = isolated("tests.benchmarks.bench_ingest:growth_point", path=path)
            points.append(GrowthPoint(stage="ingest", rows=rows, seconds=got["result"]["seconds"],
                                      peak_mb=got["peak_mb"]))
        return result, records(result), points

    return run_bench("ingest", quick, run, render)


def main(argv: list[str] | None = None) -> None:
    cli(__doc__, FULL, QUICK, measure, render, argv)


if __name__ == "__main__":
    main()
