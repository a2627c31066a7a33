"""Compaction of the offline store: a month's per-batch part files merged into one file, atomically.

Ingest writes one part file per batch and table (flywheel/featurestore.py), so a year of daily batches is
365 files a table, and every reader (DuckDB, Feast, pandas) opens each of them. Once a month of ingests is
over (`retention.compact_after_days` after its end), its files become one file per table, with the same rows
in the same order (files concatenated in name order, which is ingest order). The ledger keeps one entry per
batch (digest, row counts, event-time span): only the entry's file names change, so duplicate detection and
materialization planning work as before.

The swap, per table folder (`features.parquet/`, `labels.parquet/`), under the dataset's lock:
1. build `.<table>.next/`: hard links to the files that stay, plus the merged files (readers never list it);
2. append the new file names to the ledger: the commit point;
3. exchange the two folders in one `renameat2(RENAME_EXCHANGE)` (Linux), then delete the old set.
A crash before 2 leaves the old folder, which the ledger still names; after 2, the next writer (`resume`,
called first by every ingest, load and compaction) sees the ledger naming files that only `.next` holds and
finishes the exchange. Readers see either the old set or the new one, never both: no row counts twice.
Where the exchange is not supported, two renames do it and `resume` completes a swap cut between them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.errors import FlywheelError
from flywheel.schemas import DatasetDefinition, Result

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
TABLE_KEYS = (("features.parquet", "features_file"), ("labels.parquet", "labels_file"))


class MonthCompaction(Result):
    month: str  # YYYY-MM of the batches' ingest
    batches: int
    files_before: int
    file: str  # the merged part file's name
    feature_rows: int
    label_rows: int


class CompactionReport(Result):
    dataset: str
    before: datetime  # months that ended before this were compacted
    months: list[MonthCompaction]
    files_before: int  # part files per table folder before / after (features)
    files_after: int
    bytes_before: int  # both table folders
    bytes_after: int


def next_dir(folder: Path, table: str) -> Path:
    return folder / f".{table}.next"


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); two renames where it is not supported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")
    # fallback: a crash between these two renames leaves `a` missing; resume() renames `.next` into place
    parked = a.with_name(a.name + ".old")
    os.replace(a, parked)
    os.replace(b, a)
    os.replace(parked, b)


def interrupted(folder: Path) -> bool:
    """Whether a compaction left a staged or parked folder behind: a few stats, so that writers read the whole
    ledger for `resume` only when there is something to resume."""
    return any(next_dir(folder, table).is_dir() or (folder / f"{table}.old").is_dir() for table, _ in TABLE_KEYS)


def resume(folder: Path, ledger: dict[str, dict[str, Any]]) -> list[str]:
    """Finish or discard a compaction a crash interrupted (called under the dataset's lock). The ledger decides:
    when it names files that only `.<table>.next/` holds, the compaction committed and the swap completes;
    otherwise `.next` is an uncommitted new set or an already replaced old one, and goes. Returns what it did."""
    done = []
    for table, key in TABLE_KEYS:
        live, staged = folder / table, next_dir(folder, table)
        parked = live.with_name(live.name + ".old")
        if not live.exists() and staged.is_dir():  # the fallback swap stopped between its renames
            os.replace(staged, live)
            if parked.is_dir():
                os.replace(parked, staged)
            done.append(f"{table}: swap completed")
        elif parked.is_dir():
            shutil.rmtree(parked)
        if not staged.is_dir():
            continue
        named = {e[key] for e in ledger.values() if e.get(key)}
        have = {p.name for p in live.iterdir()} if live.is_dir() else set()
        if named - have and named <= have | {p.name for p in staged.iterdir()}:
            _exchange(live, staged)
            done.append(f"{table}: committed compaction swapped in")
        shutil.rmtree(staged)
    return done


def _month(entry: dict[str, Any]) -> str | None:
    stamp = entry.get("ingested_at") or entry.get("event_max")
    return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m") if stamp else None


def _month_end(month: str) -> datetime:
    year, mon = (int(x) for x in month.split("-"))
    return datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)


def plan(ledger: dict[str, dict[str, Any]], before: datetime) -> dict[str, list[str]]:
    """Month -> its part files (name order) to merge: the files whose batches were all ingested in one month
    that ended by `before`, for months that still have more than one file."""
    batches_of: dict[str, list[str]] = defaultdict(list)
    for b, e in ledger.items():
        if e.get("features_file"):
            batches_of[e["features_file"]].append(b)
    months: dict[str, list[str]] = defaultdict(list)
    for name, batches in batches_of.items():
        seen = {_month(ledger[b]) for b in batches}
        if len(seen) == 1 and None not in seen:
            (month,) = seen
            if _month_end(month) <= before:
                months[month].append(name)
    return {m: sorted(files) for m, files in sorted(months.items()) if len(files) > 1}


def _merge(sources: list[Path], target: Path) -> int:
    """Concatenate part files (in the order given) into one, streaming one file at a time. Returns rows."""
    schema = pa.unify_schemas([pq.read_schema(p) for p in sources], promote_options="default")
    rows = 0
    with pq.ParquetWriter(target, schema) as writer:
        for p in sources:
            table = pq.read_table(p)
            writer.write_table(table.select(schema.names).cast(schema))
            rows += table.num_rows
    return rows


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet")) if folder.is_dir() else 0


def compact_locked(folder: Path, dataset: DatasetDefinition, ledger: dict[str, dict[str, Any]], before: datetime,
                   append_ledger: Any, part_name: Any, fail_after: str | None = None) -> CompactionReport:
    """Compact the months `plan` picks (the caller holds the dataset's lock and has run `resume`).
    `fail_after` ("build" or "commit") raises there: how the tests cut a compaction in the middle."""
    if before.tzinfo is None:
        raise FlywheelError("compaction needs a tz-aware cut-off")
    months = plan(ledger, before)
    files_before = len(list((folder / "features.parquet").glob("*.parquet")))
    bytes_before = sum(_size(folder / t) for t, _ in TABLE_KEYS)
    if not months:
        return CompactionReport(dataset=dataset.name, before=before, months=[], files_before=files_before,
                                files_after=files_before, bytes_before=bytes_before, bytes_after=bytes_before)
    done = []
    for month, names in months.items():
        batches = [b for b, e in ledger.items() if e.get("features_file") in names]
        seqs = [int(ledger[b].get("seq", 0)) for b in batches]
        done.append((month, batches, names, part_name(min(seqs), f"compacted-{month}-to-{max(seqs):07d}")))
    rows: dict[tuple[str, str], int] = {}
    for table, key in TABLE_KEYS:  # 1. the new set beside the live one
        live, staged = folder / table, next_dir(folder, table)
        merging = {ledger[b][key] for _, batches, _, _ in done for b in batches if ledger[b].get(key)}
        staged.mkdir()
        for p in live.iterdir():
            if p.name.endswith(".parquet") and p.name not in merging:
                os.link(p, staged / p.name)
        for month, batches, _, merged in done:
            own = sorted({ledger[b][key] for b in batches if ledger[b].get(key)})
            rows[(month, table)] = _merge([live / n for n in own], staged / merged) if own else 0
    if fail_after == "build":
        raise FlywheelError("compaction stopped after building the new set (test)")
    stamp = datetime.now(UTC).isoformat()  # wall: bookkeeping of the compaction itself (cutoffs use `now`)
    append_ledger(folder, {b: {**{key: merged for _, key in TABLE_KEYS if ledger[b].get(key)},  # 2. commit
                               "compacted_at": stamp}
                           for _, batches, _, merged in done for b in batches})
    if fail_after == "commit":
        raise FlywheelError("compaction stopped after its ledger commit (test)")
    for table, _ in TABLE_KEYS:  # 3. swap, then drop the old set
        _exchange(folder / table, next_dir(folder, table))
        shutil.rmtree(next_dir(folder, table))
    return CompactionReport(
        dataset=dataset.name, before=before,
        months=[MonthCompaction(month=m, batches=len(b), files_before=len(n), file=merged,
                                feature_rows=rows[(m, "features.parquet")], label_rows=rows[(m, "labels.parquet")])
                for m, b, n, merged in done],
        files_before=files_before, files_after=len(list((folder / "features.parquet").glob("*.parquet"))),
        bytes_before=bytes_before, bytes_after=sum(_size(folder / t) for t, _ in TABLE_KEYS))
