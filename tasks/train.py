"""Training stage: search, refit, evaluate on the holdout and record it all in one MLflow parent run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from flywheel import training
from flywheel.lineage import StageTimer, frame_hash, git_sha, hardware
from flywheel.schemas import DatasetDefinition, GatesConfig
from flywheel.settings import TrainConfig
from flywheel.training import Baseline, Split, Trial
from tasks._prefect import retry_store_unavailable, run_logger
from tasks.fanout import trial_fanout

_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100  # MLflow log_batch limits per call
_UNSAFE = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric names


class TrainOutcome(BaseModel):
    """What the training stage hands to evaluation and registration."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    pipeline: Pipeline  # best configuration refit on train + validation
    baseline: Baseline  # the `baseline` gate's model (configs/gates.yaml), fit on train + validation
    family: str
    params: dict[str, Any]
    metric: str  # the search metric (train.search.metric)
    greater_is_better: bool
    train_metric: float  # best trial, fit on train: scored on train (overfitting gate)
    validation_metric: float  # best trial, fit on train: scored on validation
    holdout_metric: float  # final pipeline on the holdout
    baseline_holdout_metric: float | None  # None when the metric needs two classes and has them not
    holdout_metrics: dict[str, float]  # roc_auc, average_precision, log_loss, brier, accuracy, f1
    run_id: str  # the MLflow parent run (the register stage logs the model into it)
    experiment_id: str
    trials: int
    slice_metrics: dict[str, dict[str, float | None]]  # "<column>=<value>" -> metrics on the holdout
    feature_importance: dict[str, float]  # raw feature -> permutation importance on the holdout
    timings: dict[str, float]  # "time.<stage>_s" -> wall-clock seconds

    def lineage(self) -> dict[str, str]:
        """What, beyond the data lineage, a reproduction needs: the chosen family and its params."""
        return {"flywheel.family": self.family, "flywheel.params": json.dumps(self.params, sort_keys=True)}


def ensure_experiment(client: Any, name: str, artifact_location: str, log: Any) -> str:
    from mlflow.exceptions import MlflowException

    # a URI (s3://, file://, the MLflow server's proxied mlflow-artifacts:/...) as it is; a folder made absolute
    location = artifact_location if ":/" in artifact_location else _as_uri(artifact_location)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a concurrent run
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.artifact_location.rstrip("/") != location.rstrip("/"):
        log.warning(
            "experiment %r already stores artifacts at %s (asked for %s); keeping its location",
            name,
            exp.artifact_location,
            location,
        )
    return exp.experiment_id


def _as_uri(path: str) -> str:
    from pathlib import Path

    p = Path(path).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p.as_uri()


