"""Materialization into the online store: Flywheel's bulk load vs Feast's own `materialize`, same data, same run.

    uv run python -m tests.benchmarks.bench_materialize [--quick] [--rows N] [--entities N] [--stores sqlite,redis]

Generated offline data (default 1,000,000 feature rows over 100,000 entities, 10 features: 7 float, 2 int,
1 category, a few percent missing; `--quick`: 4,000 rows over 400 entities, the correctness-only size the
test suite runs), ingested as 10 batches. For each online store (SQLite file; Redis: a redis-server of the
benchmark's own on a free port, no persistence, stopped by pid), two Feast repos over the same offline folder:
- feast: `FeatureStore.materialize(start, end)` over the whole history;
- flywheel: `materialize_online` (a first, full load): DuckDB picks the newest row per entity from the part
  files, then the rows are written exactly as the store's own `online_write_batch` stores them (SQLite: one
  `executemany` in key order; Redis: the same HSETs, 500 entities per call of a server-side script, pipelined).
Rows/s is offline rows in the window per second of the load (entity rows written: one per entity); the CPU
time of the benchmark's process (the Redis server's apart) is the steadier figure on a busy machine. Then a
sample of entities is read back from both stores (the store's `online_read`) and compared: values and
event times must be identical.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests.benchmarks.common import BenchResult, Record, cli, run_bench

FULL = {"rows": 1_000_000, "entities": 100_000}
QUICK = {"rows": 4_000, "entities": 400}
BATCHES = 10
SAMPLE = 2_000  # entities compared between the two stores
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _dataset() -> Any:
    from flywheel.schemas import DatasetDefinition, FeatureSpec

    features = [*(FeatureSpec(name=f"f{i}", type="float") for i in range(7)),
                *(FeatureSpec(name=f"n{i}", type="int") for i in range(2)), FeatureSpec(name="cat", type="category")]
    return DatasetDefinition(name="bench", source=Path("unused"), entity="uid", timestamp="ts",
                             created_timestamp="arrived", label="y", features=features)


def _frame(rows: int, entities: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(np.sort(rng.integers(0, 30 * 86_400, rows)), unit="s")
    df = pd.DataFrame({"uid": rng.integers(0, entities, rows), "ts": ts,
                       "arrived": ts + pd.to_timedelta(rng.integers(0, 3_600, rows), unit="s"),
                       "y": rng.integers(0, 2, rows)})
    for i in range(7):
        x = rng.normal(i, 1 + i, rows).round(3)
        x[rng.random(rows) < 0.03] = np.nan
        df[f"f{i}"] = x
    for i in range(2):
        df[f"n{i}"] = pd.array(rng.integers(0, 100, rows), dtype="Int64")
        df.loc[rng.random(rows) < 0.02, f"n{i}"] = pd.NA
    df["cat"] = rng.choice(np.array(["a", "b", "c", "d", None], dtype=object), rows)
    return df


def _repo(home: Path, name: str, online: dict[str, Any]) -> Any:
    from flywheel import featurestore as fs
    from flywheel.settings import FeastOnlineConfig, StoresConfig

    stores = StoresConfig(feast_repo=Path(f"repo_{name}"), feast_registry=Path(f"registry_{name}.db"),
                          feast_online=FeastOnlineConfig(**online))
    return fs.open_store(fs.render_repo(stores, home))


def _online_pairs(store_kind: str, home: Path, redis_port: int | None) -> dict[str, dict[str, Any]]:
    if store_kind == "sqlite":
        return {name: {"type": "sqlite", "path": home / f"online_{name}.db"} for name in ("feast", "flywheel")}
    return {name: {"type": "redis", "connection_string": f"127.0.0.1:{redis_port},db={db}"}
            for name, db in (("feast", 1), ("flywheel", 2))}


def measure(rows: int, entities: int, stores: tuple[str, ...] = ("sqlite", "redis"), seed: int = 0) -> dict[str, Any]:
    from flywheel import featurestore as fs

    dataset = _dataset()
    out: dict[str, Any] = {"rows": rows, "entities": entities, "features": len(dataset.features), "stores": {}}
    with tempfile.TemporaryDirectory(prefix="bench-materialize-") as tmp:
        home, offline = Path(tmp), Path(tmp) / "offline"
        frame = _frame(rows, entities, seed)
        step = -(-rows // BATCHES)
        for i in range(BATCHES):
            fs.ingest_batch(frame.iloc[i * step:(i + 1) * step], dataset, offline, f"batch_{i:02d}")
        end = frame["arrived"].max().to_pydatetime() + timedelta(seconds=1)
        redis = None
        try:
            if "redis" in stores:
                from tests.production.conftest import PrivateRedis

                (home / "redis").mkdir()
                redis = PrivateRedis(home / "redis", persist=False)
                redis.start()
            for kind in stores:
                pair = _online_pairs(kind, home, redis.port if redis else None)
                feast_store = _repo(home, f"{kind}_feast", pair["feast"])
                ours = _repo(home, f"{kind}_flywheel", pair["flywheel"])
                service = fs.apply_definitions(feast_store, dataset, 60, offline)
                fs.apply_definitions(ours, dataset, 60, offline)
                start = frame["ts"].min().to_pydatetime()

                t0, c0 = time.perf_counter(), time.process_time()
                feast_store.materialize(start_date=start, end_date=end)
                feast_s, feast_cpu = time.perf_counter() - t0, time.process_time() - c0
                t0, c0 = time.perf_counter(), time.process_time()
                report = fs.materialize_online(ours, dataset, offline, end)
                ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
                (load,) = report.loads
                assert (load.mode, load.start, load.end) == ("full", start, end), load

                ids = sorted(frame["uid"].unique().tolist())
                sample = [*random.Random(seed).sample(ids, min(SAMPLE, len(ids))), entities + 1]
                a = fs.OnlineReader(ours, ours.get_feature_service(service)).read_timed(sample)
                b = fs.OnlineReader(feast_store, feast_store.get_feature_service(service)).read_timed(sample)
                differ = [e for e, x, y, tx, ty in zip(sample, a[0], b[0], a[1], b[1], strict=True)
                          if x != y or tx != ty]
                assert not differ, f"{kind}: {len(differ)} of {len(sample)} entities differ, e.g. {differ[:5]}"
                assert load.rows == len(ids), f"{kind}: {load.rows} entity rows written for {len(ids)} entities"
                out["stores"][kind] = {
                    "feast_seconds": feast_s, "flywheel_seconds": ours_s, "entity_rows": load.rows,
                    "feast_rows_per_s": rows / feast_s, "flywheel_rows_per_s": rows / ours_s,
                    "speedup": feast_s / ours_s, "compared": len(sample), "differ": len(differ),
                    "feast_cpu_seconds": feast_cpu, "flywheel_cpu_seconds": ours_cpu,
                }
        finally:
            if redis is not None:
                redis.stop()
    return out


TARGETS = {"sqlite": 1.5, "redis": 3.0}


def render(result: dict[str, Any]) -> str:
    lines = [f"Materialize {result['rows']:,} offline rows ({result['entities']:,} entities x "
             f"{result['features']} features), first full load:", "",
             "| online store | Feast `materialize` | Flywheel bulk load | speed-up | target | client CPU, Feast / "
             "Flywheel | values compared |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for kind, r in result["stores"].items():
        lines.append(
            f"| {kind} | {r['feast_seconds']:.1f} s ({r['feast_rows_per_s']:,.0f} rows/s) | "
            f"{r['flywheel_seconds']:.1f} s ({r['flywheel_rows_per_s']:,.0f} rows/s) | {r['speedup']:.2f}x | "
            f">= {TARGETS[kind]}x | {r['feast_cpu_seconds']:.1f} / {r['flywheel_cpu_seconds']:.1f} s | "
            f"{r['compared']:,} entities, {r['differ']} differ |")
    return "\n".join(lines)


def records(r: dict[str, Any]) -> list[Record]:
    return [Record(benchmark="materialize", name=f"{kind}: {r['rows']:,} rows, first full load",
                   ours=x["flywheel_rows_per_s"], baseline=x["feast_rows_per_s"], baseline_name="Feast materialize",
                   unit="rows/s", better="higher", target=f">= {TARGETS[kind]}x Feast's rate",
                   met=x["speedup"] >= TARGETS[kind], note=f"{x['differ']} of {x['compared']} entities differ")
            for kind, x in r["stores"].items()]


def bench(quick: bool, stores: tuple[str, ...] = ("sqlite", "redis")) -> BenchResult:
    def run() -> tuple[dict[str, Any], list[Record], list]:
        result = measure(stores=stores, **(QUICK if quick else FULL))
        return result, records(result), []

    return run_bench("materialize", quick, run, render)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--stores", type=lambda s: tuple(s.split(",")), default=("sqlite", "redis"))
        parser.add_argument("--seed", type=int, default=0)

    cli(__doc__, FULL, QUICK, measure, render, argv, extra,
        call=lambda args, size: measure(stores=args.stores, seed=args.seed, **size))


if __name__ == "__main__":
    main()
