"""Search trials (train.parallelism), batch-scoring partitions (batch.parallelism) and the windows of a monitoring
backfill (monitor.parallelism) fanned out through Prefect's Dask task runner (prefect-dask), when the settings ask.

A local Dask cluster of `workers` processes (one thread each, its dashboard on a free port: the default 8787
collides between runs) is started for the work and stopped after it; or the work goes to an existing
cluster's `address`.
The trials go in shares of about equal expected cost, two per worker, each share a Prefect task run
(`fit_trials`) on a Dask worker (a task run per trial cost as much as the trial). The split travels once: a
`stage_split` task holds it on a worker and every share takes that task's future, so Dask moves the frame
worker to worker at most once each instead of shipping it with every task.

prefect_dask and distributed are imported inside the functions (workers re-import the entry module).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import scoring, training
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ImputationConfig, ParallelismConfig
from flywheel.training import Split, Trial


@task(name="stage_split", task_run_name="stage-split", cache_policy=NO_CACHE)
def stage_split(split: Split) -> Split:
    """Hold the split on a worker; trials take this task's future (one transfer, not one per trial)."""
    return split


@task(name="fit_trials", task_run_name="trials-{index}", cache_policy=NO_CACHE)
def fit_trials(
    index: int, split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, seed: int, metric: str,
    configs: list[tuple[str, dict[str, Any]]],
) -> list[Trial]:
    """A share of the search's trials on a Dask worker, one after another: fit on train, score on train and
    validation. Trials go in shares, not one task each: a task run costs about 1-2.5 s of Prefect API calls on
    the worker, as much as a trial's fit at 200k rows (measured, README "Benchmarks")."""
    return [training.evaluate_trial(split, dataset, imputation, seed, metric, family, params)
            for family, params in configs]


def _peak_mb() -> float:
    """The calling process's peak RSS in MB (VmHWM), run on each worker to report its memory."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def expected_cost(family: str, params: dict[str, Any]) -> float:
    """A rough relative cost of one trial, for the order of submission only (longest first): boosting and forests
    grow with their trees (iterations x depth), a logistic regression costs about one short boosting run."""
    if family == "hist_gradient_boosting":
        return float(params.get("max_iter", 100)) / 50 * min(float(params.get("max_depth") or 8), 8.0) / 4
    if family == "random_forest":
        return float(params.get("n_estimators", 100)) / 50 * min(float(params.get("max_depth") or 12), 12.0) / 4
    return 1.0


def shares(configs: list[tuple[str, dict[str, Any]]], n: int) -> list[list[int]]:
    """The configurations' indices cut into `n` shares of about equal expected cost: longest first, each to the
    share with the least so far (ties: the first share); each share longest first. Empty shares dropped."""
    order = sorted(range(len(configs)), key=lambda i: -expected_cost(*configs[i]))  # stable: ties in plan order
    bins: list[list[int]] = [[] for _ in range(max(1, n))]
    load = [0.0] * len(bins)
    for i in order:
        k = load.index(min(load))
        bins[k].append(i)
        load[k] += expected_cost(*configs[i])
    return [b for b in bins if b]


# What a trial imports on a worker (Prefect's task engine, scikit-learn's estimators) and what a scoring partition
# imports (DuckDB and scikit-learn for the model; not Feast: partitions get the views' definitions from the caller)
TRIAL_MODULES = ("prefect.task_engine", "sklearn.ensemble", "sklearn.linear_model", "tasks.fanout")
SCORING_MODULES = ("duckdb", "prefect.task_engine", "sklearn.linear_model", "tasks.fanout")


def _import_modules(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


def warm_up_workers(client: Any, modules: tuple[str, ...]) -> None:
    """Import `modules` on every worker while the cluster starts, not inside each worker's first task.

    One plain Dask task pinned to each worker, not `client.run`: `run` calls the function on the worker's event
    loop, and an import that takes over 30 s on a loaded machine leaves the worker deaf past distributed's TCP
    timeout, so the scheduler drops it (seen in CI: CommClosedError on the broadcast). A task runs in the
    worker's thread pool while its loop keeps answering. Loose restrictions: a worker lost meanwhile leaves its
    warm-up to another, not hanging."""
    futures = [client.submit(_import_modules, modules, workers=[address], allow_other_workers=True, pure=False)
               for address in client.scheduler_info()["workers"]]
    client.gather(futures)


@dataclass
class TrialFanout:
    """`map` for `training.search_candidates(map_trials=...)`, bound to a running Dask task runner."""

    runner: Any  # prefect_dask.DaskTaskRunner, started
    staged: Any  # the future of stage_split
    dataset: DatasetDefinition
    imputation: ImputationConfig
    seed: int
    metric: str
    workers: int  # how many trials run at once (the cluster's worker threads)

    def map(self, configs: list[tuple[str, dict[str, Any]]]) -> list[Trial]:
        """The trials in `shares` tasks of about equal expected cost (two per worker: fewer task runs than trials,
        yet a share that runs long leaves the others something to take); returned in plan order, so the
        results do not depend on how they were shared out."""
        bins = shares(configs, min(len(configs), 2 * self.workers))
        futures = [self.runner.submit(fit_trials, {"index": n, "split": self.staged, "dataset": self.dataset,
                                                   "imputation": self.imputation, "seed": self.seed,
                                                   "metric": self.metric, "configs": [configs[i] for i in b]})
                   for n, b in enumerate(bins)]
        out: dict[int, Trial] = {}
        for b, f in zip(bins, futures, strict=True):
            out.update(zip(b, f.result(), strict=True))
        return [out[i] for i in range(len(configs))]

    def worker_peak_mb(self) -> dict[str, float]:
        """Each worker's peak RSS so far (MB), by worker address."""
        return self.runner.client.run(_peak_mb)


