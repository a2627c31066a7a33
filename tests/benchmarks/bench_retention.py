"""Storage and query time after months of traffic, with the retention policy applied daily and without it.

    uv run python -m tests.benchmarks.bench_retention [--quick] [--days N] [--predictions-per-day N] ...

Two copies of the growing stores are fed the same simulated traffic, one day at a time: predictions in the
prediction log (SQLite, the service's writer), one judged monitoring window an hour, one ingested batch a day
in the offline store (parquet part files and their ledger). After each day the "retention" copy runs what the
`retention` flow runs (flywheel/retention.py, flywheel/compaction.py) with the default settings: predictions kept
90 days, windows 365, a month's part files merged 7 days after it ended; the other copy keeps everything.
Default 180 days of 2,000 predictions and a 500-row batch a day (`--quick`: 35 days of 40 predictions and
30-row batches, keeping 10 days, the correctness-only size the test suite runs).

At the end, on both copies: database and folder sizes, part files, and the median of 5 runs of the queries the
loop makes: the monitoring flow's read of the last hour of served rows, a scan of the whole log (what an
ad-hoc or dashboard query costs), the full offline table through DuckDB (what a point-in-time join scans), and
the monitoring trend. Correctness: the retention copy holds exactly the rows younger than its cut-offs, and its
offline table has the same rows as the other's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.benchmarks.common import BenchResult, Record, cli, sized_bench

PROJECT = Path(__file__).resolve().parents[2]
FULL = {"days": 180, "predictions_per_day": 2_000, "batch_rows": 500, "windows_per_day": 24, "keep_days": 90,
        "history_days": 365, "floor_days": 35, "compact_after_days": 7}
QUICK = {"days": 35, "predictions_per_day": 40, "batch_rows": 30, "windows_per_day": 2, "keep_days": 10,
         "history_days": 20, "floor_days": 0, "compact_after_days": 3}
START = datetime(2026, 1, 1, tzinfo=UTC)


def _dataset() -> Any:
    from flywheel.schemas import load_dataset

    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


def _predictions(day: datetime, n: int, base: int) -> list[dict[str, Any]]:
    step = timedelta(days=1) / max(n, 1)
    features = {"tenure_months": 12, "monthly_charges": 70.5, "support_tickets_30d": 1, "payment_delay_days": 3,
                "contract": "monthly", "region": "west", "segment": "smb"}
    return [{"at": day + i * step, "request_id": f"r{base + i}", "entity": str((base + i) % 5000), "model": "churn",
             "version": "1", "arm": "champion", "prediction": i % 3 == 0, "probability": (i % 100) / 100,
             "latency_ms": 3.0, "features": features, "imputed": [], "feature_time": day} for i in range(n)]


def _window(end: datetime) -> Any:
    from flywheel.monitoring.history import WindowRecord

    return WindowRecord(model="churn", version="1", reference="v1", window_start=end - timedelta(hours=1),
                        window_end=end, judged_at=end, rows=600, status="ok", dataset_drift=False, share_drifted=0.0,
                        drifted_features=[], scores={"tenure_months": {"method": "wasserstein", "score": 0.01,
                                                                       "threshold": 0.1, "drifted": False}},
                        prediction_score=0.01, prediction_drifted=False, alarm=False, streak=0,
                        data_quality_alarm=False, data_quality={"problems": []})


def _median_ms(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _sizes(copy: Path, dataset: Any) -> dict[str, Any]:
    from flywheel import featurestore as fs

    folder = copy / "offline" / dataset.name
    offline_bytes = sum(p.stat().st_size for t in (fs.FEATURES_FILE, fs.LABELS_FILE) for p in (folder / t).iterdir())
    return {"log_mb": (copy / "predictions.db").stat().st_size / 2**20,
            "history_mb": (copy / "flywheel.db").stat().st_size / 2**20,
            "offline_mb": offline_bytes / 2**20, "part_files": len(list((folder / fs.FEATURES_FILE).iterdir()))}


def _queries(copy: Path, dataset: Any, now: datetime) -> dict[str, Any]:
    import duckdb
    import sqlalchemy as sa

    from flywheel import featurestore as fs
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.monitoring.serving import read_serving_window

    log_url = f"sqlite:///{copy}/predictions.db"
    engine = sa.create_engine(log_url)

    def scan() -> int:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version, count(*), avg(probability) FROM flywheel_predictions "
                                        "GROUP BY version").all()[0][1]

    features = str(copy / "offline" / dataset.name / fs.FEATURES_FILE / "*.parquet")

    def offline() -> tuple[int, int]:
        with duckdb.connect() as con:
            return con.execute(f"SELECT count(*), count(DISTINCT {dataset.entity}) FROM read_parquet('{features}')"
                           ).fetchone()

    history = MonitoringHistory(f"sqlite:///{copy}/flywheel.db")
    out = {
        "window_read_ms": _median_ms(lambda: read_serving_window(log_url, "churn", "1", now - timedelta(hours=1), now,
                                                                 dataset)),
        "log_scan_ms": _median_ms(scan), "offline_scan_ms": _median_ms(offline),
        "trend_ms": _median_ms(lambda: history.trend("churn")),
        "log_rows": scan(), "offline_rows": offline()[0], "windows": len(history.windows("churn")),
    }
    history.close()
    engine.dispose()
    return out


def measure(days: int, predictions_per_day: int, batch_rows: int, windows_per_day: int, keep_days: int,
            history_days: int, floor_days: int, compact_after_days: int) -> dict[str, Any]:
    from flywheel import featurestore as fs
    from flywheel import retention
    from flywheel.datagen import GeneratorSpec, generate
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.predictionlog import Writer

    dataset = _dataset()
    spec = GeneratorSpec(seed=3, days=days, rows_per_day=batch_rows, customers=max(batch_rows * 10, 100),
                         start=START.date())
    floor = timedelta(days=floor_days)
    timeline: list[dict[str, Any]] = []
    retention_s = 0.0
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-retention-") as tmp:
        copies = {name: Path(tmp) / name for name in ("kept", "retention")}
        writers, histories = {}, {}
        for name, copy in copies.items():
            copy.mkdir()
            writers[name] = Writer(f"sqlite:///{copy}/predictions.db")
            histories[name] = MonitoringHistory(f"sqlite:///{copy}/flywheel.db")
        for d, (_, batch) in enumerate(generate(spec)):
            day = START + timedelta(days=d)
            now = day + timedelta(days=1)
            rows = _predictions(day, predictions_per_day, d * predictions_per_day)
            windows = [_window(day + timedelta(hours=(h + 1) * 24 / windows_per_day)) for h in range(windows_per_day)]
            for name, copy in copies.items():
                writers[name].add(rows)
                assert writers[name].flush() == len(rows)
                for w in windows:
                    histories[name].record(w)
                fs.ingest_batch(batch, dataset, copy / "offline", f"day{d:04d}", ingested_at=now)
            t0 = time.perf_counter()  # the retention flow's work, on its copy
            copy = copies["retention"]
            retention.purge_prediction_log(f"sqlite:///{copy}/predictions.db",
                                           retention.cutoff(now, keep_days, floor).before)
            retention.purge_monitoring_history(f"sqlite:///{copy}/flywheel.db",
                                               retention.cutoff(now, history_days, floor).before)
            fs.compact_offline_store(dataset, copy / "offline", now - timedelta(days=compact_after_days))
            retention_s += time.perf_counter() - t0
            if (d + 1) % 30 == 0 or d + 1 == days:
                timeline.append({"day": d + 1, **{f"{n}_{k}": v for n, c in copies.items()
                                                  for k, v in _sizes(c, dataset).items()}})
        for name in copies:
            writers[name].engine.dispose()
            histories[name].close()
        end = START + timedelta(days=days)
        out: dict[str, Any] = {"size": {"days": days, "predictions_per_day": predictions_per_day,
                                        "batch_rows": batch_rows, "windows_per_day": windows_per_day},
                               "policy": {"keep_days": max(keep_days, floor_days),
                                          "history_days": max(history_days, floor_days),
                                          "compact_after_days": compact_after_days},
                               "retention_s_per_day": retention_s / days, "timeline": timeline}
        for name, copy in copies.items():
            out[name] = {**_sizes(copy, dataset), **_queries(copy, dataset, end)}
    kept, ret = out["kept"], out["retention"]
    keep = max(keep_days, floor_days)
    assert kept["log_rows"] == days * predictions_per_day
    assert ret["log_rows"] == min(days, keep) * predictions_per_day, (ret["log_rows"], keep)
    assert kept["offline_rows"] == ret["offline_rows"] == days * batch_rows, "compaction keeps every offline row"
    # a window ending exactly at the cut-off is kept
    assert ret["windows"] == min(days * windows_per_day, max(history_days, floor_days) * windows_per_day + 1)
    return out


def render(r: dict[str, Any]) -> str:
    s, k, t, p = r["size"], r["kept"], r["retention"], r["policy"]
    rows = [("prediction log (SQLite)", f"{k['log_mb']:.1f} MB, {k['log_rows']:,} rows",
             f"{t['log_mb']:.1f} MB, {t['log_rows']:,} rows"),
            ("monitoring history (SQLite)", f"{k['history_mb']:.1f} MB, {k['windows']:,} windows",
             f"{t['history_mb']:.1f} MB, {t['windows']:,} windows"),
            ("offline store (parquet)", f"{k['offline_mb']:.1f} MB, {k['part_files']} files",
             f"{t['offline_mb']:.1f} MB, {t['part_files']} files"),
            ("monitoring: last hour's served rows", f"{k['window_read_ms']:.1f} ms", f"{t['window_read_ms']:.1f} ms"),
            ("scan of the whole prediction log", f"{k['log_scan_ms']:.1f} ms", f"{t['log_scan_ms']:.1f} ms"),
            ("offline table through DuckDB", f"{k['offline_scan_ms']:.1f} ms", f"{t['offline_scan_ms']:.1f} ms"),
            ("monitoring trend", f"{k['trend_ms']:.1f} ms", f"{t['trend_ms']:.1f} ms")]
    lines = [f"{s['days']} simulated days: {s['predictions_per_day']:,} predictions, a {s['batch_rows']:,}-row batch "
             f"and {s['windows_per_day']} monitoring windows a day; retention keeps {p['keep_days']} days of "
             f"predictions, {p['history_days']} of windows, compacts months {p['compact_after_days']} days after "
             f"they end ({r['retention_s_per_day'] * 1000:.0f} ms a day)", "",
             "| after the last day | everything kept | with retention |", "|---|---:|---:|",
             *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
             "| day | log MB kept / retention | offline files kept / retention |", "|---:|---:|---:|",
             *[f"| {e['day']} | {e['kept_log_mb']:.1f} / {e['retention_log_mb']:.1f} | "
               f"{e['kept_part_files']} / {e['retention_part_files']} |" for e in r["timeline"]]]
    return "\n".join(lines)


def records(r: dict[str, Any]) -> list[Record]:
    k, t, days = r["kept"], r["retention"], r["size"]["days"]

    def rec(name: str, key: str, unit: str, target: str | None = None, met: bool | None = None) -> Record:
        return Record(benchmark="retention", name=f"{name} after {days} days", ours=t[key], baseline=k[key],
                      baseline_name="no retention", unit=unit, target=target, met=met)

    # bounded: once the retention window has filled, the log's file stops growing (SQLite reuses freed pages)
    full = [e["retention_log_mb"] for e in r["timeline"] if e["day"] >= r["policy"]["keep_days"]]
    bounded = full[-1] <= 1.15 * full[0] if len(full) > 1 else None
    return [rec("prediction log size", "log_mb", "MB", "stops growing at the retention window", bounded),
            rec("offline part files", "part_files", "files"),
            rec("offline table scan (DuckDB)", "offline_scan_ms", "ms"),
            rec("prediction log scan", "log_scan_ms", "ms"),
            rec("monitoring window read", "window_read_ms", "ms")]


def bench(quick: bool) -> BenchResult:
    return sized_bench("retention", quick, FULL, QUICK, measure, records, render)


def main(argv: list[str] | None = None) -> None:
    cli(__doc__, FULL, QUICK, measure, render, argv)


if __name__ == "__main__":
    main()
