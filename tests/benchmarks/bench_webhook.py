"""Webhook receiver benchmark: latency of accepted deliveries at a steady rate against a local Prefect server.

    uv run python -m tests.benchmarks.bench_webhook [--quick] [--rate 50] [--seconds 20]

1. A Prefect server (`prefect server start`, SQLite, its own PREFECT_HOME in a temp folder) on a free port,
   timed to healthy; stopped by pid (process group) at the end.
2. The receiver as its own process (`python -m flywheel.webhook`, ci profile, a temp project home: the
   deliveries table in SQLite beside the audit log), emitting to that server; /health 200.
3. 20 warm-up deliveries, then rate x seconds signed `POST /hooks/retrain`, each a new delivery id, started
   on a fixed schedule (open loop: 4 client threads, so one slow answer does not hold back the next send);
   latency is from send to parsed answer. Then 100 signed repeats of accepted deliveries (duplicates), and
   the same number of events at the same rate posted straight to Prefect's POST /events. A delivery is
   answered once it is recorded with its event (the outbox, flywheel/outbox.py): the receiver's sender
   thread emits the events in the background, so Prefect's own latency is no longer on the request's path
   (the direct POSTs show what it would add; the duplicates, one read and no write, what the machine's
   noise alone costs).
4. Checked: every delivery answered 202 (repeats 200), the server holds exactly one event per delivery
   (read back from /api/events/filter, once the outbox drained: how long that took after the last send is
   printed), one row per delivery. Printed: p50 / p90 / p99 / max, the load average and the receiver's RSS.
   Target: p99 <= 20 ms for accepted deliveries.

Everything listens on 127.0.0.1. The client runs on the same machine: on 2 cores it, the receiver and the
Prefect server (which stores each event) share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from flywheel.hmacsig import signature_header
from tests.benchmarks.bench_training import _free_port, start_prefect_server, stop
from tests.benchmarks.common import BenchResult, Record, run_bench, size_for

PROJECT = Path(__file__).resolve().parents[2]
SECRET = "bench-webhook-secret-0123456789"
TARGET_P99_MS = 20.0


@contextmanager
def prefect_database(kind: str, workdir: Path) -> Iterator[str]:
    """SQLite in the temp folder (the local stack's setup), or a fresh PostgreSQL database on 127.0.0.1:5432
    (the production profile's), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir}/prefect.db"
        return
    from tests.production.conftest import throwaway_database

    with throwaway_database("bench_webhook_prefect") as url:
        yield url.replace("postgresql+psycopg://", "postgresql+asyncpg://")  # Prefect's server is async


def start_receiver(home: Path, api: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "PREFECT_API_URL": api, "FLYWHEEL_WEBHOOK_SECRET": SECRET,
           "FLYWHEEL_WEBHOOK__PORT": str(port), "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.webhook", "--profile", "ci", "--config-dir",
                             str(home / "configs")], cwd=PROJECT, env=env, start_new_session=True,
                            stdout=(home / "webhook.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited: {(home / 'webhook.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError("the receiver did not answer /health within 120 s")


def send(client: httpx.Client, delivery: str, reason: str) -> tuple[int, float]:
    raw = json.dumps({"reason": reason}).encode()
    t0 = time.perf_counter()
    sig = signature_header([SECRET], int(time.time()), delivery, raw)  # signing is part of the sender's cost
    resp = client.post("/hooks/retrain", content=raw, headers={
        "Content-Type": "application/json", "X-Flywheel-Delivery": delivery, "X-Flywheel-Signature": sig})
    resp.json()
    return resp.status_code, (time.perf_counter() - t0) * 1000


def paced(url: str, call: Callable[[httpx.Client, int], tuple[int, float]], n: int, rate: float,
          threads: int = 4) -> tuple[list[tuple[int, float]], float]:
    """n calls started every 1/rate s on `threads` clients; (status, ms) each, and the worst start delay (ms)."""
    local = threading.local()
    late: list[float] = []

    def one(i: int, due: float) -> tuple[int, float]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=30)
        late.append(time.perf_counter() - due)
        return call(local.client, i)

    start = time.perf_counter() + 0.05
    futures = []
    with ThreadPoolExecutor(threads) as pool:
        for i in range(n):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(one, i, due))
        results = [f.result() for f in futures]
    return results, max(late) * 1000


def post_event(client: httpx.Client, i: int) -> tuple[int, float]:
    """The floor: the same kind of event posted straight to the Prefect API, no receiver in between."""
    event = {"id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(), "event": "flywheel.bench.direct",
             "resource": {"prefect.resource.id": "flywheel.model.direct"}, "payload": {"reason": f"direct {i}"}}
    t0 = time.perf_counter()
    resp = client.post("/events", json=[event])
    return resp.status_code, (time.perf_counter() - t0) * 1000


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]  # nearest rank


