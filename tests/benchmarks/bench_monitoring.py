"""Monitoring from the stored profile vs a full Evidently DataDriftPreset run, side by side.

    uv run python -m tests.benchmarks.bench_monitoring [--quick] [--reference-rows N --current-rows N --columns N]

Generated frames (default 1,000,000 reference rows x 50 columns against 100,000 current rows; `--quick`:
20,000 x 12 against 4,000, the correctness-only size the test suite runs): numeric columns of several
shapes (normal, lognormal, gamma, Poisson counts, 3-valued codes, 0/1 flags, one-decimal amounts, a point
mass plus spread) and categorical ones (4 and 12 categories), a few percent missing in some, about a third
of the columns shifted by sizes from far below to far above the thresholds.

1. profile: the reference is profiled once (training-time cost, reported apart) into a JSON file.
2. flywheel: a fresh process reads the profile and the current window and computes every column's drift
   verdict (`drift_from_profile`) and the data-quality counts (`profile_quality`); it never sees the
   reference rows. Target: <= 10 s and <= 1.5 GB peak at the full size.
3. evidently: a fresh process reads both frames and runs `Report([DataDriftPreset()])` on them.
Each process reports its wall time (imports apart) and its own peak RSS. Then the per-column verdicts
are compared: disagreements, and how many columns scored within `BAND` of their threshold (where a
quantile profile may legitimately land on the other side).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests.benchmarks.common import BenchResult, GrowthPoint, Record, cli, run_bench

BAND = 0.002  # |score - threshold| within which a quantile profile's verdict may differ from Evidently's
KINDS = ["normal", "lognormal", "gamma", "poisson", "codes3", "flag", "amount", "spike", "cat4", "cat12"]
SHIFTS = [0.0, 0.0, 0.02, 0.0, 0.05, 0.0, 0.1, 0.0, 0.3, 0.0, 0.0, 0.6, 0.0, 0.08, 0.0]  # by column index
FULL = {"reference_rows": 1_000_000, "current_rows": 100_000, "columns": 50}
QUICK = {"reference_rows": 20_000, "current_rows": 4_000, "columns": 12}


def _column(kind: str, n: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    """One column of `kind`; `shift` moves it by about that many standard deviations (or that share)."""
    if kind == "normal":
        return rng.normal(shift, 1, n)
    if kind == "lognormal":
        return rng.lognormal(4.2 + 0.45 * shift, 0.45, n)
    if kind == "gamma":
        return rng.gamma(2.0, 18.0, n) * (1 + 0.7 * shift)
    if kind == "poisson":
        return rng.poisson(1.2 + 1.1 * shift, n).astype(float)
    if kind == "codes3":
        return rng.choice([1.0, 2.0, 3.0], n, p=_tilt([0.5, 0.3, 0.2], shift))
    if kind == "flag":
        return (rng.random(n) < 0.3 + 0.3 * shift).astype(float)
    if kind == "amount":
        return np.round(rng.gamma(3.0, 20.0, n) * (1 + 0.6 * shift), 1)
    if kind == "spike":
        return np.where(rng.random(n) < 0.3, 0.0, rng.normal(5 + 2 * shift, 2, n))
    if kind == "cat4":
        return rng.choice(np.array(list("abcd"), dtype=object), n, p=_tilt([0.4, 0.3, 0.2, 0.1], shift))
    if kind == "cat12":
        p = np.linspace(2, 1, 12)
        return rng.choice(np.array([f"k{i:02d}" for i in range(12)], dtype=object), n, p=_tilt(p / p.sum(), shift))
    raise ValueError(kind)


def _tilt(p: list[float] | np.ndarray, shift: float) -> np.ndarray:
    """Move `shift` of the probability mass from the first category to the last."""
    q = np.array(p, float)
    moved = min(q[0], shift * q[0])
    q[0] -= moved
    q[-1] += moved
    return q / q.sum()


def make_frames(reference_rows: int, current_rows: int, columns: int, seed: int = 0
                ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """(reference, current, numeric column names, categorical column names)."""
    rng = np.random.default_rng(seed)
    ref, cur, numeric, categorical = {}, {}, [], []
    for i in range(columns):
        kind = KINDS[i % len(KINDS)]
        name = f"c{i:02d}_{kind}"
        shift = SHIFTS[(i + 3 * seed) % len(SHIFTS)]  # the seed moves the shifts to other shapes
        ref[name], cur[name] = _column(kind, reference_rows, 0.0, rng), _column(kind, current_rows, shift, rng)
        if i % 7 == 3:  # a few percent missing on both sides
            for frame, n in ((ref, reference_rows), (cur, current_rows)):
                frame[name] = np.where(rng.random(n) < 0.03, None if kind.startswith("cat") else np.nan, frame[name])
        (categorical if kind.startswith("cat") else numeric).append(name)
    return pd.DataFrame(ref), pd.DataFrame(cur), numeric, categorical


def dataset_for(numeric: list[str], categorical: list[str]):
    """A DatasetDefinition declaring the generated columns as features."""
    from flywheel.schemas import DatasetDefinition, FeatureSpec

    features = [FeatureSpec(name=c, type="float") for c in numeric]
    features += [FeatureSpec(name=c, type="category") for c in categorical]
    return DatasetDefinition(name="bench", source="unused", entity="id", timestamp="ts", label="y", features=features)


def evidently_verdicts(reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: list[str]
                       ) -> dict[str, dict[str, Any]]:
    """Evidently 0.7's DataDriftPreset on the two frames: column -> {method, score, threshold, drifted}, the
    verdict read from the snapshot's per-column tests (status FAIL = drift)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    snapshot = Report([DataDriftPreset()], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition))
    result = snapshot.dict()
    out: dict[str, dict[str, Any]] = {}
    for m in result["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            out[cfg["column"]] = {"method": cfg["method"], "score": float(m["value"]), "threshold": cfg["threshold"]}
    for t in result["tests"]:
        if t["id"] == "drift":
            out[t["metric_config"]["params"]["column"]]["drifted"] = t["status"] == "FAIL"
    return out


EVIDENTLY_NAMES = {"wasserstein": "Wasserstein distance (normed)", "jensenshannon": "Jensen-Shannon distance",
                   "ks": "K-S p_value", "chisquare": "chi-square p_value", "z": "Z-test p_value"}


def compare(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]], band: float = BAND) -> dict[str, Any]:
    """Per-column comparison: same method, verdict disagreements, columns within `band` of the threshold."""
    near, disagree, method_differs, max_diff = [], [], [], 0.0
    for col, o in ours.items():
        t = theirs[col]
        if EVIDENTLY_NAMES.get(o["method"]) != t["method"]:
            method_differs.append(col)
        max_diff = max(max_diff, abs(o["score"] - t["score"]))
        if abs(t["score"] - t["threshold"]) <= band or abs(o["score"] - o["threshold"]) <= band:
            near.append(col)
        elif o["drifted"] != t["drifted"]:
            disagree.append(col)
    near_differ = [col for col in near if ours[col]["drifted"] != theirs[col]["drifted"]]
    return {"columns": len(ours), "disagreements": disagree, "within_band": near, "within_band_differ": near_differ,
            "method_differs": method_differs,
            "max_score_diff": max_diff, "drifted": sorted(c for c, o in ours.items() if o["drifted"])}


