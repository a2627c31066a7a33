"""Search trials (train.parallelism) and batch-scoring partitions (batch.parallelism) fanned out through
Prefect's Dask task runner (prefect-dask), when the settings ask.

A local Dask cluster of `workers` processes (one thread each, its dashboard on a free port: the default 8787
collides between runs) is started for the search and stopped after it; or the trials go to an existing
cluster's `address`.
Each trial is a Prefect task run (`fit_trial`) on a Dask worker. The split travels once: a `stage_split`
task holds it on a worker and every trial takes that task's future, so Dask moves the frame worker to worker
at most once each instead of shipping it with every trial.

prefect_dask and distributed are imported inside the functions (workers re-import the entry module).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
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


@task(name="fit_trial", task_run_name="trial-{family}", cache_policy=NO_CACHE)
def fit_trial(
    split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, seed: int, metric: str, family: str,
    params: dict[str, Any],
) -> Trial:
    """One search trial on a Dask worker: fit on train, score on train and validation."""
    return training.evaluate_trial(split, dataset, imputation, seed, metric, family, params)


def _peak_mb() -> float:
    """The calling process's peak RSS in MB (VmHWM), run on each worker to report its memory."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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
        futures = [
            self.runner.submit(fit_trial, {"split": self.staged, "dataset": self.dataset,
                                           "imputation": self.imputation, "seed": self.seed,
                                           "metric": self.metric, "family": family, "params": params})
            for family, params in configs
        ]
        return [f.result() for f in futures]

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
        threads = sum(runner.client.nthreads().values()) or 1
        yield TrialFanout(runner=runner, staged=staged, dataset=dataset, imputation=imputation, seed=seed,
                          metric=metric, workers=threads)


# ------------------------------------------------------------------------------------ batch scoring


@task(name="stage_model", task_run_name="stage-model", cache_policy=NO_CACHE)
def stage_model(model: Any) -> Any:
    """Hold the model on a worker; partitions take this task's future (one transfer, not one per partition)."""
    return model


@task(name="score_partition", task_run_name="score-partition-{index}", cache_policy=NO_CACHE)
def score_partition(index: int, repo: Path, model: Any, dataset: DatasetDefinition, ids: list[Any], at: datetime,
                    scored_at: datetime) -> pd.DataFrame:
    """One partition of a batch scoring on a Dask worker: its offline features, then the model's scores."""
    return scoring.score_partition(repo, model, dataset, ids, at, scored_at)


@contextmanager
def partition_fanout(cfg: ParallelismConfig, repo: Path, model: Any, dataset: DatasetDefinition, at: datetime
                     ) -> Iterator[scoring.PartitionMap | None]:
    """A PartitionMap running each partition as a task on the Dask cluster the settings describe (None when
    they ask for serial scoring). Workers read the feature repo at `repo`: a cluster elsewhere needs it on a
    shared path."""
    if not cfg.parallel:
        yield None
        return
    with task_runner(cfg) as runner:
        staged = runner.submit(stage_model, {"model": model})

        def map_partitions(parts: list[list[Any]], scored_at: datetime) -> list[pd.DataFrame]:
            futures = [runner.submit(score_partition, {"index": i, "repo": repo, "model": staged, "dataset": dataset,
                                                       "ids": ids, "at": at, "scored_at": scored_at})
                       for i, ids in enumerate(parts)]
            return [f.result() for f in futures]

        yield map_partitions
