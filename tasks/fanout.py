"""Search trials (train.parallelism), batch-scoring partitions (batch.parallelism) and the windows of a monitoring
backfill (monitor.parallelism) fanned out through Prefect's Dask task runner (prefect-dask), when the settings ask.

A local Dask cluster of `workers` processes (one thread each, its dashboard on a free port: the default 8787
collides between runs) is started for the work and stopped after it; or the work goes to an existing
cluster's `address`.
Each trial is a Prefect task run (`fit_trial`) on a Dask worker, submitted longest expected first, so a worker
that finishes takes the next one (a task run costs about 0.1 s on the worker on a quiet machine, measured
2026-12-04). The data travels once per worker: `stage_split` holds the trials' part of the split (train and
validation, feature and label columns) on a worker; one `prepare_inputs` task per preprocessing the trials need
(scaled for linear models, unscaled for trees), each on its own worker so they run side by side, turns it into
the matrices every trial of that kind fits on (`training.prepare_inputs`), instead of each trial preprocessing
the frame again.

prefect_dask and distributed are imported inside the functions (workers re-import the entry module).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import scoring, training
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ImputationConfig, ParallelismConfig
from flywheel.training import Split, Trial, TrialInputs


@task(name="stage_split", task_run_name="stage-split", cache_policy=NO_CACHE)
def stage_split(split: Split) -> Split:
    """Hold the split on a worker; trials take this task's future (one transfer, not one per trial)."""
    return split


@task(name="prepare_inputs", task_run_name="prepare-{kind}", cache_policy=NO_CACHE)
def prepare_inputs(
    kind: str, split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, scale: bool,
) -> TrialInputs:
    """One preprocessing of the split for the trials that use it (`training.prepare_inputs`), held on a worker."""
    return training.prepare_inputs(split, dataset, imputation, scale)


@task(name="fit_trial", task_run_name="trial-{number:03d}-{family}", cache_policy=NO_CACHE)
def fit_trial(number: int, inputs: TrialInputs, seed: int, metric: str, family: str, params: dict[str, Any]) -> Trial:
    """One search trial on a Dask worker (`training.score_trial`): fit on the preprocessed train set, score on train
    and validation. `number` is the trial's place in the plan, for its name in the Prefect UI."""
    return training.score_trial(inputs, seed, metric, family, params)


def _peak_mb() -> float:
    """The calling process's peak RSS in MB (VmHWM), run on each worker to report its memory."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def expected_cost(family: str, params: dict[str, Any]) -> float:
    """A rough relative cost of one trial, for the order of submission only (longest first). Boosting and forests
    grow with their trees (iterations x depth); a logistic regression costs a fraction of a short boosting run
    once the trials share their preprocessing (at 1M rows, 2026-12-04: 0.4 s against 4-10 s)."""
    if family == "hist_gradient_boosting":
        return float(params.get("max_iter", 100)) / 50 * (2 + min(float(params.get("max_depth") or 8), 8.0)) / 5
    if family == "random_forest":
        return float(params.get("n_estimators", 100)) / 50 * min(float(params.get("max_depth") or 12), 12.0) / 4
    return 0.25


def longest_first(configs: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """The configurations' indices by expected cost, longest first (ties in plan order): submitted in this order,
    the long trials start first and the short ones fill the workers' last gaps."""
    return sorted(range(len(configs)), key=lambda i: -expected_cost(*configs[i]))


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
    prepared: dict[bool, Any] = field(default_factory=dict)  # scaled? -> the future of prepare_inputs

    def _prepare(self, kinds: list[bool]) -> None:
        """Submit the preprocessings `kinds` asks for and this search has not: each on its own worker where there
        are enough (loose: a lost worker leaves it to another), so they run side by side."""
        import dask

        workers = sorted(self.runner.client.scheduler_info()["workers"])  # none yet on a cluster scaling from 0
        for n, scale in enumerate(k for k in dict.fromkeys(kinds) if k not in self.prepared):
            where = {"workers": [workers[n % len(workers)]], "allow_other_workers": True} if workers else {}
            with dask.annotate(**where):
                self.prepared[scale] = self.runner.submit(prepare_inputs, {
                    "kind": "scaled" if scale else "unscaled", "split": self.staged, "dataset": self.dataset,
                    "imputation": self.imputation, "scale": scale})

    def map(self, configs: list[tuple[str, dict[str, Any]]]) -> list[Trial]:
        """One task per trial on its family's preprocessing, longest expected first (`longest_first`); returned in
        plan order, so the results do not depend on which worker ran what or when."""
        self._prepare([training.scaled(family) for family, _ in configs])
        futures = {}
        for i in longest_first(configs):
            family, params = configs[i]
            futures[i] = self.runner.submit(fit_trial, {
                "number": i, "inputs": self.prepared[training.scaled(family)], "seed": self.seed,
                "metric": self.metric, "family": family, "params": params})
        return [futures[i].result() for i in range(len(configs))]

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


PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
TRIM = "MALLOC_TRIM_THRESHOLD_"


@contextmanager
def running(cfg: ParallelismConfig) -> Iterator[Any]:
    """`task_runner(cfg)`, started. A local cluster's workers start without MALLOC_TRIM_THRESHOLD_ (distributed's
    other pre-spawn settings kept): setting it turns off glibc's adaptive mmap threshold, so every large temporary
    array is mapped and zeroed afresh; the search's trials ran 10% slower with it (82.3 s vs 75.0 s serially at
    1M rows, 2026-12-04), and these workers live for one flow's work, so trimming buys nothing. distributed puts
    it in its config and, once any nanny in the process has spawned a worker, in this process's environment,
    which workers inherit: both are left out while the cluster starts."""
    import dask
    import distributed  # noqa: F401  (loads distributed's configuration defaults)

    environ = {k: v for k, v in dask.config.get(PRE_SPAWN_ENVIRON).items() if k != TRIM}
    with dask.config.set({PRE_SPAWN_ENVIRON: environ}), task_runner(cfg) as runner:
        inherited = None if cfg.address else os.environ.pop(TRIM, None)
        try:
            runner.client  # noqa: B018  (the runner starts its cluster on the client's first use: here)
        finally:
            if inherited is not None:
                os.environ[TRIM] = inherited
        yield runner


@contextmanager
def trial_fanout(
    cfg: ParallelismConfig, split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, seed: int,
    metric: str,
) -> Iterator[TrialFanout | None]:
    """A TrialFanout while the cluster is up (None when the settings ask for a serial search)."""
    if not cfg.parallel:
        yield None
        return
    with running(cfg) as runner:
        staged = runner.submit(stage_split, {"split": training.search_part(split, dataset)})
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
    with running(cfg) as runner:
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
    with running(cfg) as runner:
        futures = [runner.submit(fn, call) for call in calls]
        return [f.result() for f in futures]
