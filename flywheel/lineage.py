"""Lineage facts recorded with every training run: code version, data fingerprint, hardware, timings.

Everything here is cheap, pure-ish and never raises for a missing fact: a run outside a git checkout
records "unknown" rather than failing the training it describes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

UNKNOWN = "unknown"
TAG_TRAINING_SOURCE = "flywheel.training_source"  # a training run's tag: offline_store | served_features
_PROJECT = Path(__file__).resolve().parents[1]


def git_sha(path: Path | str | None = None) -> str:
    """The commit checked out at `path` (default: this project), with "+dirty" for local changes.

    Returns "unknown" outside a git checkout, without git installed, or before the first commit.
    """
    cwd = Path(path) if path is not None else _PROJECT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    if not sha:
        return UNKNOWN
    return f"{sha}+dirty" if dirty else sha


def frame_hash(df: pd.DataFrame) -> str:
    """A stable sha256 of a frame's values, column names and dtypes (row order matters, index does not)."""
    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(str(len(df)).encode())
    if len(df):
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def hardware() -> dict[str, str]:
    """Where the run happened: CPU count, platform, Python version, total memory."""
    info = {
        "cpu_count": str(os.cpu_count() or 0),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["memory_gb"] = f"{psutil.virtual_memory().total / 1024**3:.1f}"
    except Exception:  # psutil missing or unreadable /proc: memory is a nice-to-have
        info["memory_gb"] = UNKNOWN
    return info


class StageTimer:
    """Wall-clock seconds per named stage; a stage entered twice accumulates.

    >>> timer = StageTimer()
    >>> with timer.stage("search"):
    ...     pass
    >>> sorted(timer.as_metrics())
    ['time.search_s']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self, prefix: str = "time.") -> dict[str, float]:
        """`{"time.<stage>_s": seconds}`, the names the training run logs."""
        return {f"{prefix}{name}_s": round(sec, 4) for name, sec in self.seconds.items()}
