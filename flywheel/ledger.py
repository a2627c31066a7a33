"""The offline store's ledger and the index that keeps an ingest's cost independent of the history.

`ledger.jsonl` (one per dataset folder, flywheel/featurestore.py) is the source of truth: append-only JSON lines,
one record per batch per ingest, load or compaction (later fields win). Every commit is an append to it, and the
readers that need the whole history (materialization planning, the volume trigger, `find_new_batches`) fold it.

`index.sqlite` beside it is derived from it and may be deleted at any time. It holds what an ingest needs to decide
and name its write without reading other batches' records: per batch id its content digest, sequence number, part
file names and row counts (digest and sequence indexed), the running row totals, and a watermark: the ledger's
inode, the byte offset up to which its records are folded in, and the bytes just before that offset. A writer,
under the dataset's lock, first brings the index up to date (`LedgerIndex.sync`):
- the ledger grew past the watermark (the writer's own new record; a load's or a compaction's records; a record
  whose writer died before it updated the index): only the new lines are read and folded in;
- the ledger is not the file the index was built from (another inode: compaction folds it, a migration writes
  it), is shorter than the watermark (a lost write), or differs just before the watermark: the index is rebuilt
  from the whole ledger, once, and `sync` says so (the caller then sweeps the part folders for orphans).
The index is written without fsync (`synchronous=OFF`, SQLite's rollback journal): a process crash cannot corrupt
it, and like the ledger and the parts (none of them is fsynced) it may lose its last writes to an OS crash or a
power loss. Lost writes leave the watermark behind the ledger (the next `sync` re-reads them); a file SQLite
cannot read is deleted and rebuilt (`open_index`). An fsync per commit would cost 10-30 ms of wall time per ingest
here, more than the rest of a small batch's ingest. Nothing here is done at import time.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.jsonl"
INDEX_FILE = "index.sqlite"
INDEX_VERSION = 1
_TAIL = 64  # bytes before the watermark kept to recognise the ledger the index was folded from
_WINDOW = 4096  # how far back a torn tail is looked for at a time
_COLUMNS = ("digest", "seq", "features_file", "labels_file", "feature_rows", "label_rows")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    pos INTEGER PRIMARY KEY,  -- ledger order of the batch's first record (the order duplicates are looked up in)
    batch TEXT NOT NULL UNIQUE,
    digest TEXT,
    seq INTEGER,
    features_file TEXT,
    labels_file TEXT,
    feature_rows INTEGER NOT NULL DEFAULT 0,
    label_rows INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_digest ON batches (digest);
CREATE INDEX IF NOT EXISTS batches_seq ON batches (seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


# ------------------------------------------------------------------------------------------ the ledger


def parse_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The records of the complete lines in `data`, and how many bytes they span. A last line without its newline
    is an append that died half-way (or is still being written): not committed, not read."""
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], end