def _log_batch(
    client: Any,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Batched logging, chunked to MLflow's per-call limits."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(ms), _MAX_METRICS):
        client.log_batch(run_id, metrics=ms[i : i + _MAX_METRICS])
    for i in range(0, max(len(ps), len(ts)), _MAX_PARAMS_TAGS):
        client.log_batch(run_id, params=ps[i : i + _MAX_PARAMS_TAGS], tags=ts[i : i + _MAX_PARAMS_TAGS])


def _metric_name(*parts: str) -> str:
    return ".".join(_UNSAFE.sub("_", p) for p in parts)


def _slice_metric_dict(slices: dict[str, dict[str, float | None]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, values in slices.items():
        col, _, value = key.partition("=")
        for name, v in values.items():
            if v is not None:
                out[_metric_name("slice", col, value, name)] = v
    return out


def _prefect_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
        if flow_run.ui_url:
            tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


def _sample_predictions(
    pipeline: Pipeline, split: Split, dataset: DatasetDefinition, seed: int, rows: int = 20
) -> pd.DataFrame:
    holdout = split.holdout
    sample = holdout.sample(n=min(rows, len(holdout)), random_state=seed).sort_values(dataset.timestamp)
    cols = [c for c in [dataset.entity, dataset.timestamp, dataset.label, *dataset.feature_names] if c in sample]
    out = sample[cols].copy()
    out["score"] = training.predict_scores(pipeline, sample, dataset).round(6)
    out["predicted_positive"] = (out["score"] >= 0.5).astype(int)
    return out.reset_index(drop=True)


# a database restart or fail-over during the search (MLflow's store away for a moment) trains again in a new run;
# the interrupted run is marked FAILED. Any other failure is not retried: the search would only repeat it.
@task(name="train_model", task_run_name="train-{dataset.name}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=10, retry_condition_fn=retry_store_unavailable)
def train_model(
    split: Split,
    dataset: DatasetDefinition,
    cfg: TrainConfig,
    gates: GatesConfig,
    tracking_uri: str,
    artifact_location: str,
    lineage: dict[str, str],
) -> TrainOutcome:
    """Search model configurations, refit the best, score it on the holdout and track it all in MLflow.

    `gates` says which baseline to fit (`gates.baseline`) and the metric it is chosen by (`gates.primary`)."""
    from mlflow import MlflowClient

    log = run_logger("flywheel.train")
    timer = StageTimer()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = ensure_experiment(client, cfg.experiment, artifact_location, log)
    counts = split.counts()

    tags: dict[str, Any] = {"dataset": dataset.name, "stage": "train", **lineage}
    tags.setdefault("flywheel.git_sha", git_sha())
    if "flywheel.data_hash" not in tags:
        frame = pd.concat([split.train, split.validation, split.holdout], ignore_index=True)
        tags["flywheel.data_hash"] = frame_hash(frame)
    if tags["flywheel.git_sha"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["flywheel.git_sha"].removesuffix("+dirty")
    tags.update({f"hardware.{k}": v for k, v in hardware().items()})
    tags.update(_prefect_tags())

    # strings only: a tracking server (REST) refuses other tag types that a database store would take
    parent = client.create_run(experiment_id, run_name=f"train-{dataset.name}",
                               tags={k: str(v) for k, v in tags.items()})
    run_id = parent.info.run_id
    log.info(
        "training %s: %s search, %d trial(s) per family over %s on %s; split %s; MLflow run %s",
        dataset.name,
        cfg.search.method,
        cfg.search.trials,
        cfg.families,
        cfg.search.metric,
        counts,
        run_id,
    )

    def on_trial(i: int, total: int, trial: Trial) -> None:
        with timer.stage("trial_logging"):  # MLflow's share of the search, measured
            log_trial(i, total, trial)

    def log_trial(i: int, total: int, trial: Trial) -> None:
        child = client.create_run(
            experiment_id,
            run_name=f"{run_id[:8]}-trial-{trial.number:03d}-{trial.family}",
            tags={"mlflow.parentRunId": run_id, "dataset": dataset.name, "trial.number": str(trial.number)},
        )
        _log_batch(
            client,
            child.info.run_id,
            metrics={
                f"validation.{cfg.search.metric}": trial.validation_metric,
                f"train.{cfg.search.metric}": trial.train_metric,
                "fit_seconds": trial.fit_seconds,
            },
            params={"family": trial.family, **{f"model.{k}": v for k, v in trial.params.items()}},
        )
        client.set_terminated(child.info.run_id, "FINISHED")
        log.info(
            "trial %d/%d %s %s: validation %s %.4f (train %.4f, fit %.2fs)",
            i,
            total,
            trial.family,
            trial.params,
            cfg.search.metric,
            trial.validation_metric,
            trial.train_metric,
            trial.fit_seconds,
        )

    try:
        with threadpool_limits(limits=training.FIT_THREADS, user_api="openmp"):
            with contextlib.ExitStack() as cluster:
                with timer.stage("cluster_start"):  # 0 when serial; a local cluster takes 5-30 s
                    fanout = cluster.enter_context(trial_fanout(cfg.parallelism, split, dataset, cfg.imputation,
                                                                cfg.seed, cfg.search.metric))
                if fanout is not None:
                    log.info("search fanned out on Dask: %d worker thread(s)", fanout.workers)
                with timer.stage("search"):
                    result = training.search_candidates(
                        split, dataset, cfg, on_trial=on_trial, map_trials=fanout.map if fanout else None,
                        batch=fanout.workers if fanout else 1)
                workers = fanout.workers if fanout else 1
                worker_mb = max(fanout.worker_peak_mb().values(), default=0.0) if fanout else None
            best = result.best
            log.info(
                "best of %d: %s %s (%s %.4f)",
                len(result.trials),
                best.family,
                best.params,
                result.metric,
                best.validation_metric,
            )
            with timer.stage("fit_final"):
                pipeline = training.fit_final(split, dataset, best.family, best.params, cfg.imputation, cfg.seed)
            with timer.stage("fit_baseline"):
                baseline = training.fit_baseline(
                    split, dataset, gates.baseline, gates.primary.metric, cfg.imputation, cfg.seed
                )
            with timer.stage("evaluate"):
                holdout_metrics = training.overall_metrics(pipeline, split.holdout, dataset)
                baseline_metrics = training.overall_metrics(baseline.pipeline, split.holdout, dataset)
                slices = training.slice_metrics(pipeline, split.holdout, dataset)
                y_hold = training.labels(split.holdout, dataset).to_numpy()
                s_hold = training.predict_scores(pipeline, split.holdout, dataset)
            with timer.stage("importance"):
                importance = training.feature_importance(pipeline, split.holdout, dataset, cfg.seed)

            params = {
                "dataset": dataset.name,
                "family": best.family,
                **{f"model.{k}": v for k, v in best.params.items()},
                "families": ",".join(cfg.families),
                "search.method": cfg.search.method,
                "search.trials": cfg.search.trials,
                "search.metric": cfg.search.metric,
                "seed": cfg.seed,
                "imputation.numeric": cfg.imputation.numeric,
                "imputation.categorical": cfg.imputation.categorical,
                "split.holdout_days": dataset.split.holdout_days,
                "split.validation_share": dataset.split.validation_share,
                "final_fit": "train+validation",
                "baseline.kind": baseline.kind,
                "baseline.max_depth": baseline.max_depth,
                **({"baseline.feature": baseline.feature} if baseline.feature else {}),
            }
            metrics: dict[str, float] = {
                f"train.{result.metric}": best.train_metric,
                f"validation.{result.metric}": best.validation_metric,
                **{f"holdout.{k}": v for k, v in holdout_metrics.items()},
                **{f"baseline.holdout.{k}": v for k, v in baseline_metrics.items()},
                **_slice_metric_dict(slices),
                "search.trials": float(len(result.trials)),
                "search.workers": float(workers),
                **({"search.worker_peak_mb": worker_mb} if worker_mb is not None else {}),
                **{f"rows.{k}": float(v) for k, v in counts.items()},
            }
            _log_batch(client, run_id, metrics=metrics, params=params)

            with timer.stage("artifacts"):
                client.log_figure(run_id, training.plot_confusion_matrix(y_hold, s_hold), "plots/confusion_matrix.png")
                client.log_figure(run_id, training.plot_roc(y_hold, s_hold), "plots/roc.png")
                client.log_figure(run_id, training.plot_calibration(y_hold, s_hold), "plots/calibration.png")
                client.log_figure(run_id, training.plot_feature_importance(importance), "plots/feature_importance.png")
                client.log_dict(run_id, importance, "feature_importance.json")
                client.log_dict(run_id, split.summary(dataset), "split.json")
                client.log_dict(run_id, slices, "slice_metrics.json")
                client.log_dict(run_id, baseline.summary(), "baseline.json")
                trials_table = pd.DataFrame(
                    [
                        {
                            "number": t.number,
                            "family": t.family,
                            "params": json.dumps(t.params, default=str),
                            f"validation_{result.metric}": t.validation_metric,
                            f"train_{result.metric}": t.train_metric,
                            "fit_seconds": t.fit_seconds,
                        }
                        for t in result.trials
                    ]
                )
                client.log_text(run_id, trials_table.to_csv(index=False), "trials.csv")
                sample = _sample_predictions(pipeline, split, dataset, cfg.seed)
                client.log_text(run_id, sample.to_csv(index=False), "sample_predictions.csv")
        _log_batch(client, run_id, metrics=timer.as_metrics())
        client.update_run(run_id, name=f"train-{dataset.name}-{best.family}")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # never hide the training error behind a tracking error
            client.set_terminated(run_id, "FAILED")
        raise

    primary = cfg.search.metric
    log.info(
        "trained %s %s: holdout %s %.4f (baseline %s: %s), run %s, timings %s",
        best.family,
        best.params,
        primary,
        holdout_metrics.get(primary, float("nan")),
        baseline.description,
        baseline_metrics.get(primary),
        run_id,
        timer.as_metrics(),
    )
    return TrainOutcome(
        pipeline=pipeline,
        baseline=baseline,
        family=best.family,
        params=best.params,
        metric=primary,
        greater_is_better=result.greater_is_better,
        train_metric=best.train_metric,
        validation_metric=best.validation_metric,
        holdout_metric=holdout_metrics[primary],
        baseline_holdout_metric=baseline_metrics.get(primary),
        holdout_metrics=holdout_metrics,
        run_id=run_id,
        experiment_id=experiment_id,
        trials=len(result.trials),
        slice_metrics=slices,
        feature_importance=importance,
        timings=timer.as_metrics(),
    )


@task(name="split_training_set", task_run_name="split-{dataset.name}", cache_policy=NO_CACHE)
def split_training_set(frame: pd.DataFrame, dataset: DatasetDefinition, shuffle_labels: bool, seed: int) -> Split:
    """Split by time into train / validation / holdout; optionally sabotage the training labels."""
    split = training.split_by_time(frame, dataset)
    if not shuffle_labels:
        return split
    # Fault injection for demos and tests: only train+validation labels are permuted, the holdout stays
    # true, so the gates see the damage exactly as they would see a real bad model.
    run_logger("flywheel.train").warning("shuffle_labels=true: training on permuted labels (expect a rejection)")
    rng = np.random.default_rng(seed)
    shuffled = [part.assign(**{dataset.label: rng.permutation(part[dataset.label].to_numpy())})
                for part in (split.train, split.validation)]
    return dataclasses.replace(split, train=shuffled[0], validation=shuffled[1])