def events_stored(api: str, expected: int, timeout: float = 90) -> int:
    """How many retrain events the server holds (waits for the asynchronous persister to catch up)."""
    deadline = time.monotonic() + timeout
    total = 0
    while time.monotonic() < deadline:
        resp = httpx.post(f"{api}/events/filter", timeout=10, json={"limit": 1, "filter": {
            "event": {"name": ["flywheel.retrain.requested"]}, "resource": {"id": ["flywheel.model.churn"]}}})
        total = resp.json()["total"]
        if total >= expected:
            return total
        time.sleep(0.5)
    return total


FULL = {"rate": 50.0, "seconds": 20.0}
QUICK = {"rate": 50.0, "seconds": 5.0}  # the correctness-only size tests/integration/test_webhook_bench.py runs


def measure(console: Any, home: Path, api: str, rate: float, seconds: float) -> dict[str, Any]:
    """Start the receiver against `api`, send the paced deliveries, check and print (the receiver is stopped);
    the figures."""
    from rich.table import Table

    n = int(rate * seconds)
    receiver, url = start_receiver(home, api)
    try:
        console.print(f"receiver up at {url}")
        with httpx.Client(base_url=url, timeout=30) as client:
            warm = [send(client, f"warm-{i}", "warm-up")[0] for i in range(20)]
        assert warm == [202] * 20, warm
        console.print(f"sending {n} deliveries at {rate:.0f}/s ({seconds:.0f} s) ...")
        t0 = time.perf_counter()
        results, worst_late = paced(url, lambda c, i: send(c, f"bench-{i}", f"bench {i}"), n, rate)
        took = time.perf_counter() - t0
        stored = events_stored(api, n + 20)  # the outbox sends in the background: read back once it drained
        drained = time.perf_counter() - t0 - took
        console.print("the same rate straight to Prefect's POST /events (what emitting inline would wait on) ...")
        direct, _ = paced(api, post_event, n, rate)
        with httpx.Client(base_url=url, timeout=30) as client:
            dups = [send(client, f"bench-{i}", f"bench {i}") for i in range(0, n, max(1, n // 100))]
        rss = psutil.Process(receiver.pid).memory_info().rss / 2**20
        load = os.getloadavg()[0]
        statuses = sorted({s for s, _ in results})
        assert statuses == [202], f"not every delivery was accepted: {statuses}"
        assert {s for s, _ in dups} == {200}, "a repeat was not answered as a duplicate"
    finally:
        stop(receiver)
    assert stored == n + 20, f"the server holds {stored} retrain events for {n + 20} deliveries"

    ms = [m for _, m in results]
    table = Table(title=f"webhook receiver: {n} accepted deliveries at {n / took:.1f}/s "
                        f"(worst start delay {worst_late:.1f} ms)")
    for col in ("answers", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    assert {s for s, _ in direct} == {204}
    for label, vals in (("202 accepted (event queued)", ms), ("200 duplicate", [m for _, m in dups]),
                        ("Prefect POST /events alone, same rate", [m for _, m in direct])):
        table.add_row(label, str(len(vals)), *(f"{pct(vals, q):.1f}" for q in (50, 90, 99)), f"{max(vals):.1f}")
    console.print(table)
    p99 = pct(ms, 99)
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    console.print(f"p99 accepted {p99:.1f} ms (target <= {TARGET_P99_MS:.0f} ms: {verdict}); events stored "
                  f"{stored}/{n + 20} (all within {drained:.1f} s of the last send, read back included); "
                  f"load average {load:.1f}; receiver RSS {rss:.0f} MiB")
    return {"size": {"rate": rate, "seconds": seconds}, "deliveries": n, "warm_up": len(warm),
            "statuses": {"accepted": [s for s, _ in results], "duplicates": [s for s, _ in dups],
                         "direct": [s for s, _ in direct]},
            "events_stored": stored, "drained_s": drained, "rss_mb": rss, "load_average": load,
            "accepted_ms": {q: pct(ms, q) for q in (50, 90, 99)} | {"max": max(ms)},
            "direct_ms": {q: pct([m for _, m in direct], q) for q in (50, 90, 99)}, "target_met": p99 <= TARGET_P99_MS}


def run(rate: float, seconds: float, prefect_db: str = "sqlite", console: Any = None) -> dict[str, Any]:
    """A Prefect server and a project home in a temp folder, `measure`, everything stopped and removed."""
    if console is None:
        from rich.console import Console

        console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    home = workdir / "home"
    shutil.copytree(PROJECT / "configs", home / "configs")
    (home / "data").mkdir(parents=True)
    try:
        with prefect_database(prefect_db, workdir) as db_url:
            console.print(f"starting a Prefect server ({prefect_db}) ...")
            server, api, startup = start_prefect_server(workdir, db_url)
            try:
                console.print(f"server healthy after {startup:.1f} s at {api}")
                return {**measure(console, home, api, rate, seconds), "startup_s": startup}
            finally:
                stop(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def records(r: dict[str, Any]) -> list[Record]:
    n = r["deliveries"]
    return [Record(benchmark="webhook", name=f"signed retrain delivery, {n:,} at {r['size']['rate']:g}/s: p99",
                   ours=r["accepted_ms"][99], baseline=r["direct_ms"][99],
                   baseline_name="the same events posted straight to Prefect's POST /events (emitting inline)",
                   unit="ms", target=f"<= {TARGET_P99_MS:g} ms", met=r["target_met"],
                   note=f"events stored {r['events_stored']:,} for {n + r['warm_up']:,} deliveries")]


def render(r: dict[str, Any]) -> str:
    rows = [("202 accepted (event queued)", r["accepted_ms"]), ("Prefect POST /events alone", r["direct_ms"])]
    lines = ["| answers | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {ms[50]:.1f} | {ms[90]:.1f} | {ms[99]:.1f} |" for label, ms in rows]
    return "\n".join(lines) + (f"\n\nevents stored {r['events_stored']}, all within {r['drained_s']:.1f} s of the "
                               f"last send; receiver RSS {r['rss_mb']:.0f} MiB; server start {r['startup_s']:.1f} s")


def bench(quick: bool) -> BenchResult:
    """For `make bench`: the run at its full or quick size, its console output kept out of the aggregate's."""
    from rich.console import Console

    def run_() -> tuple[dict[str, Any], list[Record], list]:
        result = run(**(QUICK if quick else FULL), console=Console(quiet=True))
        return result, records(result), []

    return run_bench("webhook", quick, run_, render)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_webhook",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s instead of 20 (a smoke run)")
    parser.add_argument("--rate", type=float, default=None, help="deliveries per second (default 50)")
    parser.add_argument("--seconds", type=float, default=None, help="default 20 (5 with --quick)")
    parser.add_argument("--prefect-db", choices=["sqlite", "postgres"], default="sqlite",
                        help="the Prefect server's database (postgres: a fresh database on 127.0.0.1:5432)")
    args = parser.parse_args()
    size = size_for(FULL, QUICK, args.quick, {"rate": args.rate, "seconds": args.seconds})
    run(size["rate"], size["seconds"], args.prefect_db)


if __name__ == "__main__":
    main()
