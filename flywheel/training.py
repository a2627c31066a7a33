"""Training logic: time-based split, scikit-learn pipelines, hyper-parameter search, scoring, plots.

Pure functions over DataFrames and a DatasetDefinition; no Prefect and no MLflow here (tasks/train.py
does the tracking). Everything is deterministic given the data and the seed, so a model can be
retrained from its lineage and compared metric for metric.

Choices worth knowing:
- Split: the holdout is the last `holdout_days` *calendar days* (UTC) of the data; of the rest, the
  most recent `validation_share` of rows (cut at a timestamp, so equal timestamps never straddle) is
  the validation set. The holdout is never used for fitting or for model selection.
- Search: every trial fits on `train` and is scored on `validation`; the trials of one search share one
  preprocessing per kind (scaled for linear models, or not: `trial_inputs`), fitted on `train` once, since it
  does not depend on a trial's parameters. The search space is a mapping
  param -> list of candidate values for every method (for bayesian search each list is an optuna
  categorical choice; TPE still learns which values work). `grid` takes every combination in a stable
  order, thinned to `trials` evenly spaced combinations when the grid is larger; `random` samples
  `trials` distinct combinations with a generator seeded by (seed, family); `bayesian` runs optuna's
  TPESampler(seed) for `trials` trials per family (a repeated combination is scored once): the first
  `search.n_startup_trials` (max(1, trials // 3) unless `startup_trials` says) are drawn at random, TPE
  proposes the rest. Optuna's default of 10 start-up trials would leave a small budget all random.
- Final fit: the chosen configuration is refit on train + validation (more, and more recent, data for
  the model that will serve; the validation set has done its job once the configuration is chosen).
- Baseline (the `baseline` gate): a simple model of the kind configs/gates.yaml declares, refitted on the
  same split: `best_single_feature` (per feature, a depth-limited tree on that feature alone, fit on
  train, scored on validation; the best refit on train + validation) or `shallow_tree` (a depth-limited
  tree on every feature, fit on train + validation). Both use the candidate pipeline's preprocessing.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import KNNImputer, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from optuna.samplers import TPESampler

    from flywheel.schemas import BaselineRule, DatasetDefinition
    from flywheel.settings import ImputationConfig, TrainConfig

MISSING = "__missing__"
# OpenMP threads for fitting. On the 2-core machines, HistGradientBoosting on a few thousand rows fit
# 10-20x slower with default threads (spin-waiting against other processes) than with one thread.
FIT_THREADS = 1
METRICS = ("roc_auc", "average_precision", "log_loss", "f1")
LOWER_IS_BETTER = frozenset({"log_loss", "brier"})

# Used when a family has no entry in `train.search_space`. Sized with the serving latency budget in mind.
DEFAULT_SPACES: dict[str, dict[str, list[Any]]] = {
    "logistic_regression": {"C": [0.01, 0.1, 1.0, 10.0]},
    "hist_gradient_boosting": {
        "learning_rate": [0.05, 0.1],
        "max_iter": [50, 100, 200],
        "max_depth": [3, 5, None],
        "l2_regularization": [0.0, 1.0],
    },
    "random_forest": {
        "n_estimators": [50, 100],
        "max_depth": [6, 10, None],
        "min_samples_leaf": [1, 5, 20],
    },
}


# ------------------------------------------------------------------------------------------ split


@dataclass(frozen=True)
class Split:
    """Train / validation / holdout frames (sorted by time) and the timestamps that separate them."""

    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame
    start: pd.Timestamp  # first timestamp of the data
    validation_start: pd.Timestamp  # first timestamp of the validation set
    holdout_start: pd.Timestamp  # midnight UTC of the holdout's first day
    end: pd.Timestamp  # last timestamp of the data

    @property
    def train_validation(self) -> pd.DataFrame:
        return pd.concat([self.train, self.validation], ignore_index=True)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "holdout": len(self.holdout)}

    def summary(self, dataset: DatasetDefinition) -> dict[str, Any]:
        """JSON-ready boundaries, row counts and positive rates (what `split.json` holds)."""
        parts = {"train": self.train, "validation": self.validation, "holdout": self.holdout}
        return {
            "boundaries": {
                "start": self.start.isoformat(),
                "validation_start": self.validation_start.isoformat(),
                "holdout_start": self.holdout_start.isoformat(),
                "end": self.end.isoformat(),
            },
            "counts": self.counts(),
            "positive_rate": {k: round(float(labels(v, dataset).mean()), 6) for k, v in parts.items()},
            "policy": dataset.split.model_dump(),
        }


def labels(frame: pd.DataFrame, dataset: DatasetDefinition) -> pd.Series:
    """1 for the dataset's positive label, 0 otherwise."""
    return (frame[dataset.label] == dataset.positive_label).astype(int)


