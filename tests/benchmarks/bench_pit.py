"""Point-in-time join: Flywheel's DuckDB ASOF join vs Feast's `get_historical_features` (DuckDB offline store).

    uv run python -m tests.benchmarks.bench_pit [--quick] [--entity-rows N --feature-rows N] [--skip-feast]

Generated data (default 1,000,000 entity rows against 10,000,000 feature rows; `--quick`: 20,000 against
200,000, the correctness-only size the test suite runs), three feature views of one entity in a real Feast
repo (local provider, DuckDB offline store), each source a parquet file with a created (arrival) column:
  activity  50% of the rows, 4 float features, TTL 7 days
  billing   30% of the rows, 2 float + 1 int feature, TTL 30 days
  profile   20% of the rows, 2 float + 1 string feature, TTL 90 days
Arrival is event time + an exponential lag (mean 1 h); 2% of rows are backfills arriving up to 30 days
late; 1% of rows are re-sent copies of another row with the same event time, a later arrival and other
values (ties broken by arrival); 50,000 entities (entity rows / 20: each seen about 20 times as an entity
row and 200 times as a feature row over the year), entity rows cover 2% more entities than the views
(missing entities).

Each side runs in a fresh process that reads the entity frame, then times the join alone (Feast's
registry read included; imports apart) and reports its own peak RSS (VmHWM):
  flywheel  featurestore.point_in_time_join (flywheel/pitjoin.py) through the service's definitions
  feast     store.get_historical_features(entity_df, service, filter_by_created_timestamp=True).to_df()
Wall time and the process's CPU time (all threads: on a busy shared machine the wall time mostly measures
the wait for a core). Both write their result; every row is then compared (same rows, same values, nulls
in the same places).
Target at the full size: <= 15 s and <= 3 GB peak on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests.benchmarks.common import BenchResult, GrowthPoint, Record, cli, run_bench

FULL = {"entity_rows": 1_000_000, "feature_rows": 10_000_000}
QUICK = {"entity_rows": 20_000, "feature_rows": 200_000}
START = pd.Timestamp("2025-01-01", tz="UTC")
DAYS = 365
# name -> (share of the feature rows, TTL days, feature kinds)
VIEWS: dict[str, tuple[float, int, list[str]]] = {
    "activity": (0.5, 7, ["float", "float", "float", "float"]),
    "billing": (0.3, 30, ["float", "float", "int"]),
    "profile": (0.2, 90, ["float", "float", "string"]),
}
ROW = "row_id"
MEMORY_LIMIT = "2GB"  # DuckDB's own cap for the flywheel side (it spills past it)


def _us(seconds: np.ndarray) -> np.ndarray:
    return (START.value // 1000 + (seconds * 1e6).astype(np.int64)).astype("datetime64[us]")


def make_data(folder: Path, entity_rows: int, feature_rows: int, seed: int = 0, entities: int | None = None
              ) -> dict[str, Any]:
    """Write the views' parquet files and the entity frame into `folder`; returns the layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    entities = entities or max(100, entity_rows // 20)
    span = DAYS * 86400
    for v, (name, (share, _, kinds)) in enumerate(VIEWS.items()):
        n = int(feature_rows * share)
        dup = n // 100
        base = n - dup
        uid = rng.integers(0, entities, base)
        ts = rng.uniform(0, span, base).round()
        lag = rng.exponential(3600, base)
        late = rng.random(base) < 0.02
        lag[late] = rng.uniform(0, 30 * 86400, int(late.sum()))
        # re-sent copies: same entity and event time, later arrival, other values
        pick = rng.integers(0, base, dup)
        uid = np.concatenate([uid, uid[pick]])
        ts = np.concatenate([ts, ts[pick]])
        lag = np.concatenate([lag, lag[pick] + rng.uniform(1, 7200, dup)])
        cols: dict[str, Any] = {"uid": uid.astype(np.int64), "ts": pa.array(_us(ts), pa.timestamp("us", "UTC")),
                                "created": pa.array(_us(ts + lag), pa.timestamp("us", "UTC"))}
        for i, kind in enumerate(kinds):
            col = f"{name}_{i}"
            if kind == "float":
                vals = rng.normal(v, 1 + i, n)
                cols[col] = pa.array(np.where(rng.random(n) < 0.01, np.nan, vals), from_pandas=True)
            elif kind == "int":
                cols[col] = pa.array(rng.integers(0, 1000, n), pa.int64())
            else:
                cols[col] = pa.array(np.array(["bronze", "silver", "gold", "platinum"])[rng.integers(0, 4, n)])
        order = np.argsort(ts, kind="stable")  # arrival-ish order, as batches would be appended
        pq.write_table(pa.table(cols).take(pa.array(order)), folder / f"{name}.parquet")
    ent = pd.DataFrame({
        ROW: np.arange(entity_rows, dtype=np.int64),
        "uid": rng.integers(0, int(entities * 1.02), entity_rows).astype(np.int64),
        "event_timestamp": pd.to_datetime(_us(rng.uniform(0, span, entity_rows).round())).tz_localize("UTC"),
    })
    ent.to_parquet(folder / "entities.parquet", index=False)
    return {"entities": entities}