def task_runner(cfg: ParallelismConfig) -> Any:
    """Prefect's Dask task runner for these settings: an existing cluster, or a local one of `workers`
    single-threaded processes, the dashboard on a free port."""
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    kwargs: dict[str, Any] = {"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                              "dashboard_address": ":0"}
    if cfg.memory_limit:
        kwargs["memory_limit"] = cfg.memory_limit
    return DaskTaskRunner(cluster_kwargs=kwargs)


@contextmanager
def trial_fanout(
    cfg: ParallelismConfig, split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, seed: int,
    metric: str,
) -> Iterator[TrialFanout | None]:
    """A TrialFanout while the cluster is up (None when the settings ask for a serial search)."""
    if not cfg.parallel:
        yield None
        return
    with task_runner(cfg) as runner:
        staged = runner.submit(stage_split, {"split": split})
        warm_up_workers(runner.client, TRIAL_MODULES)  # part of the cluster's start-up, reported with it
        threads = sum(runner.client.nthreads().values()) or 1
        yield TrialFanout(runner=runner, staged=staged, dataset=dataset, imputation=imputation, seed=seed,
                          metric=metric, workers=threads)


# ------------------------------------------------------------------------------------ batch scoring


@task(name="stage_model", task_run_name="stage-model", cache_policy=NO_CACHE)
def stage_model(model: Any) -> Any:
    """Hold the model on a worker; partitions take this task's future (one transfer, not one per partition)."""
    return model


@task(name="score_partition", task_run_name="score-partition-{index}", cache_policy=NO_CACHE)
def score_partition(index: int, reader: scoring.OfflineReader, model: Any, dataset: DatasetDefinition,
                    ids: list[Any], at: datetime, scored_at: datetime) -> scoring.ScoredPartition:
    """One partition of a batch scoring on a Dask worker: its entities' offline rows joined at `at`, then the
    model's scores."""
    return scoring.score_partition(reader, model, dataset, ids, at, scored_at)


@contextmanager
def partition_fanout(cfg: ParallelismConfig, reader: scoring.OfflineReader, model: Any, dataset: DatasetDefinition,
                     at: datetime) -> Iterator[scoring.PartitionMap | None]:
    """A PartitionMap running each partition as a task on the Dask cluster the settings describe (None when
    they ask for serial scoring). Workers read the offline store's parquet files at the paths `reader` names:
    a cluster elsewhere needs them on a shared path."""
    if not cfg.parallel:
        yield None
        return
    # a local worker runs one task at a time on its own core: DuckDB inside it gets one thread, not one per core
    # (two workers x two DuckDB threads on two cores only add switching); a remote cluster's machines are unknown
    local = reader.with_threads(1) if not cfg.address else reader
    with task_runner(cfg) as runner:
        staged = runner.submit(stage_model, {"model": model})
        warm_up_workers(runner.client, SCORING_MODULES)  # part of the cluster's start-up, reported with it

        def map_partitions(parts: list[list[Any]], scored_at: datetime) -> list[scoring.ScoredPartition]:
            futures = [runner.submit(score_partition, {"index": i, "reader": local, "model": staged,
                                                       "dataset": dataset, "ids": ids, "at": at,
                                                       "scored_at": scored_at})
                       for i, ids in enumerate(parts)]
            return [f.result() for f in futures]

        yield map_partitions


# ------------------------------------------------------------------------------ any list of task calls


def map_task(cfg: ParallelismConfig, fn: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Each call's result, in the calls' order: the Prefect task `fn` run once per call on the Dask cluster the
    settings describe, else one after another here (monitoring backfill windows)."""
    if not cfg.parallel:
        return [fn(**call) for call in calls]
    with task_runner(cfg) as runner:
        futures = [runner.submit(fn, call) for call in calls]
        return [f.result() for f in futures]
