"""Serving benchmark (issue 4): Flywheel's service vs the baseline a user would assemble, side by side.

    make bench-serving              # or: uv run python -m tests.benchmarks.bench_serving [--quick]

1. A trained project home in a temp folder: 21 daily churn batches (ending ~40 days before today, inside
   the 90-day feature TTL), one training run (the training flow's tasks called in its order, as the training
   benchmark's direct arm: no Prefect server to start for a set-up step): the registry holds a champion and
   the Feast online store (SQLite) is materialized.
2. Flywheel: `python -m flywheel.service` (one process) on a free port, /health 200.
3. Baseline: `feast serve` (Feast's Python feature server, `/get-online-features` on the champion's
   feature service) plus `mlflow models serve --env-manager local` on the SAME fitted pipeline logged
   again as an MLflow pyfunc answering predict_proba. Its client does two HTTP calls per request:
   features from Feast, then the feature rows (dataframe_split) to MLflow's /invocations.
4. Measured with persistent httpx clients, after a warm-up: one entity per request paced at 100/s,
   batches of 100 entities back to back, and throughput at saturation (a few client threads, ~10 s).
   Both systems' probabilities are compared on the same entities (they must agree).
5. Memory (RSS) of the Flywheel service (and its prediction-log writer process) with the champion only,
   then champion + challenger (a second version registered, alias set, POST /admin/reload);
   RSS of the baseline processes.

Everything listens on 127.0.0.1; every process started here is stopped by pid / process group at the end.
The client runs on the same machine as the servers: on 2 cores it competes with them for CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# tests.conftest sets the telemetry-off variables and OMP_NUM_THREADS=1 for everything started from here
from tests.benchmarks.common import BenchResult, Record, run_bench
from tests.conftest import PROJECT, make_home
from tests.integration.test_service import AUTH, Service, start_service, stop_service

Call = Callable[[httpx.Client, list[int]], list[float]]

TARGET_SINGLE_P99_MS = 10.0
TARGET_BATCH_P99_MS = 40.0
TARGET_RATIO = 2.0


@dataclass
class Plan:
    single: int  # paced single-entity requests per system
    rate: float  # requests per second for the paced run
    batch: int  # batch-100 requests per system
    batch_size: int
    saturation_s: float
    threads: int
    warmup: int
    rows_per_day: int


# 500 batches (the baseline's take ~60 ms each) and 6 s at saturation keep the p99s and the rate steady and the
# benchmark inside make bench's 20-minute budget (1,000 and 10 s before)
FULL = Plan(
    single=1000, rate=100.0, batch=500, batch_size=100, saturation_s=6.0, threads=4, warmup=200, rows_per_day=1000
)
QUICK = Plan(single=100, rate=100.0, batch=20, batch_size=100, saturation_s=2.0, threads=2, warmup=30, rows_per_day=300)


# ------------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(
    cmd: list[str], log_path: Path, env: dict[str, str], ready_url: str, timeout: float = 180
) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own process group and wait until `ready_url` answers 200."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(log_path.parent)
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_group(proc)
    raise RuntimeError(f"{cmd[:3]} did not answer {ready_url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process group we created for `proc` (gunicorn / uvicorn children included), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def rss_mb(pid: int) -> tuple[float, float, int]:
    """(RSS of the process, RSS of it and all its descendants, number of processes) in MiB."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return root.memory_info().rss / 2**20, total / 2**20, len(procs)


# ---------------------------------------------------------------------------------- the project home


def build_home(root: Path, rows_per_day: int) -> Path:
    """A project home with a champion in the registry and the online store materialized."""
    from flywheel.datagen import GeneratorSpec, write_batches
    from tests.benchmarks.bench_training import run_direct

    home = make_home(root)
    days = 21
    start = date.today() - timedelta(days=40 + days)  # inside the 90-day TTL, every label arrived
    spec = GeneratorSpec(
        seed=11, days=days, rows_per_day=rows_per_day, customers=max(2000, rows_per_day * 6), start=start
    )
    write_batches(spec, home / "data" / "incoming" / "churn")
    result = run_direct(home / "configs", "ci")
    if result != {"outcome": "champion", "version": "1"}:
        raise RuntimeError(f"training did not register a champion: {result!r}")
    return home


