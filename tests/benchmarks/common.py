"""What every benchmark shares: the result record, the full/quick sizes and their command line, isolated runs
with their peak memory, the machine and the versions, and the table `make bench` writes.

A benchmark module has `FULL` and `QUICK` sizes (keyword arguments of its `measure`), `measure(**size) -> dict`,
`render(result) -> str` (its own detailed table) and `bench(quick) -> BenchResult`: the few figures that go in
the project's table, each a `Record` (our figure, the baseline measured in the same run, the ratio, the unit,
the target and whether it was met), plus the cost-growth points where the stage has them.
`python -m tests.benchmarks.common --call module:function --kwargs '{...}'` runs one function in a fresh process
and prints its wall time and peak RSS (VmHWM) as JSON: how `isolated` measures memory without the parent's heap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, computed_field

PROJECT = Path(__file__).resolve().parents[2]
RESULTS_DIR = PROJECT / "benchmarks" / "results"
PACKAGES = ("flywheel", "prefect", "mlflow", "feast", "duckdb", "evidently", "great-expectations", "scikit-learn",
            "pandas", "numpy", "pyarrow", "dask", "distributed", "prefect-dask", "redis", "sqlalchemy")


class Record(BaseModel):
    """One line of the project's benchmark table."""

    benchmark: str
    name: str  # what is measured, e.g. "point-in-time join, 1,000,000 x 10,000,000 rows: wall"
    ours: float | None
    baseline: float | None = None
    baseline_name: str | None = None  # e.g. "Feast get_historical_features"
    unit: str  # s, ms, MB, rows/s, x, %
    better: Literal["lower", "higher"] = "lower"
    target: str | None = None  # as people read it, e.g. "<= 15 s"
    met: bool | None = None
    note: str = ""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float | None:
        """How many times better ours is than the baseline (> 1: ours is better)."""
        if self.ours is None or self.baseline is None or not self.ours or not self.baseline:
            return None
        return self.baseline / self.ours if self.better == "lower" else self.ours / self.baseline


class GrowthPoint(BaseModel):
    """Cost of one stage at one size (wall time and peak RSS of the process that did the work)."""

    stage: str  # ingest | point-in-time join | training | monitoring | ...
    rows: int
    seconds: float
    peak_mb: float | None


class BenchResult(BaseModel):
    benchmark: str
    quick: bool
    size: dict[str, Any] = {}
    records: list[Record] = []
    growth: list[GrowthPoint] = []
    detail: str = ""  # the benchmark's own rendered table
    seconds: float = 0.0
    error: str | None = None


# ---------------------------------------------------------------------------------------------- sizes, CLI


def size_for(full: dict[str, Any], quick: dict[str, Any], is_quick: bool, given: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The full or quick size, with the keys given on the command line replaced."""
    size = dict(quick if is_quick else full)
    size.update({k: v for k, v in (given or {}).items() if k in size and v is not None})
    return size


def _arg_type(default: Any) -> Callable[[str], Any]:
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        return lambda s: tuple(kind(x) for x in s.split(","))
    return type(default) if default is not None else str


def cli(doc: str, full: dict[str, Any], quick: dict[str, Any], measure: Callable[..., dict[str, Any]],
        render: Callable[[dict[str, Any]], str], argv: list[str] | None = None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None,
        call: Callable[[argparse.Namespace, dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A benchmark's command line: `--quick`, one option per size key (`--entity-rows N`, `--levels 1,2,3`),
    `--json PATH`; prints `render(result)` and returns the result. `extra` adds options, `call` runs `measure`
    itself (for options that are not sizes)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the correctness-only size the test suite runs")
    for key, default in full.items():
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_arg_type(default), default=None,
                            help=f"default {default!r} (quick: {quick.get(key)!r})")
    parser.add_argument("--json", type=Path, help="also write the results here")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    size = size_for(full, quick, args.quick, vars(args))
    result = call(args, size) if call else measure(**size)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def sized_bench(name: str, quick: bool, full: dict[str, Any], quick_size: dict[str, Any],
                measure: Callable[..., dict[str, Any]], records: Callable[[dict[str, Any]], list[Record]],
                render: Callable[[dict[str, Any]], str]) -> BenchResult:
    """`run_bench` for a benchmark that is one `measure(**size)` at its full or quick size, without growth points."""
    def run() -> tuple[dict[str, Any], list[Record], list[GrowthPoint]]:
        result = measure(**(quick_size if quick else full))
        return result, records(result), []

    return run_bench(name, quick, run, render)


def run_bench(name: str, quick: bool, fn: Callable[[], tuple[dict[str, Any], list[Record], list[GrowthPoint]]],
              render: Callable[[dict[str, Any]], str] | None = None) -> BenchResult:
    """Run one benchmark's measurement into a BenchResult (an exception becomes its `error`, not the run's end)."""
    t0 = time.perf_counter()
    try:
        result, records, growth = fn()
    except Exception as exc:  # the aggregate table still gets written, naming what failed
        return BenchResult(benchmark=name, quick=quick, seconds=time.perf_counter() - t0,
                           error=f"{type(exc).__name__}: {exc}"[:2000])
    return BenchResult(benchmark=name, quick=quick, size=result.get("size", {}) if isinstance(result, dict) else {},
                       records=records, growth=growth, detail=render(result) if render else "",
                       seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- processes


def peak_mb() -> float | None:
    """This process's peak RSS (VmHWM), MB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def isolated(target: str, timeout: float = 3600, **kwargs: Any) -> dict[str, Any]:
    """Run `module:function(**kwargs)` in a fresh Python process: {"result", "seconds" (the call alone, imports
    apart), "peak_mb" (the process's VmHWM)}. Raises with the child's stderr tail when it fails."""
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.common", "--call", target, "--kwargs",
                           json.dumps(kwargs, default=str)], cwd=PROJECT, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{target} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(lines[-1])


