"""Search trials fanned out on a Dask LocalCluster of 2 worker processes (Prefect's Dask task runner), against
the serial search with the same seed: the same trials, selected model, metrics and MLflow child runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from flywheel import training
from flywheel.schemas import load_gates
from flywheel.settings import ParallelismConfig, SearchConfig, TrainConfig
from tasks.fanout import trial_fanout
from tasks.train import train_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACE = {
    "logistic_regression": {"C": [0.01, 0.1, 1.0, 10.0]},
    "hist_gradient_boosting": {"max_iter": [20, 40], "max_depth": [2, 3], "learning_rate": [0.05, 0.1]},
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One LocalCluster of 2 single-threaded worker processes for the module (no dashboard); its address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture
def split(small_batches: list[pd.DataFrame], dataset) -> training.Split:
    return training.split_by_time(pd.concat(small_batches, ignore_index=True), dataset)


def cfg(method: str, trials: int, parallelism: ParallelismConfig | None = None) -> TrainConfig:
    return TrainConfig(seed=11, experiment="flywheel-dask", search=SearchConfig(method=method, trials=trials),
                       search_space=SPACE, parallelism=parallelism or ParallelismConfig())


def child_runs(client, experiment_id: str, parent: str) -> list[tuple]:
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=500)
    return sorted(
        (r.info.run_name.split("-", 1)[1], dict(r.data.params),
         {k: v for k, v in r.data.metrics.items() if k != "fit_seconds"}) for r in runs
    )


def test_fanned_out_training_selects_and_records_what_the_serial_one_does(
    split, dataset, settings, mlflow_uri, tmp_path: Path, cluster: str, prefect_harness
) -> None:
    """The whole training task, random search: same model, metrics and MLflow child runs."""
    from mlflow import MlflowClient

    gates = load_gates(settings.resolve(settings.evaluate.gates_file))
    outs = {}
    for name, par in (("serial", None), ("dask", ParallelismConfig(address=cluster))):
        outs[name] = train_model.fn(split, dataset, cfg("random", 2, par), gates, mlflow_uri,
                                    str(tmp_path / "artifacts"), {"flywheel.data_hash": "x"})
    serial, dask = outs["serial"], outs["dask"]
    assert serial.trials == dask.trials == 4
    assert (dask.family, dask.params) == (serial.family, serial.params)
    assert (dask.validation_metric, dask.train_metric) == (serial.validation_metric, serial.train_metric)
    assert dask.holdout_metrics == serial.holdout_metrics
    client = MlflowClient(tracking_uri=mlflow_uri)
    a, b = (child_runs(client, o.experiment_id, o.run_id) for o in (serial, dask))
    assert len(a) == 4 and a == b, "the same child runs (trial number, family, params, metrics)"
    assert dask.timings["time.trial_logging_s"] > 0 and dask.timings["time.cluster_start_s"] >= 0
    assert client.get_run(dask.run_id).data.metrics["search.workers"] == 2


@pytest.mark.parametrize("method", ["grid", "random"])
def test_fanned_out_search_runs_the_serial_plan(method, split, dataset, cluster: str, prefect_harness) -> None:
    c = cfg(method, 3)
    serial = training.search_candidates(split, dataset, c)
    with trial_fanout(ParallelismConfig(address=cluster), split, dataset, c.imputation, c.seed,
                      c.search.metric) as fanout:
        assert fanout is not None
        fanned = training.search_candidates(split, dataset, c, map_trials=fanout.map, batch=fanout.workers)
    strip = [(t.number, t.family, t.params, t.validation_metric, t.train_metric) for t in serial.trials]
    assert strip == [(t.number, t.family, t.params, t.validation_metric, t.train_metric) for t in fanned.trials]
    assert (fanned.best.family, fanned.best.params) == (serial.best.family, serial.best.params)


def test_bayesian_search_in_parallel_is_seeded_per_batch(split, dataset, cluster: str, prefect_harness) -> None:
    """Batches of 2 proposals (constant liar): reproducible for the same seed and worker count."""
    c = cfg("bayesian", 4)
    c = c.model_copy(update={"families": ["hist_gradient_boosting"],
                             "search_space": {"hist_gradient_boosting": SPACE["hist_gradient_boosting"]}})
    runs = []
    for _ in range(2):
        with trial_fanout(ParallelismConfig(address=cluster), split, dataset, c.imputation, c.seed,
                          c.search.metric) as fanout:
            assert fanout is not None and fanout.workers == 2
            runs.append(training.search_candidates(split, dataset, c, map_trials=fanout.map, batch=fanout.workers))
            assert all(mb > 0 for mb in fanout.worker_peak_mb().values())
            assert list(fanout.prepared) == [False], "one preprocessing (unscaled, for trees) for every batch"
    assert len(runs[0].trials) == 4
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]
    assert [t.validation_metric for t in runs[0].trials] == [t.validation_metric for t in runs[1].trials]


def test_parallelism_settings_fail_closed_and_default_to_serial(split, dataset) -> None:
    with pytest.raises(ValueError, match="not both"):
        ParallelismConfig(workers=2, address="tcp://127.0.0.1:8786")
    with trial_fanout(ParallelismConfig(), split, dataset, cfg("grid", 1).imputation, 1, "roc_auc") as fanout:
        assert fanout is None