@dataclass
class Baseline:
    feature_service: str
    entity: str
    feast_url: str
    mlflow_url: str


def log_pyfunc_copy(home: Path, ctx: Any, registry: Any) -> tuple[str, str, str, Any]:
    """Log the champion's fitted pipeline again (predict_proba pyfunc) into a temp experiment.

    Returns (models:/ URI, run id, the champion's feature service, the champion LoadedModel)."""
    import mlflow
    import pandas as pd

    from flywheel.registry import log_model
    from flywheel.serving import TAG_FEATURE_SERVICE

    champion = registry.load(ctx.model_name, alias="champion")
    features = pd.read_parquet(home / "data" / "offline" / ctx.dataset.name / "features.parquet")
    example = features[list(champion.pipeline.feature_names_in_)].head(5)
    mlflow.set_tracking_uri(ctx.tracking_uri)
    client = mlflow.MlflowClient(ctx.tracking_uri)
    exp_id = client.create_experiment("bench-baseline", artifact_location=str(home / "data" / "bench-artifacts"))
    with mlflow.start_run(experiment_id=exp_id) as run:
        uri = log_model(champion.pipeline, example)
    return uri, run.info.run_id, champion.tags[TAG_FEATURE_SERVICE], champion


# ------------------------------------------------------------------------------------------ clients


def flywheel_call(client: httpx.Client, ids: list[int]) -> list[float]:
    r = client.post("/predict", json={"entities": ids})
    if r.status_code != 200:
        raise RuntimeError(f"flywheel /predict {r.status_code}: {r.text[:300]}")
    return [p["probability"] for p in r.json()["predictions"]]


def baseline_caller(b: Baseline) -> Call:
    """Two calls per request: Feast's /get-online-features, then MLflow's /invocations (dataframe_split)."""

    def call(client: httpx.Client, ids: list[int]) -> list[float]:
        r = client.post(
            f"{b.feast_url}/get-online-features",
            json={"feature_service": b.feature_service, "entities": {b.entity: ids}},
        )
        if r.status_code != 200:
            raise RuntimeError(f"feast /get-online-features {r.status_code}: {r.text[:300]}")
        body = r.json()
        names = body["metadata"]["feature_names"]
        keep = [i for i, n in enumerate(names) if n != b.entity]
        columns = [names[i] for i in keep]
        results = body["results"]
        data = [list(row) for row in zip(*(results[i]["values"] for i in keep), strict=True)]
        m = client.post(f"{b.mlflow_url}/invocations", json={"dataframe_split": {"columns": columns, "data": data}})
        if m.status_code != 200:
            raise RuntimeError(f"mlflow /invocations {m.status_code}: {m.text[:300]}")
        return [p[1] if isinstance(p, list) else p for p in m.json()["predictions"]]

    return call


# -------------------------------------------------------------------------------------- measurements


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "n": float(a.size),
    }


def paced(client: httpx.Client, call: Call, ids: list[int], n: int, rate: float) -> tuple[list[float], float]:
    """n single-entity requests started every 1/rate s; latency from send to parsed answer (ms), achieved rate."""
    out = []
    period = 1.0 / rate
    t_start = time.perf_counter()
    for i in range(n):
        due = t_start + i * period
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        call(client, [ids[i % len(ids)]])
        out.append((time.perf_counter() - t0) * 1000)
    return out, n / (time.perf_counter() - t_start)


def back_to_back(client: httpx.Client, call: Call, ids: list[int], n: int, size: int) -> list[float]:
    out = []
    for i in range(n):
        k = (i * size) % max(1, len(ids) - size)
        t0 = time.perf_counter()
        got = call(client, ids[k : k + size])
        out.append((time.perf_counter() - t0) * 1000)
        if len(got) != size:
            raise RuntimeError(f"asked {size} predictions, got {len(got)}")
    return out