# --------------------------------------------------------------------------------------- the three steps


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child
    of the process that built the 1M-row frames would report that process's peak as its own."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS


def step_profile(folder: Path) -> dict[str, Any]:
    from flywheel.monitoring.profile import profile_frame

    meta = json.loads((folder / "meta.json").read_text())
    reference = pd.read_parquet(folder / "reference.parquet")
    t0 = time.perf_counter()
    profile = profile_frame(reference, dataset_for(meta["numeric"], meta["categorical"]))
    text = profile.to_json()
    seconds = time.perf_counter() - t0
    (folder / "profile.json").write_text(text)
    return {"seconds": seconds, "peak_mb": _peak_mb(), "profile_kb": len(text) / 1024}


def step_flywheel(folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import scipy.spatial.distance
    import scipy.stats  # noqa: F401  (imports timed apart from the work)

    from flywheel.monitoring.config import DriftSettings, QualitySettings
    from flywheel.monitoring.drift import drift_from_profile
    from flywheel.monitoring.profile import ReferenceProfile
    from flywheel.monitoring.quality import profile_quality

    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    profile = ReferenceProfile.from_json((folder / "profile.json").read_text())
    current = pd.read_parquet(folder / "current.parquet")
    drift = drift_from_profile(profile, current, DriftSettings())
    quality = profile_quality(profile, current, QualitySettings())
    seconds = time.perf_counter() - t0
    verdicts = {c.column: {"method": c.method, "score": c.score, "threshold": c.threshold, "drifted": c.drifted}
                for c in drift.columns}
    return {"seconds": seconds, "imports_s": imports, "peak_mb": _peak_mb(), "verdicts": verdicts,
            "quality_problems": len(quality.problems)}


def step_evidently(folder: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import evidently.presets  # noqa: F401

    imports = time.perf_counter() - t0
    meta = json.loads((folder / "meta.json").read_text())
    t0 = time.perf_counter()
    reference = pd.read_parquet(folder / "reference.parquet")
    current = pd.read_parquet(folder / "current.parquet")
    verdicts = evidently_verdicts(reference, current, meta["numeric"], meta["categorical"])
    return {"seconds": time.perf_counter() - t0, "imports_s": imports, "peak_mb": _peak_mb(), "verdicts": verdicts}


def _child(step: str, folder: Path) -> dict[str, Any]:
    """Run one step in a fresh interpreter (its own imports and peak memory)."""
    out = folder / f"result_{step}.json"
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_monitoring", "--step", step,
                           "--folder", str(folder)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def measure(reference_rows: int, current_rows: int, columns: int, seed: int = 0, folder: Path | None = None,
            evidently: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-monitoring-") as tmp:
        work = Path(folder or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        reference, current, numeric, categorical = make_frames(reference_rows, current_rows, columns, seed)
        reference.to_parquet(work / "reference.parquet")
        current.to_parquet(work / "current.parquet")
        del reference, current
        (work / "meta.json").write_text(json.dumps({"numeric": numeric, "categorical": categorical}))
        generate_s = time.perf_counter() - t0
        profile = _child("profile", work)
        ours = _child("flywheel", work)
        out = {"size": {"reference_rows": reference_rows, "current_rows": current_rows, "columns": columns},
               "generate_s": generate_s, "profile": profile, "flywheel": ours}
        if evidently:  # the cost-growth points time our side only
            out["evidently"] = theirs = _child("evidently", work)
            out["comparison"] = compare(ours["verdicts"], theirs["verdicts"])
    return out


def render(r: dict[str, Any]) -> str:
    s, f, e, c = r["size"], r["flywheel"], r["evidently"], r["comparison"]
    lines = [
        f"reference {s['reference_rows']:,} rows x {s['columns']} columns vs current {s['current_rows']:,} rows",
        "",
        "| step | wall (work) | imports | peak RSS |",
        "|---|---|---|---|",
        f"| profile the reference (training time, once) | {r['profile']['seconds']:.2f} s | - | "
        f"{r['profile']['peak_mb']:.0f} MB (profile {r['profile']['profile_kb']:.0f} kB) |",
        f"| flywheel: drift + data quality from the profile | {f['seconds']:.2f} s | {f['imports_s']:.1f} s | "
        f"{f['peak_mb']:.0f} MB |",
        f"| evidently: DataDriftPreset on both frames | {e['seconds']:.2f} s | {e['imports_s']:.1f} s | "
        f"{e['peak_mb']:.0f} MB |",
        "",
        f"verdicts: {c['columns']} columns, {len(c['drifted'])} drifted; disagreements {len(c['disagreements'])} "
        f"{c['disagreements']}; within {BAND} of the threshold {len(c['within_band'])} {c['within_band']} (of which "
        f"{len(c['within_band_differ'])} differ); "
        f"method differs {c['method_differs']}; largest score difference {c['max_score_diff']:.2e}",
    ]
    return "\n".join(lines)


GROWTH = {"full": {"reference_rows": 100_000, "columns": 50, "current": (10_000, 100_000, 1_000_000)},
          "quick": {"reference_rows": 20_000, "columns": 12, "current": (1_000, 2_000, 4_000)}}
TARGET_S, TARGET_MB = 10.0, 1536.0


def records(r: dict[str, Any]) -> list[Record]:
    s, f, e, c = r["size"], r["flywheel"], r["evidently"], r["comparison"]
    full = s["current_rows"] >= FULL["current_rows"]
    size = f"{s['reference_rows']:,} x {s['columns']} vs {s['current_rows']:,} rows"
    return [
        Record(benchmark="monitoring", name=f"drift + quality, {size}: wall", ours=f["seconds"],
               baseline=e["seconds"], baseline_name="Evidently DataDriftPreset on both frames", unit="s",
               target=f"<= {TARGET_S:g} s (full size)", met=f["seconds"] <= TARGET_S if full else None),
        Record(benchmark="monitoring", name=f"drift + quality, {size}: peak RSS", ours=f["peak_mb"],
               baseline=e["peak_mb"], unit="MB", target=f"<= {TARGET_MB:g} MB (full size)",
               met=f["peak_mb"] <= TARGET_MB if full else None),
        Record(benchmark="monitoring", name="column verdicts differing from Evidently's (outside the band)",
               ours=len(c["disagreements"]), unit="columns", target="0", met=not c["disagreements"],
               note=f"{c['columns']} columns, {len(c['within_band'])} within {BAND} of the threshold"),
    ]


def bench(quick: bool) -> BenchResult:
    def run() -> tuple[dict[str, Any], list[Record], list[GrowthPoint]]:
        g = GROWTH["quick" if quick else "full"]
        points = []
        for n in g["current"]:
            got = measure(reference_rows=g["reference_rows"], current_rows=n, columns=g["columns"], evidently=False)
            points.append(GrowthPoint(stage="monitoring", rows=n, seconds=got["flywheel"]["seconds"],
                                      peak_mb=got["flywheel"]["peak_mb"]))
        result = measure(**(QUICK if quick else FULL))
        return result, records(result), points

    return run_bench("monitoring", quick, run, render)


def main(argv: list[str] | None = None) -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--step", choices=["profile", "flywheel", "evidently"], help=argparse.SUPPRESS)
        parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)

    def call(args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
        if args.step:  # one step, in the fresh process `_child` started
            result = {"profile": step_profile, "flywheel": step_flywheel, "evidently": step_evidently}[args.step](
                args.folder)
            (args.folder / f"result_{args.step}.json").write_text(json.dumps(result))
            raise SystemExit(0)
        return measure(seed=args.seed, **size)

    cli(__doc__, FULL, QUICK, measure, render, argv, extra, call)


if __name__ == "__main__":
    main()
