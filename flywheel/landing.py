"""Where an announced batch may be: a file under its dataset's incoming folder, nowhere else.

`POST /hooks/data-landed` and `/hooks/labels-landed` name a batch by `uri`; the receiver refuses (422) one
that is not a batch file under the folder the dataset definition names (`source` for data, `outcomes.source`
for labels), and the flows that ingest it check again, since a run can also be started by hand from the
Prefect UI. Pure pathlib: the receiver imports it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

BATCH_SUFFIXES = (".parquet", ".pq", ".csv")  # what the ingesting flows read (flywheel/validation.py read_batch)


class NotALandedBatch(ValueError):
    """The uri names no batch file under the incoming folder; the message says why."""


def incoming_folder(source: Path) -> Path:
    """The folder batches land in: the dataset's `source` folder, or the folder of a one-file source."""
    return source.parent if source.suffix.lower() in BATCH_SUFFIXES else source


def resolve_landed(uri: str, folder: Path) -> Path:
    """The absolute path of the batch `uri` names, relative to `folder` unless absolute (or `file://`).
    Symlinks and `..` are resolved first, so nothing outside `folder` passes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise NotALandedBatch(f"{uri!r}: a file:// URI on another host is not a local batch")
        raw = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # s3://, https://... (a one-letter scheme is a drive)
        raise NotALandedBatch(f"{uri!r}: only local paths are ingested (a file under {folder}), not {parsed.scheme}://")
    else:
        raw = Path(uri)
    base = folder.resolve()
    path = (raw if raw.is_absolute() else base / raw).resolve()
    if not path.is_relative_to(base):
        raise NotALandedBatch(f"{uri!r} is outside the incoming folder {base}")
    if path.suffix.lower() not in BATCH_SUFFIXES:
        raise NotALandedBatch(f"{uri!r} is not a batch file ({', '.join(BATCH_SUFFIXES)})")
    if not path.is_file():
        raise NotALandedBatch(f"{uri!r}: no such file in {base}")
    return path