def saturate(
    make_client: Callable[[], httpx.Client], call: Call, ids: list[int], seconds: float, threads: int
) -> tuple[float, int, int]:
    """Single-entity requests from `threads` clients for `seconds`: (requests/s, requests answered, errors)."""
    stop = threading.Event()
    counts = [0] * threads
    errors = [0] * threads

    def worker(k: int) -> None:
        with make_client() as client:
            i = k
            while not stop.is_set():
                try:
                    call(client, [ids[i % len(ids)]])
                    counts[k] += 1
                except Exception:
                    errors[k] += 1
                i += threads

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join(60)
    return sum(counts) / (time.perf_counter() - t0), sum(counts), sum(errors)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, few requests")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs) at the end")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)  # the table stays readable when the output is piped to a file
    t_begin = time.perf_counter()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-bench-serving-"))
    svc: Service | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        console.print(f"[bold]building a trained home[/] in {workdir} ({21 * plan.rows_per_day:,} rows) ...")
        t0 = time.perf_counter()
        home = build_home(workdir / "home", plan.rows_per_day)
        console.print(f"trained in {time.perf_counter() - t0:.1f} s")

        import pandas as pd

        from flywheel.audit import AuditLog
        from flywheel.registry import Registry
        from flywheel.runtime import start_run_context
        from flywheel.serving import TAG_FEATURE_SERVICE

        ctx = start_run_context("ci", home / "configs")
        registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
        uri, run_id, service_name, champion = log_pyfunc_copy(home, ctx, registry)
        entity = ctx.dataset.entity
        offline = pd.read_parquet(home / "data" / "offline" / ctx.dataset.name / "features.parquet")
        ids = [int(i) for i in offline[entity].drop_duplicates().sample(frac=1.0, random_state=0)]
        console.print(
            f"champion v{champion.version} ({type(champion.pipeline.steps[-1][1]).__name__}), "
            f"feature service {service_name}, {len(ids):,} entities online; baseline model {uri}"
        )

        # ---- start the three servers
        # the venv's bin first: `mlflow models serve` execs `uvicorn` from PATH
        bin_dir = str(Path(sys.executable).parent)
        base_env = {
            **os.environ,
            "PYTHONPATH": str(PROJECT),
            "OMP_NUM_THREADS": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        }
        t0 = time.perf_counter()
        svc = start_service(
            home,
            {
                # production defaults (the integration tests poll and flush faster than a deployment would)
                "FLYWHEEL_SERVE__REGISTRY_POLL_SECONDS": "5",
                "FLYWHEEL_SERVE__LOG_FLUSH_SECONDS": "0.5",
                "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "",
            },
            timeout=180,
        )
        health = svc.http.get("/health")
        if health.status_code != 200:
            raise RuntimeError(f"flywheel /health {health.status_code}: {health.text[:500]}")
        inference = health.json()["models"]["champion"]["inference"]
        console.print(f"flywheel service up in {time.perf_counter() - t0:.1f} s ({inference})")

        feast_port, mlflow_port = _free_port(), _free_port()
        repo = home / "data" / "feature_repo"
        t0 = time.perf_counter()
        # one worker like Flywheel; no access log like Flywheel; --max-requests 0: gunicorn's default of
        # 1000 would restart the worker mid-measurement (a multi-second stall that is not serving cost)
        procs.append(
            start_process(
                [
                    str(Path(sys.executable).parent / "feast"),
                    "-c",
                    str(repo),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(feast_port),
                    "--workers",
                    "1",
                    "--no-access-log",
                    "--max-requests",
                    "0",
                ],
                workdir / "feast-serve.log",
                base_env,
                f"http://127.0.0.1:{feast_port}/health",
            )
        )
        console.print(f"feast serve up in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        procs.append(
            start_process(
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    uri,
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                workdir / "mlflow-serve.log",
                {**base_env, "MLFLOW_TRACKING_URI": ctx.tracking_uri},
                f"http://127.0.0.1:{mlflow_port}/ping",
            )
        )
        console.print(f"mlflow models serve up in {time.perf_counter() - t0:.1f} s")
        baseline = Baseline(service_name, entity, f"http://127.0.0.1:{feast_port}", f"http://127.0.0.1:{mlflow_port}")
        base_call = baseline_caller(baseline)

        def fw_client() -> httpx.Client:
            return httpx.Client(base_url=svc.url, timeout=30)  # type: ignore[union-attr]

        def base_client() -> httpx.Client:
            return httpx.Client(timeout=30)

        systems: list[tuple[str, Call, Callable[[], httpx.Client]]] = [
            ("flywheel", flywheel_call, fw_client),
            ("baseline", base_call, base_client),
        ]

        # ---- same answers? (a benchmark of two systems computing different things means nothing)
        with fw_client() as a, base_client() as b:
            probe = ids[:50]
            diff = float(np.max(np.abs(np.asarray(flywheel_call(a, probe)) - np.asarray(base_call(b, probe)))))
        console.print(f"max |probability difference| flywheel vs baseline on {len(probe)} entities: {diff:.2e}")

        # ---- warm-up, then the measurements (systems alternate per scenario)
        # requests answered, each call's HTTP requests all 200 (a call raises otherwise): the probe, the warm-up,
        # the paced and batch runs, the saturation run
        results: dict[str, dict[str, Any]] = {name: {"answered": len(probe)} for name, _, _ in systems}
        for name, call, make in systems:
            with make() as client:
                back_to_back(client, call, ids, plan.warmup, 1)
                back_to_back(client, call, ids, max(5, plan.warmup // 10), plan.batch_size)
            results[name]["answered"] += plan.warmup + max(5, plan.warmup // 10)
        console.print("warm-up done; measuring ...")
        for name, call, make in systems:
            with make() as client:
                lat, achieved = paced(client, call, ids, plan.single, plan.rate)
            results[name]["single"] = percentiles(lat)
            results[name]["rate"] = achieved
            results[name]["answered"] += len(lat)
            console.print(f"  {name}: single done (achieved {achieved:.0f} req/s)")
        for name, call, make in systems:
            with make() as client:
                results[name]["batch"] = percentiles(back_to_back(client, call, ids, plan.batch, plan.batch_size))
            results[name]["answered"] += plan.batch
            console.print(f"  {name}: batch-{plan.batch_size} done")
        for name, call, make in systems:
            rps, answered, errs = saturate(make, call, ids, plan.saturation_s, plan.threads)
            results[name]["throughput"], results[name]["errors"] = rps, errs
            results[name]["answered"] += answered
            console.print(f"  {name}: saturation done ({rps:.0f} req/s, {errs} errors)")

        # ---- memory: champion only, then champion + challenger
        fw_one = rss_mb(svc.proc.pid)
        console.print("registering a challenger (the pyfunc copy, a second version) and reloading ...")
        version = registry.register(uri, ctx.model_name, run_id, {TAG_FEATURE_SERVICE: service_name})
        registry.move_alias(
            ctx.model_name, "challenger", version, "serving benchmark: memory with two models", "benchmark"
        )
        reload = svc.http.post("/admin/reload", headers=AUTH)
        serving = reload.json().get("serving", {}) if reload.status_code == 200 else {}
        if serving.get("challenger") != version:
            raise RuntimeError(f"challenger v{version} not loaded: {reload.status_code} {reload.text[:500]}")
        with fw_client() as client:
            back_to_back(client, flywheel_call, ids, 50, 1)
        time.sleep(1.0)
        fw_two = rss_mb(svc.proc.pid)
        feast_rss = rss_mb(procs[0].pid)
        mlflow_rss = rss_mb(procs[1].pid)

        # ---- report
        elapsed = time.perf_counter() - t_begin
        load_after = os.getloadavg()
        fw, bl = results["flywheel"], results["baseline"]

        def ms(x: float) -> str:
            return f"{x:.2f}"

        table = Table(
            title=f"Online serving: Flywheel vs feast serve + mlflow models serve "
            f"({'quick' if args.quick else 'full'} run)"
        )
        for col in ("measure", "flywheel", "baseline", "baseline / flywheel", "target (flywheel)", "met"):
            table.add_column(col, justify="left" if col == "measure" else "right")
        def latency_rows(label: str, f: dict[str, float], b: dict[str, float], quantiles: tuple[str, ...],
                         target_ms: float) -> None:
            for q in quantiles:
                target, met = "", ""
                if q == "p99":
                    target = f"<= {target_ms:g} ms; >= {TARGET_RATIO:g}x lower"
                    ok = f["p99"] <= target_ms and b["p99"] / f["p99"] >= TARGET_RATIO
                    met = "[green]yes[/]" if ok else "[red]no[/]"
                table.add_row(f"{label}, {q} ms (n={int(f['n'])})", ms(f[q]), ms(b[q]), f"{b[q] / f[q]:.1f}x",
                              target, met)

        latency_rows(f"single entity @ {plan.rate:g}/s", fw["single"], bl["single"], ("p50", "p95", "p99", "max"),
                     TARGET_SINGLE_P99_MS)
        table.add_row("  achieved rate, req/s", f"{fw['rate']:.0f}", f"{bl['rate']:.0f}", "", "", "")
        latency_rows(f"batch of {plan.batch_size}", fw["batch"], bl["batch"], ("p50", "p99", "max"),
                     TARGET_BATCH_P99_MS)
        table.add_row(
            f"throughput, req/s ({plan.threads} client threads, {plan.saturation_s:g} s, 1 entity)",
            f"{fw['throughput']:.0f}",
            f"{bl['throughput']:.0f}",
            f"{bl['throughput'] / fw['throughput']:.2f}x",
            "",
            "",
        )
        table.add_row("  errors at saturation", str(fw["errors"]), str(bl["errors"]), "", "", "")
        table.add_row("RSS MiB, champion only (service + log writer)",
                      f"{fw_one[1]:.1f} ({fw_one[0]:.0f} + {fw_one[1] - fw_one[0]:.0f})", "", "", "", "")
        table.add_row(
            "RSS MiB, champion + challenger", f"{fw_two[1]:.1f} ({fw_two[1] - fw_one[1]:+.1f})", "", "", "", ""
        )
        table.add_row(
            "RSS MiB, feast serve (master + worker)", "", f"{feast_rss[1]:.0f} ({feast_rss[2]} procs)", "", "", ""
        )
        table.add_row(
            "RSS MiB, mlflow models serve (cli + server)",
            "",
            f"{mlflow_rss[1]:.0f} ({mlflow_rss[2]} procs)",
            "",
            "",
            "",
        )
        table.add_row(
            "RSS MiB, total for one model",
            f"{fw_one[1]:.0f}",
            f"{feast_rss[1] + mlflow_rss[1]:.0f}",
            f"{(feast_rss[1] + mlflow_rss[1]) / fw_one[1]:.1f}x",
            "",
            "",
        )
        console.print(table)
        if args.json:
            args.json.write_text(json.dumps({
                "size": {"rows": 21 * plan.rows_per_day, "single": plan.single, "batch": plan.batch,
                         "batch_size": plan.batch_size, "warmup": plan.warmup},
                "flywheel": fw, "baseline": bl, "rss_one_mb": fw_one[1], "rss_two_mb": fw_two[1],
                "baseline_rss_mb": feast_rss[1] + mlflow_rss[1], "max_abs_diff": diff, "probe": len(probe),
                "inference": str(inference), "model": type(champion.pipeline.steps[-1][1]).__name__,
                "champion_version": str(champion.version), "challenger_version": str(version),
                "entities_online": len(ids),
                "load_before": load_before, "load_after": os.getloadavg(), "seconds": elapsed}, indent=2, default=str))
        for name in ("flywheel", "baseline"):
            if results[name]["rate"] < 0.95 * plan.rate:
                console.print(
                    f"note: {name} could not keep {plan.rate:g} req/s from one sequential client "
                    f"({results[name]['rate']:.0f}/s): its requests ran back to back, and its latencies "
                    "exclude queueing (in its favour)."
                )
        console.print(
            f"model: {type(champion.pipeline.steps[-1][1]).__name__}; flywheel inference: {inference}; "
            f"max |p difference| {diff:.1e}; client and servers share {os.cpu_count()} cores.\n"
            f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, "
            f"after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}; "
            f"total {elapsed:.0f} s; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        )
    finally:
        if svc is not None:
            stop_service(svc)
        for proc in procs:
            stop_group(proc)
        if args.keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def records(r: dict[str, Any]) -> list[Record]:
    fw, bl = r["flywheel"], r["baseline"]
    base = "feast serve + mlflow models serve"

    def met(kind: str, target_ms: float) -> bool:
        return fw[kind]["p99"] <= target_ms and bl[kind]["p99"] / fw[kind]["p99"] >= TARGET_RATIO

    return [
        Record(benchmark="serving", name="one entity per request: p99", ours=fw["single"]["p99"],
               baseline=bl["single"]["p99"], baseline_name=base, unit="ms",
               target=f"<= {TARGET_SINGLE_P99_MS:g} ms, >= {TARGET_RATIO:g}x lower",
               met=met("single", TARGET_SINGLE_P99_MS)),
        Record(benchmark="serving", name=f"batch of {r['size']['batch_size']}: p99", ours=fw["batch"]["p99"],
               baseline=bl["batch"]["p99"], baseline_name=base, unit="ms",
               target=f"<= {TARGET_BATCH_P99_MS:g} ms, >= {TARGET_RATIO:g}x lower",
               met=met("batch", TARGET_BATCH_P99_MS)),
        Record(benchmark="serving", name="throughput, one entity per request", ours=fw["throughput"],
               baseline=bl["throughput"], baseline_name=base, unit="req/s", better="higher"),
        Record(benchmark="serving", name="RSS for one model", ours=r["rss_one_mb"], baseline=r["baseline_rss_mb"],
               baseline_name=base, unit="MB", note=f"max |p difference| {float(r['max_abs_diff']):.1e}"),
    ]


def measure(quick: bool) -> dict[str, Any]:
    """The serving benchmark in its own process (it starts and stops its servers by process group): its JSON."""
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-serving-json-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_serving", "--json", str(out),
                               *(["--quick"] if quick else [])], cwd=PROJECT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench_serving failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return json.loads(out.read_text())


def render(r: dict[str, Any]) -> str:
    """Both systems side by side, as markdown (the detail under the project's table)."""
    fw, bl = r["flywheel"], r["baseline"]

    def p50_p99(kind: str) -> tuple[str, str]:
        return f"{fw[kind]['p50']:.2f} / {fw[kind]['p99']:.2f}", f"{bl[kind]['p50']:.2f} / {bl[kind]['p99']:.2f}"

    rows = [("requests answered (HTTP 200)", fw["answered"], bl["answered"]),
            ("errors at saturation", fw["errors"], bl["errors"]),
            ("single entity: p50 / p99 ms", *p50_p99("single")),
            (f"batch of {r['size']['batch_size']}: p50 / p99 ms", *p50_p99("batch")),
            ("throughput, req/s", f"{fw['throughput']:.0f}", f"{bl['throughput']:.0f}"),
            ("RSS MiB, one model", f"{r['rss_one_mb']:.0f}", f"{r['baseline_rss_mb']:.0f}")]
    return ("| measure | flywheel | feast serve + mlflow models serve |\n|---|---:|---:|\n"
            + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
            + f"\n\n{r['model']} v{r['champion_version']} (flywheel inference: {r['inference']}); "
              f"max |p difference| on {r['probe']} entities {float(r['max_abs_diff']):.1e}")


def bench(quick: bool) -> BenchResult:
    """The serving benchmark in its own process (it starts and stops its servers by process group)."""
    def run() -> tuple[dict[str, Any], list[Record], list]:
        result = measure(quick)
        return result, records(result), []

    return run_bench("serving", quick, run, render)


if __name__ == "__main__":
    main()