def make_repo(folder: Path) -> tuple[Any, Any]:
    """A Feast repo over the generated files (local provider, DuckDB offline store): (store, service)."""
    import yaml
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64, String

    repo = folder / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "feature_store.yaml").write_text(yaml.safe_dump({
        "project": "bench", "provider": "local",
        "registry": {"registry_type": "file", "path": str(repo / "registry.db")},
        "offline_store": {"type": "duckdb"},
        "online_store": {"type": "sqlite", "path": str(repo / "online.db")},
        "entity_key_serialization_version": 3, "auth": {"type": "no_auth"},
    }))
    store = FeatureStore(repo_path=str(repo))
    entity = Entity(name="uid", join_keys=["uid"], value_type=ValueType.INT64)
    types = {"float": Float64, "int": Int64, "string": String}
    views = []
    for name, (_, ttl, kinds) in VIEWS.items():
        source = FileSource(name=f"{name}_source", path=str(folder / f"{name}.parquet"), timestamp_field="ts",
                            created_timestamp_column="created")
        views.append(FeatureView(
            name=name, entities=[entity], ttl=pd.Timedelta(days=ttl).to_pytimedelta(), source=source,
            schema=[Field(name="uid", dtype=Int64)]
            + [Field(name=f"{name}_{i}", dtype=types[k]) for i, k in enumerate(kinds)],
        ))
    service = FeatureService(name="bench_service", features=views)
    store.apply([entity, *views, service])
    return store, service


def _peak_mb() -> float:
    from tests.benchmarks.bench_monitoring import _peak_mb as peak

    return peak()


