"""Every benchmark of the project in one run, and the table of them: `make bench`.

    uv run python -m tests.benchmarks.run_all [--quick] [--only ingest,pit] [--out benchmarks/results]

Runs the benchmarks one after another (each module's `bench(quick)`: the full size, or with `--quick` the
correctness-only size the test suite runs), collects their records (our figure, the baseline measured in the same
run, the ratio, the target and whether it was met) and the cost-growth points of ingest, the point-in-time join,
training and monitoring, and writes `latest.json`, `latest.md` and `latest_growth.png` in `--out`, with the
machine (cores, memory, load average before and after) and the versions of the stack. A benchmark that fails is
recorded as failed and the others still run; the exit code is 1 then. Quick results are labelled quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path

from tests.benchmarks.common import RESULTS_DIR, BenchResult, machine, write_results

# in the order they run: the short ones first, the ones that start servers or clusters last
BENCHMARKS = ("ingest", "retention", "materialize", "pit", "monitoring", "inference", "training", "fanout",
              "batch_fanout", "webhook", "serving")
MODULES = {"ingest": "bench_ingest", "retention": "bench_retention", "materialize": "bench_materialize",
           "pit": "bench_pit", "monitoring": "bench_monitoring", "inference": "bench_inference",
           "training": "bench_training", "fanout": "bench_fanout", "batch_fanout": "bench_batch_fanout",
           "webhook": "bench_webhook", "serving": "bench_serving"}


def run(names: list[str], quick: bool, out: Path = RESULTS_DIR) -> tuple[list[BenchResult], dict[str, Path]]:
    before = machine()
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ({'quick' if quick else 'full'}) ...", flush=True)
        try:
            bench = import_module(f"tests.benchmarks.{MODULES[name]}").bench
        except Exception as exc:  # an import failure is that benchmark's failure, not the run's
            results.append(BenchResult(benchmark=name, quick=quick, error=f"{type(exc).__name__}: {exc}"))
            continue
        result = bench(quick)
        results.append(result)
        status = f"FAILED: {result.error}" if result.error else f"{len(result.records)} figures"
        print(f"    {result.seconds:.0f} s, {status}", flush=True)
    paths = write_results(results, quick, before, machine(), time.perf_counter() - t0, out)
    return results, paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="correctness-only sizes (labelled quick)")
    parser.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(BENCHMARKS), help=f"a comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where latest.json / latest.md go")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    results, paths = run(args.only, args.quick, args.out)
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