def _call_main(target: str, kwargs: str) -> None:
    module, _, func = target.partition(":")
    fn = getattr(import_module(module), func)
    t0 = time.perf_counter()
    result = fn(**json.loads(kwargs))
    seconds = time.perf_counter() - t0
    print(json.dumps({"result": result, "seconds": seconds, "peak_mb": peak_mb()}, default=str))


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """Cores, memory, load average, platform: the context every figure needs."""
    mem_mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory_mb": mem_mb, "load_average": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version(),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- output


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if float(x).is_integer() and abs(x) < 1e6:
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The table people read (README, benchmarks/results/latest.md)."""
    m0, m1 = report["machine_before"], report["machine_after"]
    mode = "QUICK run: correctness-only sizes, the figures say nothing about speed" if report["quick"] else "full run"
    lines = [f"# Flywheel benchmarks: {mode}", "",
             f"{report['finished_at']} · commit {report.get('git_sha') or '?'} · {m0['cores']} cores, "
             f"{(m0['memory_mb'] or 0) / 1024:.1f} GB · load average {m0['load_average'][0]:.2f} before, "
             f"{m1['load_average'][0]:.2f} after · {report['seconds'] / 60:.1f} min", "",
             "| benchmark | measure | ours | baseline | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    for b in report["benchmarks"]:
        if b["error"]:
            lines.append(f"| {b['benchmark']} | FAILED: {b['error'][:200]} | | | | | |")
        for r in b["records"]:
            base = f"{_num(r['baseline'])} {r['unit']}" if r["baseline"] is not None else "-"
            name = r["name"] + (f" (baseline: {r['baseline_name']})" if r.get("baseline_name") else "")
            met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
            lines.append(f"| {b['benchmark']} | {name} | {_num(r['ours'])} {r['unit']} | {base} | {ratio} | "
                         f"{r['target'] or '-'} | {met} |")
    growth = [g for b in report["benchmarks"] for g in b["growth"]]
    if growth:
        lines += ["", "## Cost growth", "",
                  f"Wall time and peak RSS per stage at three sizes{'' if report.get('plot') else ' (no plot: '}"
                  f"{'' if report.get('plot') else report.get('plot_note', '') + ')'}; "
                  f"{'plotted in ' + report['plot'] if report.get('plot') else ''}", "",
                  "| stage | rows | wall s | peak MB | wall per 1k rows (ms) |", "|---|---:|---:|---:|---:|"]
        for g in growth:
            lines.append(f"| {g['stage']} | {g['rows']:,} | {g['seconds']:.2f} | {_num(g['peak_mb'])} | "
                         f"{1000 * g['seconds'] / max(g['rows'], 1) * 1000:.2f} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def plot_growth(growth: list[dict[str, Any]], path: Path) -> str | None:
    """Wall time and peak memory against rows, log-log, one line per stage; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = list(dict.fromkeys(g["stage"] for g in growth))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, stage in enumerate(stages):
        pts = sorted((g for g in growth if g["stage"] == stage), key=lambda g: g["rows"])
        xs, color = [p["rows"] for p in pts], f"C{i}"
        axes[0].plot(xs, [p["seconds"] for p in pts], marker="o", color=color, label=stage)
        # dotted: what linear growth from the smallest size would cost
        axes[0].plot([xs[0], xs[-1]], [pts[0]["seconds"], pts[0]["seconds"] * xs[-1] / xs[0]], ":", color=color)
        axes[1].plot(xs, [p["peak_mb"] or 0 for p in pts], marker="o", color=color, label=stage)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("wall time, s (dotted: linear)", "peak RSS of the process, MB"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("rows")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_results(results: list[BenchResult], quick: bool, machine_before: dict[str, Any],
                  machine_after: dict[str, Any], seconds: float, out_dir: Path = RESULTS_DIR) -> dict[str, Path]:
    """latest.json, latest.md and (matplotlib permitting) latest_growth.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "quick": quick, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": seconds,
        "git_sha": git_sha(), "machine_before": machine_before, "machine_after": machine_after,
        "versions": versions(), "benchmarks": [r.model_dump(mode="json") for r in results],
    }
    growth = [g for b in report["benchmarks"] for g in b["growth"]]
    paths = {"json": out_dir / "latest.json", "md": out_dir / "latest.md"}
    if growth:
        plot = plot_growth(growth, out_dir / "latest_growth.png")
        report["plot"] = plot
        if plot:
            paths["png"] = out_dir / plot
        else:
            report["plot_note"] = "matplotlib is not installed"
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="run one benchmark function in this fresh process")
    ap.add_argument("--call", required=True, help="module:function")
    ap.add_argument("--kwargs", default="{}")
    a = ap.parse_args()
    _call_main(a.call, a.kwargs)