def side_flywheel(folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import duckdb  # noqa: F401
    from feast import FeatureStore

    from flywheel import pitjoin

    imports = time.perf_counter() - t0
    entity_df = pd.read_parquet(folder / "entities.parquet")
    t0, c0 = time.perf_counter(), time.process_time()
    store = FeatureStore(repo_path=str(folder / "repo"))
    service = store.get_feature_service("bench_service")
    con = pitjoin.connect(memory_limit=MEMORY_LIMIT, temp_dir=folder / "spill")
    out = pitjoin.point_in_time_join(entity_df, "event_timestamp", pitjoin.view_specs(store, service), con=con)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.to_parquet(folder / "out_flywheel.parquet", index=False)
    return {"seconds": seconds, "cpu_s": cpu, "imports_s": imports, "peak_mb": _peak_mb(), "rows": len(out)}


def side_feast(folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    from feast import FeatureStore

    imports = time.perf_counter() - t0
    entity_df = pd.read_parquet(folder / "entities.parquet")
    t0, c0 = time.perf_counter(), time.process_time()
    store = FeatureStore(repo_path=str(folder / "repo"))
    service = store.get_feature_service("bench_service")
    out = store.get_historical_features(entity_df=entity_df, features=service,
                                        filter_by_created_timestamp=True).to_df()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.to_parquet(folder / "out_feast.parquet", index=False)
    return {"seconds": seconds, "cpu_s": cpu, "imports_s": imports, "peak_mb": _peak_mb(), "rows": len(out)}


def feature_columns() -> list[str]:
    return [f"{name}_{i}" for name, (_, _, kinds) in VIEWS.items() for i in range(len(kinds))]


def compare(ours: pd.DataFrame, theirs: pd.DataFrame, entity_rows: int) -> dict[str, Any]:
    """Row-by-row comparison on ROW: rows lost or repeated on either side, and cells that differ."""
    cols = feature_columns()
    a = ours.set_index(ROW).sort_index()
    b = theirs.drop_duplicates(ROW).set_index(ROW).sort_index()
    result: dict[str, Any] = {
        "entity_rows": entity_rows,
        "flywheel_rows": len(ours), "feast_rows": len(theirs),
        "flywheel_missing": entity_rows - a.index.nunique(), "feast_missing": entity_rows - b.index.nunique(),
        "feast_repeated": len(theirs) - len(b),
    }
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    differ: dict[str, int] = {}
    for c in cols:
        x, y = a[c], b[c]
        nx, ny = x.isna().to_numpy(), y.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            same = (nx & ny) | (~nx & ~ny & np.isclose(x.to_numpy(float, na_value=np.nan),
                                                      y.to_numpy(float, na_value=np.nan), rtol=0, atol=1e-12))
        else:
            same = (nx & ny) | (~nx & ~ny & (x.astype(object).to_numpy() == y.astype(object).to_numpy()))
        differ[c] = int((~same).sum())
    result["cells_compared"] = len(common) * len(cols)
    result["cells_differ"] = sum(differ.values())
    result["differ_by_column"] = {c: n for c, n in differ.items() if n}
    result["null_cells"] = int(a[cols].isna().sum().sum())
    result["all_null_rows"] = int(a[cols].isna().all(axis=1).sum())
    return result


def _child(side: str, folder: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own imports and peak memory)."""
    env = {**os.environ, "FEAST_USAGE": "False", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_pit", "--side", side, "--folder",
                           str(folder)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((folder / f"result_{side}.json").read_text())


def measure(entity_rows: int, feature_rows: int, seed: int = 0, feast: bool = True,
            folder: Path | None = None, entities: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-pit-") as tmp:
        work = Path(folder or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        meta_file = work / "meta.json"
        wanted = {"entity_rows": entity_rows, "feature_rows": feature_rows, "seed": seed, "entities": entities}
        if meta_file.is_file() and json.loads(meta_file.read_text())["wanted"] == wanted:
            meta = json.loads(meta_file.read_text())  # a kept --workdir of the same size: reuse its data
        else:
            meta = {**make_data(work, entity_rows, feature_rows, seed, entities), "wanted": wanted}
            make_repo(work)
            meta_file.write_text(json.dumps(meta))
        generate_s = time.perf_counter() - t0
        load_before = os.getloadavg()
        ours = _child("flywheel", work)
        result: dict[str, Any] = {"size": {"entity_rows": entity_rows, "feature_rows": feature_rows,
                                           "entities": meta["entities"], "views": len(VIEWS),
                                           "features": len(feature_columns())},
                                  "generate_s": generate_s, "flywheel": ours,
                                  "machine": {"cores": os.cpu_count(), "load_before": load_before}}
        if feast:
            result["feast"] = _child("feast", work)
            result["comparison"] = compare(pd.read_parquet(work / "out_flywheel.parquet"),
                                           pd.read_parquet(work / "out_feast.parquet"), entity_rows)
        result["machine"]["load_after"] = os.getloadavg()
    return result


def render(r: dict[str, Any]) -> str:
    s, f = r["size"], r["flywheel"]
    lines = [
        f"{s['entity_rows']:,} entity rows ({s['entities']:,} entities) against {s['feature_rows']:,} feature rows "
        f"in {s['views']} views ({s['features']} features, TTLs and created timestamps)",
        "",
        f"machine: {r['machine']['cores']} cores, load average {r['machine']['load_before'][0]:.1f} before, "
        f"{r['machine']['load_after'][0]:.1f} after",
        "",
        "| side | join wall | join CPU (all threads) | imports | peak RSS | rows |",
        "|---|---|---|---|---|---|",
        f"| flywheel: DuckDB ASOF join | {f['seconds']:.2f} s | {f['cpu_s']:.1f} s | {f['imports_s']:.1f} s | "
        f"{f['peak_mb']:.0f} MB | "
        f"{f['rows']:,} |",
    ]
    if "feast" in r:
        e, c = r["feast"], r["comparison"]
        lines.append(f"| feast: get_historical_features (DuckDB store) | {e['seconds']:.2f} s | {e['cpu_s']:.1f} s | "
                     f"{e['imports_s']:.1f} s "
                     f"| {e['peak_mb']:.0f} MB | {e['rows']:,} |")
        lines += ["", f"speed-up {e['seconds'] / f['seconds']:.1f}x, peak memory {f['peak_mb'] / e['peak_mb']:.2f}x "
                  f"of Feast's; rows missing: flywheel {c['flywheel_missing']}, feast {c['feast_missing']}; "
                  f"cells compared {c['cells_compared']:,}, differing {c['cells_differ']} {c['differ_by_column']}; "
                  f"null cells {c['null_cells']:,}, all-null rows {c['all_null_rows']:,}"]
    return "\n".join(lines)


GROWTH = {"full": (10_000, 100_000), "quick": (2_000, 5_000)}  # entity rows; the main run is the third point
TARGET_S, TARGET_MB = 15.0, 3072.0


def records(r: dict[str, Any]) -> list[Record]:
    s, f, e = r["size"], r["flywheel"], r.get("feast")
    full = s["entity_rows"] >= FULL["entity_rows"]
    size = f"{s['entity_rows']:,} x {s['feature_rows']:,} rows"
    out = [
        Record(benchmark="pit", name=f"point-in-time join, {size}: wall", ours=f["seconds"],
               baseline=e["seconds"] if e else None, baseline_name="Feast get_historical_features (DuckDB store)",
               unit="s", target=f"<= {TARGET_S:g} s (full size)", met=f["seconds"] <= TARGET_S if full else None),
        Record(benchmark="pit", name=f"point-in-time join, {size}: peak RSS", ours=f["peak_mb"],
               baseline=e["peak_mb"] if e else None, unit="MB", target=f"<= {TARGET_MB:g} MB (full size)",
               met=f["peak_mb"] <= TARGET_MB if full else None),
    ]
    if e:
        c = r["comparison"]
        out.append(Record(benchmark="pit", name="cells differing from Feast's", ours=c["cells_differ"], unit="cells",
                          target="0", met=c["cells_differ"] == 0 and c["flywheel_missing"] == 0,
                          note=f"{c['cells_compared']:,} compared; rows missing: flywheel {c['flywheel_missing']}, "
                          f"feast {c['feast_missing']}"))
    return out


def bench(quick: bool) -> BenchResult:
    def run() -> tuple[dict[str, Any], list[Record], list[GrowthPoint]]:
        size = QUICK if quick else FULL
        points = []
        for n in GROWTH["quick" if quick else "full"]:
            got = measure(entity_rows=n, feature_rows=10 * n, feast=False)["flywheel"]
            points.append(GrowthPoint(stage="point-in-time join", rows=n, seconds=got["seconds"],
                                      peak_mb=got["peak_mb"]))
        result = measure(**size)
        points.append(GrowthPoint(stage="point-in-time join", rows=size["entity_rows"],
                                  seconds=result["flywheel"]["seconds"], peak_mb=result["flywheel"]["peak_mb"]))
        return result, records(result), points

    return run_bench("pit", quick, run, render)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--entities", type=int, help="distinct entities (default: entity rows / 20)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--skip-feast", action="store_true", help="time the flywheel side only")
        parser.add_argument("--workdir", type=Path, help="keep the generated data here (and reuse it next time)")
        parser.add_argument("--side", choices=["flywheel", "feast"], help=argparse.SUPPRESS)
        parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)

    def call(args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
        if args.side:  # one side, in the fresh process `_child` started
            result = {"flywheel": side_flywheel, "feast": side_feast}[args.side](args.folder)
            (args.folder / f"result_{args.side}.json").write_text(json.dumps(result))
            raise SystemExit(0)
        return measure(seed=args.seed, feast=not args.skip_feast, folder=args.workdir, entities=args.entities,
                       **size)

    cli(__doc__, FULL, QUICK, measure, render, argv, extra, call)


if __name__ == "__main__":
    main()