def _timestamps(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        raise FlywheelError(f"timestamp column {column!r} is missing; columns: {list(frame.columns)}")
    ts = frame[column]
    if not pd.api.types.is_datetime64_any_dtype(ts):
        ts = pd.to_datetime(ts, utc=True)
    elif getattr(ts.dt, "tz", None) is None:
        ts = ts.dt.tz_localize("UTC")  # the contract says UTC; naive stamps are read as UTC
    if ts.isna().any():
        raise FlywheelError(f"timestamp column {column!r} has {int(ts.isna().sum())} missing value(s)")
    return ts


def split_by_time(frame: pd.DataFrame, dataset: DatasetDefinition) -> Split:
    """Split a labelled frame by time: holdout = last `holdout_days` days, validation = the newest
    `validation_share` of the remaining rows, train = the rest. Raises if a part is empty or one-class."""
    if dataset.label not in frame.columns:
        raise FlywheelError(f"label column {dataset.label!r} is missing; columns: {list(frame.columns)}")
    ts = _timestamps(frame, dataset.timestamp)
    order = [dataset.timestamp, dataset.entity] if dataset.entity in frame.columns else [dataset.timestamp]
    df = frame.assign(**{dataset.timestamp: ts}).sort_values(order, kind="mergesort").reset_index(drop=True)
    if df.empty:
        raise FlywheelError("cannot split an empty frame: no labelled rows")
    ts = df[dataset.timestamp]
    start, end = ts.iloc[0], ts.iloc[-1]
    holdout_start = end.normalize() - pd.Timedelta(days=dataset.split.holdout_days - 1)
    rest = df[ts < holdout_start]
    holdout = df[ts >= holdout_start]
    if rest.empty:
        raise FlywheelError(
            f"no rows before the holdout: the data spans {start} .. {end}, the holdout starts at "
            f"{holdout_start} (holdout_days={dataset.split.holdout_days}); holdout has {len(holdout)} rows"
        )
    cut = min(int(np.ceil(len(rest) * (1 - dataset.split.validation_share))), len(rest) - 1)
    validation_start = rest[dataset.timestamp].iloc[cut]
    train = rest[rest[dataset.timestamp] < validation_start].reset_index(drop=True)
    validation = rest[rest[dataset.timestamp] >= validation_start].reset_index(drop=True)
    split = Split(
        train=train,
        validation=validation,
        holdout=holdout.reset_index(drop=True),
        start=start,
        validation_start=validation_start,
        holdout_start=holdout_start,
        end=end,
    )
    problems = []
    for name, part in (("train", split.train), ("validation", split.validation), ("holdout", split.holdout)):
        y = labels(part, dataset)
        if part.empty:
            problems.append(f"{name} is empty")
        elif y.nunique() < 2:
            problems.append(f"{name} has a single class ({int(y.sum())} positive of {len(part)} rows)")
    if problems:
        raise FlywheelError(
            f"time split of {len(df)} rows ({start} .. {end}) is unusable: {'; '.join(problems)}; "
            f"counts {split.counts()}; holdout from {holdout_start}, validation from {validation_start}"
        )
    return split


def search_part(split: Split, dataset: DatasetDefinition) -> Split:
    """What a search trial reads of the split: train and validation, feature and label columns; no holdout rows.
    The fan-out ships this to its workers (at 1M rows: half the bytes of the whole split)."""
    columns = [*dataset.feature_names, dataset.label]
    return replace(split, train=split.train[columns], validation=split.validation[columns],
                   holdout=split.holdout.iloc[:0][columns])


# -------------------------------------------------------------------------------------- pipelines


def _estimator(family: str, params: dict[str, Any], seed: int) -> Any:
    if family == "logistic_regression":
        est: Any = LogisticRegression(max_iter=1000, random_state=seed)
    elif family == "hist_gradient_boosting":
        est = HistGradientBoostingClassifier(random_state=seed)
    elif family == "random_forest":
        est = RandomForestClassifier(n_jobs=1, random_state=seed)
    else:
        raise FlywheelError(f"unknown model family {family!r}; one of {sorted(DEFAULT_SPACES)}")
    unknown = sorted(set(params) - set(est.get_params()))
    if unknown:
        raise FlywheelError(f"{family} has no parameter(s) {unknown}; check train.search_space.{family}")
    return est.set_params(**params)


def _features(dataset: DatasetDefinition, imputation: ImputationConfig, scale: bool) -> ColumnTransformer:
    transformers: list[tuple[str, Any, list[str]]] = []
    if dataset.numeric_features:
        imputer: Any = (
            KNNImputer(n_neighbors=5) if imputation.numeric == "knn" else SimpleImputer(strategy=imputation.numeric)
        )
        steps: list[tuple[str, Any]] = [("impute", imputer)]
        if scale:
            steps.append(("scale", StandardScaler()))
        transformers.append(("numeric", Pipeline(steps), dataset.numeric_features))
    if dataset.categorical_features:
        # sklearn treats None as a value (not as missing) in object columns: map NaN and None to one
        # marker first, then impute the marker or keep it as its own category.
        cat_steps: list[tuple[str, Any]] = [
            ("nan", SimpleImputer(missing_values=np.nan, strategy="constant", fill_value=MISSING)),
            ("none", SimpleImputer(missing_values=None, strategy="constant", fill_value=MISSING)),
        ]
        if imputation.categorical == "most_frequent":
            cat_steps.append(("impute", SimpleImputer(missing_values=MISSING, strategy="most_frequent")))
        # dense output: one-row predictions are faster without sparse matrices
        cat_steps.append(("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)))
        transformers.append(("categorical", Pipeline(cat_steps), dataset.categorical_features))
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)


def build_pipeline(
    family: str,
    params: dict[str, Any],
    dataset: DatasetDefinition,
    imputation: ImputationConfig,
    seed: int,
) -> Pipeline:
    """Preprocessing (imputation, scaling for linear models, one-hot) + the family's estimator,
    taking the raw feature columns `dataset.feature_names`."""
    est = _estimator(family, params, seed)
    features = _features(dataset, imputation, scale=scaled(family))
    return Pipeline([("features", features), ("model", est)])


def build_baseline(dataset: DatasetDefinition) -> Pipeline:
    """A prior-only model taking the same columns: what 'no skill' scores. Not the `baseline` gate's
    model (that is `fit_baseline`'s); tests use it as a trivially simple model of another layout."""
    select = ColumnTransformer([("features", "passthrough", dataset.feature_names)], remainder="drop")
    return Pipeline([("features", select), ("model", DummyClassifier(strategy="prior"))])


def fit(pipeline: Pipeline, frame: pd.DataFrame, dataset: DatasetDefinition) -> Pipeline:
    """Fit on the frame's feature columns and 0/1 labels (OpenMP limited to FIT_THREADS)."""
    missing = [c for c in dataset.feature_names if c not in frame.columns]
    if missing:
        raise FlywheelError(f"training frame lacks feature column(s) {missing}")
    y = labels(frame, dataset)
    if y.nunique() < 2:
        raise FlywheelError(f"cannot fit on a single class: {int(y.sum())} positive of {len(y)} rows")
    with threadpool_limits(limits=FIT_THREADS, user_api="openmp"):
        return pipeline.fit(frame[dataset.feature_names], y)


# ---------------------------------------------------------------------------------------- scoring


def predict_scores(pipeline: Pipeline, frame: pd.DataFrame, dataset: DatasetDefinition) -> np.ndarray:
    """Probability of the positive class for each row."""
    return _positive_scores(pipeline, frame[dataset.feature_names])


def _positive_scores(model: Any, x: Any) -> np.ndarray:
    """A fitted classifier's probability of class 1 for each row of `x` (zeros when it never saw a 1)."""
    proba = model.predict_proba(x)
    classes = list(model.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(x))


def metric_value(metric: str, y_true: np.ndarray | pd.Series, y_score: np.ndarray) -> float:
    """One metric from labels and positive-class probabilities (f1 and accuracy at 0.5)."""
    from sklearn import metrics as m

    y_true = np.asarray(y_true)
    if metric in ("roc_auc", "average_precision") and len(np.unique(y_true)) < 2:
        raise FlywheelError(f"{metric} needs both classes; got {len(y_true)} rows of one class")
    if metric == "roc_auc":
        return float(m.roc_auc_score(y_true, y_score))
    if metric == "average_precision":
        return float(m.average_precision_score(y_true, y_score))
    if metric == "log_loss":
        return float(m.log_loss(y_true, np.clip(y_score, 1e-15, 1 - 1e-15), labels=[0, 1]))
    if metric == "brier":
        return float(m.brier_score_loss(y_true, y_score, pos_label=1))
    if metric == "f1":
        return float(m.f1_score(y_true, (y_score >= 0.5).astype(int), zero_division=0.0))
    if metric == "accuracy":
        return float(m.accuracy_score(y_true, (y_score >= 0.5).astype(int)))
    raise FlywheelError(f"unknown metric {metric!r}; one of {[*METRICS, 'brier', 'accuracy']}")


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def score(pipeline: Pipeline, frame: pd.DataFrame, dataset: DatasetDefinition, metric: str) -> float:
    """`metric` of a fitted pipeline on a labelled frame."""
    return metric_value(metric, labels(frame, dataset), predict_scores(pipeline, frame, dataset))


def overall_metrics(pipeline: Pipeline, frame: pd.DataFrame, dataset: DatasetDefinition) -> dict[str, float]:
    """Every metric we report (ranking metrics only when both classes are present)."""
    y, s = labels(frame, dataset).to_numpy(), predict_scores(pipeline, frame, dataset)
    names = ["log_loss", "brier", "accuracy", "f1"]
    if len(np.unique(y)) == 2:
        names = ["roc_auc", "average_precision", *names]
    return {n: metric_value(n, y, s) for n in names}


def slice_metrics(
    pipeline: Pipeline, frame: pd.DataFrame, dataset: DatasetDefinition
) -> dict[str, dict[str, float | None]]:
    """Per `<slice column>=<value>`: rows, roc_auc (None for a one-class slice), positive_rate (observed),
    predicted_positive_rate (score >= 0.5) and mean_score. Missing values form their own slice."""
    y, s = labels(frame, dataset).to_numpy(), predict_scores(pipeline, frame, dataset)
    out: dict[str, dict[str, float | None]] = {}
    for col in dataset.slices:
        if col not in frame.columns:
            raise FlywheelError(f"slice column {col!r} is missing from the frame")
        values = frame[col].astype(object).where(frame[col].notna(), MISSING).astype(str).to_numpy()
        for value in sorted(set(values)):
            mask = values == value
            ys, ss = y[mask], s[mask]
            out[f"{col}={value}"] = {
                "rows": float(mask.sum()),
                "roc_auc": metric_value("roc_auc", ys, ss) if len(np.unique(ys)) == 2 else None,
                "positive_rate": float(ys.mean()),
                "predicted_positive_rate": float((ss >= 0.5).mean()),
                "mean_score": float(ss.mean()),
            }
    return out


def feature_importance(
    pipeline: Pipeline,
    frame: pd.DataFrame,
    dataset: DatasetDefinition,
    seed: int,
    max_rows: int = 2000,
    repeats: int = 3,
) -> dict[str, float]:
    """Permutation importance of each RAW input feature (drop in roc_auc, or in -log_loss for a one-class
    frame) on a seeded sample of at most `max_rows` rows; sorted, most important first."""
    from sklearn.inspection import permutation_importance

    sample = frame.sample(n=max_rows, random_state=seed) if len(frame) > max_rows else frame
    y = labels(sample, dataset)
    scoring = "roc_auc" if y.nunique() == 2 else "neg_log_loss"
    with threadpool_limits(limits=FIT_THREADS, user_api="openmp"):
        result = permutation_importance(
            pipeline,
            sample[dataset.feature_names],
            y,
            scoring=scoring,
            n_repeats=repeats,
            random_state=seed,
            n_jobs=1,
        )
    pairs = zip(dataset.feature_names, result.importances_mean, strict=True)
    return {k: round(float(v), 6) for k, v in sorted(pairs, key=lambda kv: (-kv[1], kv[0]))}


# ----------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Trial:
    family: str
    params: dict[str, Any]
    validation_metric: float
    train_metric: float
    fit_seconds: float
    number: int = 0  # 0-based position in the search


@dataclass(frozen=True)
class SearchResult:
    method: str
    metric: str
    greater_is_better: bool
    trials: list[Trial]
    best: Trial
    budget: dict[str, int] = field(default_factory=dict)  # family -> trials run


TrialCallback = Callable[[int, int, Trial], None]  # (1-based index, planned total, trial)


def search_space(cfg: TrainConfig, family: str) -> dict[str, list[Any]]:
    space = cfg.search_space.get(family) or DEFAULT_SPACES.get(family)
    if space is None:
        raise FlywheelError(f"no search space for family {family!r}")
    for name, values in space.items():
        if not isinstance(values, list) or not values:
            raise FlywheelError(f"train.search_space.{family}.{name} must be a non-empty list of values")
    return {k: space[k] for k in sorted(space)}


def grid_combinations(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(space[n] for n in names))]


def _family_seed(seed: int, family: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(family.encode())) % (2**32)


def _planned(method: str, space: dict[str, list[Any]], trials: int) -> list[dict[str, Any]] | None:
    """The combinations grid and random search will try (None for bayesian: chosen as it goes)."""
    combos = grid_combinations(space)
    if method == "grid":
        if len(combos) <= trials:
            return combos
        # evenly spaced through the ordered grid, so a thinned grid still spans every parameter's range
        idx = np.unique(np.linspace(0, len(combos) - 1, trials).round().astype(int))
        return [combos[i] for i in idx]
    if method == "random":
        return combos  # sampled by the caller with the family's seed
    return None


TrialMapper = Callable[[list[tuple[str, dict[str, Any]]]], list[Trial]]  # configurations -> trials, in order


@dataclass(frozen=True)
class TrialInputs:
    """One preprocessing of a split for the search: fitted on train, applied to train and validation."""

    x_train: np.ndarray
    x_validation: np.ndarray
    y_train: np.ndarray
    y_validation: np.ndarray


# Per process: a serial search's trials share their preprocessing (it does not depend on the trial's parameters),
# fitted once per split and kind (scaled for linear models, or not) instead of once per trial. The search drops
# its entries when it ends (`forget_trial_inputs`); entries of a split that is gone leave with its frames
# (weakref.finalize), so a reused id never finds a stale entry; the lock keeps threads from computing one twice.
_TRIAL_INPUTS: dict[tuple[Any, ...], TrialInputs] = {}
_TRIAL_INPUTS_LOCK = threading.Lock()


def scaled(family: str) -> bool:
    """Whether the family's preprocessing scales the numeric features (linear models do)."""
    return family == "logistic_regression"


def prepare_inputs(
    split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, scale: bool,
) -> TrialInputs:
    """The split's train and validation sets through the trials' preprocessing (`scale`d or not), fitted on train.

    Measured at 1M rows (README "Benchmarks"): the preprocessing was 28% of a trial serially, and the part that
    slowed most when two trials ran at once (+36%, against +6% for the estimators' fits): trials share it."""
    features = _features(dataset, imputation, scale=scale)
    y_train = labels(split.train, dataset).to_numpy()
    with threadpool_limits(limits=FIT_THREADS):
        x_train = features.fit_transform(split.train[dataset.feature_names], y_train)
        x_validation = features.transform(split.validation[dataset.feature_names])
    return TrialInputs(x_train=x_train, x_validation=x_validation, y_train=y_train,
                       y_validation=labels(split.validation, dataset).to_numpy())


def _frames_id(split: Split) -> tuple[int, int]:
    """The split's train and validation frames by identity: what `trial_inputs` keys its entries by."""
    return id(split.train), id(split.validation)


def trial_inputs(
    split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, scale: bool,
) -> TrialInputs:
    """`prepare_inputs`, once per split and kind in this process (the serial search's trials share it)."""
    key = (*_frames_id(split), dataset.model_dump_json(), imputation.model_dump_json(), scale)
    with _TRIAL_INPUTS_LOCK:
        hit = _TRIAL_INPUTS.get(key)
        if hit is None:
            hit = _TRIAL_INPUTS[key] = prepare_inputs(split, dataset, imputation, scale)
            for frame in (split.train, split.validation):  # an id is reused only after its frame is gone
                weakref.finalize(frame, _TRIAL_INPUTS.pop, key, None)
        return hit


def forget_trial_inputs(split: Split) -> None:
    """Drop this process's `trial_inputs` of the split (every kind, every imputation)."""
    with _TRIAL_INPUTS_LOCK:
        for key in [k for k in _TRIAL_INPUTS if k[:2] == _frames_id(split)]:
            del _TRIAL_INPUTS[key]


def evaluate_trial(
    split: Split, dataset: DatasetDefinition, imputation: ImputationConfig, seed: int, metric: str,
    family: str, params: dict[str, Any],
) -> Trial:
    """One search trial on the split (its preprocessing shared through `trial_inputs`): `score_trial`. The same
    model and scores as fitting `build_pipeline`'s pipeline on train: its preprocessing does not depend on the
    trial."""
    _estimator(family, params, seed)  # unknown parameters fail here, before any preprocessing
    return score_trial(trial_inputs(split, dataset, imputation, scaled(family)), seed, metric, family, params)


def score_trial(inputs: TrialInputs, seed: int, metric: str, family: str, params: dict[str, Any]) -> Trial:
    """The family's estimator fit on the preprocessed train set, scored on train and validation, on FIT_THREADS
    thread(s): OpenMP and BLAS both (a serial trial would otherwise get BLAS threads a Dask worker's trial does
    not). A module-level function, so a Dask worker can run it (tasks/fanout.py: fit_trial). `fit_seconds` is
    the estimator's fit."""
    est = _estimator(family, params, seed)
    with threadpool_limits(limits=FIT_THREADS):
        start = time.perf_counter()
        est.fit(inputs.x_train, inputs.y_train)
        secs = time.perf_counter() - start
        return Trial(
            family=family,
            params=dict(params),
            validation_metric=metric_value(metric, inputs.y_validation, _positive_scores(est, inputs.x_validation)),
            train_metric=metric_value(metric, inputs.y_train, _positive_scores(est, inputs.x_train)),
            fit_seconds=round(secs, 4),
        )


def search_candidates(
    split: Split,
    dataset: DatasetDefinition,
    cfg: TrainConfig,
    on_trial: TrialCallback | None = None,
    map_trials: TrialMapper | None = None,
    batch: int = 1,
) -> SearchResult:
    """Try `cfg.search.trials` configurations per family (fit on train, score on validation); pick the best
    by `cfg.search.metric` (log_loss: lowest). Deterministic given the data and `cfg.seed`.

    `map_trials` evaluates a list of configurations (default: one after another, here); given a parallel one
    (tasks/train.py fans them out on Dask), grid and random search hand it every planned configuration at
    once, and a Bayesian search `batch` proposals at a time. Trials are numbered, reported (`on_trial`) and
    compared in plan order either way, so grid and random search pick the same model serial or parallel."""
    method, trials, metric = cfg.search.method, cfg.search.trials, cfg.search.metric
    higher = greater_is_better(metric)

    plans: dict[str, list[dict[str, Any]] | None] = {}
    for family in cfg.families:
        space = search_space(cfg, family)
        plan = _planned(method, space, trials)
        if method == "random" and plan is not None:
            rng = np.random.default_rng(_family_seed(cfg.seed, family))
            pick = rng.choice(len(plan), size=min(trials, len(plan)), replace=False)
            plan = [plan[i] for i in pick]
        plans[family] = plan
    total = sum(len(p) if p is not None else trials for p in plans.values())

    def serial(configs: list[tuple[str, dict[str, Any]]]) -> list[Trial]:
        return [evaluate_trial(split, dataset, cfg.imputation, cfg.seed, metric, f, p) for f, p in configs]

    evaluate = map_trials or serial
    results: list[Trial] = []
    cache: dict[tuple[str, str], Trial] = {}

    def run_many(configs: list[tuple[str, dict[str, Any]]]) -> list[Trial]:
        keys = [(family, repr(sorted(params.items()))) for family, params in configs]
        # optuna may propose a combination twice: same data, same seed, same score (fit once)
        todo = {k: c for k, c in zip(keys, configs, strict=True) if k not in cache}
        cache.update(zip(todo, evaluate(list(todo.values())), strict=True))
        out = []
        for key, (_, params) in zip(keys, configs, strict=True):
            t = replace(cache[key], params=dict(params), number=len(results))
            results.append(t)
            if on_trial is not None:
                on_trial(len(results), total, t)
            out.append(t)
        return out

    budget: dict[str, int] = {}
    try:
        if all(plan is not None for plan in plans.values()):  # grid / random: the whole plan in one map
            run_many([(family, params) for family, plan in plans.items() for params in plan or []])
            budget = {family: len(plan or []) for family, plan in plans.items()}
        else:
            for family, plan in plans.items():
                before = len(results)
                if plan is not None:
                    run_many([(family, params) for params in plan])
                else:
                    sampler = tpe_sampler(_family_seed(cfg.seed, family), cfg.search.n_startup_trials,
                                          constant_liar=batch > 1)
                    _optuna_search(family, search_space(cfg, family), trials, sampler, higher, run_many, batch)
                budget[family] = len(results) - before
    finally:
        forget_trial_inputs(split)  # the preprocessed matrices serve this search only: freed now, not with the split

    if not results:
        raise FlywheelError("the search ran no trials: train.families is empty")
    best = results[0]
    for t in results[1:]:  # strict comparison: ties keep the earlier trial (deterministic)
        if (t.validation_metric > best.validation_metric) if higher else (t.validation_metric < best.validation_metric):
            best = t
    return SearchResult(
        method=method, metric=metric, greater_is_better=higher, trials=results, best=best, budget=budget
    )


def _optuna_search(
    family: str,
    space: dict[str, list[Any]],
    trials: int,
    sampler: TPESampler,
    higher: bool,
    run_many: Callable[[list[tuple[str, dict[str, Any]]]], list[Trial]],
    batch: int = 1,
) -> None:
    """Ask TPE for `batch` proposals, evaluate them together, tell the scores in order; repeat. With batch 1
    this is `study.optimize` (the same proposals for the same seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if higher else "minimize", sampler=sampler)
    done = 0
    while done < trials:
        asked = [study.ask() for _ in range(min(batch, trials - done))]
        proposals = [{name: t.suggest_categorical(name, values) for name, values in space.items()} for t in asked]
        for t, result in zip(asked, run_many([(family, p) for p in proposals]), strict=True):
            study.tell(t, result.validation_metric)
        done += len(asked)


def tpe_sampler(seed: int, n_startup_trials: int, constant_liar: bool = False) -> TPESampler:
    """Optuna's TPE sampler: `n_startup_trials` random trials, then trials proposed by its model.
    `constant_liar` (parallel batches): proposals of one batch count each other as bad, so they spread out."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=constant_liar)


def fit_final(
    split: Split,
    dataset: DatasetDefinition,
    family: str,
    params: dict[str, Any],
    imputation: ImputationConfig,
    seed: int,
) -> Pipeline:
    """Refit the chosen configuration on train + validation (never the holdout)."""
    return fit(build_pipeline(family, params, dataset, imputation, seed), split.train_validation, dataset)


# --------------------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class Baseline:
    """The `baseline` gate's model, fitted on train + validation like the candidate. `pipeline` takes the
    raw feature columns (a best_single_feature pipeline reads only `feature` of them)."""

    kind: Literal["best_single_feature", "shallow_tree"]
    pipeline: Pipeline
    metric: str  # the metric the feature was chosen by (the gates' primary metric)
    feature: str | None = None  # best_single_feature: the chosen feature
    validation_scores: dict[str, float] = field(default_factory=dict)  # best_single_feature: feature -> metric

    @property
    def max_depth(self) -> int:
        return int(self.pipeline.named_steps["model"].max_depth)

    @property
    def description(self) -> str:
        """What the baseline is, for the gate report: kind, tree depth and, for best_single_feature, the feature."""
        if self.feature is None:
            return f"{self.kind} (depth-{self.max_depth} tree on every feature)"
        return (
            f"{self.kind} {self.feature!r} (depth-{self.max_depth} tree on that feature alone; validation "
            f"{self.metric} {self.validation_scores[self.feature]:.4f}, best of {len(self.validation_scores)} features)"
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what `baseline.json` in the training run holds."""
        return {
            "kind": self.kind,
            "max_depth": self.max_depth,
            "feature": self.feature,
            "metric": self.metric,
            "validation_scores": self.validation_scores,
        }


def _tree_pipeline(dataset: DatasetDefinition, imputation: ImputationConfig, max_depth: int, seed: int) -> Pipeline:
    """The candidate pipeline's imputation and one-hot over `dataset`'s features, then a depth-limited tree."""
    tree = DecisionTreeClassifier(max_depth=max_depth, random_state=seed)
    return Pipeline([("features", _features(dataset, imputation, scale=False)), ("model", tree)])


def single_feature_pipeline(
    dataset: DatasetDefinition, feature: str, imputation: ImputationConfig, max_depth: int, seed: int
) -> Pipeline:
    """A depth-limited tree on `feature` alone (its imputation / one-hot as in the candidate's pipeline);
    it takes the raw feature columns and reads only that one."""
    only = dataset.model_copy(update={"features": [f for f in dataset.features if f.name == feature]})
    return _tree_pipeline(only, imputation, max_depth, seed)


def best_single_feature(
    split: Split, dataset: DatasetDefinition, metric: str, imputation: ImputationConfig, max_depth: int, seed: int
) -> dict[str, float]:
    """Each feature's one-feature tree, fit on train, scored on validation: feature -> `metric`, best first
    (ties keep the dataset's feature order)."""
    scores = {
        f: score(fit(single_feature_pipeline(dataset, f, imputation, max_depth, seed), split.train, dataset),
                 split.validation, dataset, metric)
        for f in dataset.feature_names
    }  # fmt: skip
    sign = 1.0 if greater_is_better(metric) else -1.0
    return dict(sorted(scores.items(), key=lambda kv: -sign * kv[1]))


def fit_baseline(
    split: Split,
    dataset: DatasetDefinition,
    rule: BaselineRule,
    metric: str,
    imputation: ImputationConfig,
    seed: int,
) -> Baseline:
    """The baseline `rule` declares, refitted on train + validation (never the holdout)."""
    if rule.kind == "shallow_tree":
        pipe = fit(_tree_pipeline(dataset, imputation, rule.max_depth, seed), split.train_validation, dataset)
        return Baseline(kind=rule.kind, pipeline=pipe, metric=metric)
    scores = best_single_feature(split, dataset, metric, imputation, rule.max_depth, seed)
    feature = next(iter(scores))
    pipe = single_feature_pipeline(dataset, feature, imputation, rule.max_depth, seed)
    pipe = fit(pipe, split.train_validation, dataset)
    return Baseline(kind=rule.kind, pipeline=pipe, metric=metric, feature=feature, validation_scores=scores)


# ------------------------------------------------------------------------------------------ plots


def _figure(width: float = 5.0, height: float = 4.0) -> tuple[Figure, Any]:
    # Figure objects directly (not pyplot): no global state, no GUI backend, nothing to close
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def plot_confusion_matrix(y_true: Sequence[int] | np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> Figure:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(np.asarray(y_true), (np.asarray(y_score) >= threshold).astype(int), labels=[0, 1])
    fig, ax = _figure(4.2, 3.8)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_yticks([0, 1], ["negative", "positive"])
    ax.set_xlabel(f"predicted (threshold {threshold})")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix")
    return fig


def plot_roc(y_true: Sequence[int] | np.ndarray, y_score: np.ndarray) -> Figure:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true), y_score)
    fig, ax = _figure()
    ax.plot(fpr, tpr, label=f"model (AUC {roc_auc_score(y_true, y_score):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    return fig


def plot_calibration(y_true: Sequence[int] | np.ndarray, y_score: np.ndarray, bins: int = 10) -> Figure:
    from sklearn.calibration import calibration_curve

    frac_pos, mean_pred = calibration_curve(np.asarray(y_true), y_score, n_bins=bins, strategy="uniform")
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(mean_pred, frac_pos, marker="o", label="model")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title("Calibration (reliability) curve")
    ax.legend(loc="upper left")
    return fig


def plot_feature_importance(importance: dict[str, float], top: int = 20) -> Figure:
    items = sorted(importance.items(), key=lambda kv: -kv[1])[:top][::-1]
    fig, ax = _figure(6.0, max(2.5, 0.35 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("permutation importance (metric drop)")
    ax.set_title("Feature importance")
    return fig