def fold(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Batch id -> its entry, the records folded in order (later fields win)."""
    ledger: dict[str, dict[str, Any]] = {}
    for record in records:
        record = dict(record)
        ledger.setdefault(record.pop("batch"), {}).update(record)
    return ledger


def read_ledger(folder: Path) -> dict[str, dict[str, Any]]:
    """The whole ledger, folded: for readers that need every batch (not an ingest's path)."""
    path = folder / LEDGER_FILE
    return fold(parse_records(path.read_bytes())[0]) if path.exists() else {}


def _committed_end(fh: Any, size: int) -> int:
    """The offset after the ledger's last newline (0 when it has none), looking back a window at a time."""
    end = size
    while end > 0:
        start = max(0, end - _WINDOW)
        fh.seek(start)
        chunk = fh.read(end - start)
        if b"\n" in chunk:
            return start + chunk.rfind(b"\n") + 1
        end = start
    return 0


def append_ledger(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """Append one JSON line per batch: the commit point of an ingest, a load or a compaction. Appending, not
    rewriting, keeps its cost independent of the history (rewriting a file by rename flushed the whole file on
    ext4). A torn tail (an append that died half-way) is cut off first, so it never glues onto this record."""
    with open(folder / LEDGER_FILE, "ab+") as fh:
        size = fh.seek(0, os.SEEK_END)
        keep = _committed_end(fh, size) if size else 0
        if keep != size:
            fh.truncate(keep)
        fh.write(b"".join(json.dumps({"batch": b, **r}, sort_keys=True).encode() + b"\n"
                          for b, r in records.items()))


def write_ledger(folder: Path, ledger: dict[str, dict[str, Any]]) -> None:
    """Replace the ledger by one line per batch (atomic rename): compaction's fold, a migration's first ledger."""
    path = folder / LEDGER_FILE
    tmp = folder / f".{LEDGER_FILE}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps({"batch": b, **e}, sort_keys=True) + "\n" for b, e in ledger.items()))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- the index


class LedgerIndex:
    """The derived lookup of one dataset folder (see the module's docstring). Use only under the dataset's lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ledger_path = folder / LEDGER_FILE
        self.path = folder / INDEX_FILE
        self.records_read = 0  # ledger records read by this object: what a writer read of the history
        self.con = self._connect()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=OFF")
            con.executescript(_SCHEMA)
        except BaseException:
            con.close()
            raise
        return con

    @classmethod
    def drop(cls, folder: Path) -> None:
        """Delete the index (and a journal a crash left): the next `sync` rebuilds it from the ledger."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{folder / INDEX_FILE}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        self.con.close()

    # ----------------------------------------------------------------------------------------- sync

    def _meta(self) -> dict[str, Any]:
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    def sync(self) -> bool:
        """Bring the index up to the ledger. True when it was rebuilt from the whole ledger (it did not exist,
        was made by another version, or the ledger is not the one it was folded from): the caller sweeps then."""
        meta = self._meta()
        try:
            st = os.stat(self.ledger_path)
        except FileNotFoundError:
            st = None
        ino, size = (st.st_ino, st.st_size) if st else (0, 0)
        offset = int(meta.get("ledger_offset", -1))
        if meta.get("version") != INDEX_VERSION or meta.get("ledger_ino") != ino or not 0 <= offset <= size:
            self._rebuild(ino)
            return True
        if size == offset and offset == 0:
            return False
        with open(self.ledger_path, "rb") as fh:
            start = max(0, offset - _TAIL)
            fh.seek(start)
            data = fh.read(size - start)
        if data[: offset - start] != meta.get("ledger_tail", b""):
            self._rebuild(ino)
            return True
        records, used = parse_records(data[offset - start:])
        if records:
            with self.con:
                self._fold_in(records)
                self._set_watermark(ino, offset + used, data[: offset - start + used][-_TAIL:])
        return False

    def _rebuild(self, ino: int) -> None:
        data = self.ledger_path.read_bytes() if ino else b""
        records, used = parse_records(data)
        with self.con:
            self.con.execute("DELETE FROM batches")
            self.con.execute("DELETE FROM meta")
            self.con.executemany("INSERT INTO meta VALUES (?, ?)",
                                 [("version", INDEX_VERSION), ("feature_rows", 0), ("label_rows", 0)])
            self._fold_in(records)
            self._set_watermark(ino, used, data[:used][-_TAIL:])

    def _set_watermark(self, ino: int, offset: int, tail: bytes) -> None:
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [("ledger_ino", ino), ("ledger_offset", offset), ("ledger_tail", tail)])

    def _fold_in(self, records: list[dict[str, Any]]) -> None:
        """Fold records into the rows they name (inside the caller's transaction), keeping the totals."""
        added = {"feature_rows": 0, "label_rows": 0}
        for record in records:
            batch = record["batch"]
            row = self.con.execute(f"SELECT {', '.join(_COLUMNS)} FROM batches WHERE batch = ?", (batch,)).fetchone()
            old = dict(zip(_COLUMNS, row, strict=True)) if row else {"feature_rows": 0, "label_rows": 0}
            new = {**old, **{c: record[c] for c in _COLUMNS if c in record}}
            for key in added:
                new[key] = int(new.get(key) or 0)
                added[key] += new[key] - int(old.get(key) or 0)
            if row is None:
                self.con.execute(f"INSERT INTO batches (batch, {', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (batch, *(new.get(c) for c in _COLUMNS)))
            elif new != old:
                self.con.execute(f"UPDATE batches SET {', '.join(f'{c} = ?' for c in _COLUMNS)} WHERE batch = ?",
                                 (*(new.get(c) for c in _COLUMNS), batch))
        for key, n in added.items():
            if n:
                self.con.execute("UPDATE meta SET value = value + ? WHERE key = ?", (n, key))
        self.records_read += len(records)

    # -------------------------------------------------------------------------------------- lookups

    def entry(self, batch: str) -> dict[str, Any] | None:
        row = self.con.execute(f"SELECT {', '.join(_COLUMNS)} FROM batches WHERE batch = ?", (batch,)).fetchone()
        return None if row is None else {c: v for c, v in zip(_COLUMNS, row, strict=True) if v is not None}

    def first_with_digest(self, digest: str) -> str | None:
        """The first batch (ledger order) recorded with this content digest."""
        row = self.con.execute("SELECT batch FROM batches WHERE digest = ? ORDER BY pos LIMIT 1", (digest,)).fetchone()
        return None if row is None else row[0]

    def max_seq(self) -> int:
        return int(self.con.execute("SELECT coalesce(max(seq), 0) FROM batches").fetchone()[0])

    def file_of_seq(self, seq: int, key: str) -> set[str]:
        """The part files (`key`: features_file or labels_file) the ledger names for this sequence number."""
        if key not in ("features_file", "labels_file"):
            raise ValueError(f"not a part file column: {key!r}")
        return {r[0] for r in self.con.execute(f"SELECT {key} FROM batches WHERE seq = ?", (seq,)) if r[0]}

    def first_labels_file(self) -> str | None:
        """A stored label part (the oldest): new label rows are typed like it."""
        row = self.con.execute(
            "SELECT labels_file FROM batches WHERE labels_file IS NOT NULL ORDER BY pos LIMIT 1").fetchone()
        return None if row is None else row[0]

    def named_files(self) -> set[str]:
        """Every part file the ledger names (both tables): what a full orphan sweep keeps."""
        rows = self.con.execute("SELECT features_file, labels_file FROM batches").fetchall()
        return {name for row in rows for name in row if name}

    def totals(self) -> tuple[int, int]:
        """Feature and label rows stored, over every batch."""
        meta = self._meta()
        return int(meta.get("feature_rows", 0)), int(meta.get("label_rows", 0))


def open_index(folder: Path) -> tuple[LedgerIndex, bool]:
    """The folder's index, synced with its ledger, and whether it was (re)built from the whole ledger. An index
    SQLite cannot read (a torn write after an OS crash) is deleted and rebuilt: it holds nothing the ledger does
    not."""
    for attempt in (1, 2):
        index = None
        try:
            index = LedgerIndex(folder)
            return index, index.sync()
        except sqlite3.DatabaseError:
            if index is not None:
                index.close()
            if attempt == 2:
                raise
            LedgerIndex.drop(folder)
    raise AssertionError("unreachable")
