"""Training logic: time split, pipelines, search determinism and budget, scoring, lineage helpers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel import training
from flywheel.errors import FlywheelError
from flywheel.lineage import StageTimer, frame_hash, git_sha, hardware
from flywheel.schemas import BestSingleFeatureBaseline, ShallowTreeBaseline
from flywheel.settings import ImputationConfig, SearchConfig, TrainConfig

FAMILIES = ["logistic_regression", "hist_gradient_boosting", "random_forest"]


@pytest.fixture(scope="module")
def frame(small_batches: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(small_batches, ignore_index=True)


@pytest.fixture
def split(frame: pd.DataFrame, dataset) -> training.Split:
    return training.split_by_time(frame, dataset)


def tiny(dataset, days: int, per_day: int = 4, positive_every: int = 2) -> pd.DataFrame:
    """`days` days of `per_day` rows; every `positive_every`-th row positive."""
    n = days * per_day
    ts = pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(np.arange(n) * (24 // per_day), unit="h")
    rng = np.random.default_rng(0)
    df = pd.DataFrame({dataset.entity: np.arange(n), dataset.timestamp: ts})
    df[dataset.label] = np.where(np.arange(n) % positive_every == 0, dataset.positive_label, "no")
    for f in dataset.features:
        df[f.name] = rng.integers(0, 5, n) if f.is_numeric else rng.choice(f.allowed or ["a", "b"], n)
    for c in dataset.context_columns:
        df[c] = "x"
    return df.sample(frac=1.0, random_state=1)  # shuffled: the split must sort by time


def cfg(
    method: str, trials: int, metric: str = "roc_auc", seed: int = 3, startup_trials: int | None = None, **kw
) -> TrainConfig:
    search = SearchConfig(method=method, trials=trials, metric=metric, startup_trials=startup_trials)
    return TrainConfig(seed=seed, search=search, **kw)


# ------------------------------------------------------------------------------------------ split


def test_split_boundaries_and_ordering(dataset) -> None:
    df = tiny(dataset, days=10)
    s = training.split_by_time(df, dataset)
    # the last 7 calendar days are the holdout; the newest 20% (2.4 -> 2) of the other 12 rows validate
    assert s.holdout_start == pd.Timestamp("2026-03-04", tz="UTC")
    assert s.counts() == {"train": 10, "validation": 2, "holdout": 28}
    for part in (s.train, s.validation, s.holdout):
        assert part[dataset.timestamp].is_monotonic_increasing
    assert s.train[dataset.timestamp].max() < s.validation_start <= s.validation[dataset.timestamp].min()
    assert s.validation[dataset.timestamp].max() < s.holdout_start <= s.holdout[dataset.timestamp].min()
    assert (s.start, s.end) == (df[dataset.timestamp].min(), df[dataset.timestamp].max())
    summary = s.summary(dataset)
    assert summary["counts"] == s.counts() and summary["boundaries"]["holdout_start"].startswith("2026-03-04")


def test_split_keeps_equal_timestamps_together(dataset) -> None:
    df = tiny(dataset, days=10)
    df[dataset.timestamp] = df[dataset.timestamp].dt.floor("D")  # 4 rows share each timestamp
    s = training.split_by_time(df, dataset)
    assert set(s.train[dataset.timestamp]).isdisjoint(s.validation[dataset.timestamp])
    assert len(s.train) % 4 == 0 and len(s.validation) % 4 == 0


def test_split_errors_name_the_empty_part(dataset) -> None:
    with pytest.raises(FlywheelError, match="no rows before the holdout"):
        training.split_by_time(tiny(dataset, days=7), dataset)
    with pytest.raises(FlywheelError, match=r"validation has a single class.*counts"):
        one_class = tiny(dataset, days=10, per_day=4)
        late = one_class[dataset.timestamp] >= pd.Timestamp("2026-03-03", tz="UTC")
        one_class.loc[late, dataset.label] = "no"
        one_class.loc[late & (one_class[dataset.entity] >= 36), dataset.label] = dataset.positive_label
        training.split_by_time(one_class, dataset)
    with pytest.raises(FlywheelError, match="empty frame"):
        training.split_by_time(tiny(dataset, days=10).iloc[:0], dataset)


# -------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "imputation",
    [ImputationConfig(), ImputationConfig(numeric="knn", categorical="missing_category")],
    ids=["median-most_frequent", "knn-missing_category"],
)
def test_pipeline_handles_missing_values_and_one_row(family, imputation, split, dataset) -> None:
    train = split.train.copy()
    train.loc[train.index[:40], "monthly_charges"] = np.nan
    train.loc[train.index[40:80], "contract_type"] = None
    train.loc[train.index[80:120], "region"] = np.nan
    params = {"n_estimators": 20} if family == "random_forest" else {}
    pipe = training.fit(training.build_pipeline(family, params, dataset, imputation, seed=1), train, dataset)
    # serving sends one row; any feature may be None, including all of them, and unseen categories
    rows = [
        {c: None for c in dataset.feature_names},
        {**split.holdout[dataset.feature_names].iloc[0].to_dict(), "tenure_months": None, "segment": None},
        {**split.holdout[dataset.feature_names].iloc[1].to_dict(), "region": "mars", "payment_method": np.nan},
    ]
    for row in rows:
        p = pipe.predict_proba(pd.DataFrame([row]))
        assert p.shape == (1, 2) and np.isfinite(p).all() and 0 <= p[0, 1] <= 1
    assert 0.6 < training.score(pipe, split.validation, dataset, "roc_auc") <= 1


def test_pipeline_is_plain_sklearn_and_seeded(dataset) -> None:
    pipe = training.build_pipeline("random_forest", {"max_depth": 4}, dataset, ImputationConfig(), seed=9)
    assert pipe.named_steps["model"].random_state == 9 and pipe.named_steps["model"].n_jobs == 1
    assert pipe.named_steps["model"].max_depth == 4
    modules = {type(o).__module__.split(".")[0] for o in _walk(pipe)}
    assert modules == {"sklearn"}
    with pytest.raises(FlywheelError, match="no parameter"):
        training.build_pipeline("logistic_regression", {"depth": 3}, dataset, ImputationConfig(), seed=1)
    with pytest.raises(FlywheelError, match="unknown model family"):
        training.build_pipeline("svm", {}, dataset, ImputationConfig(), seed=1)


def _walk(est):
    yield est
    for step in getattr(est, "steps", []):
        yield from _walk(step[1])
    for t in getattr(est, "transformers", []):
        if not isinstance(t[1], str):
            yield from _walk(t[1])


def test_prior_only_model_scores_the_prior(split, dataset) -> None:
    base = training.fit(training.build_baseline(dataset), split.train_validation, dataset)
    s = training.predict_scores(base, split.holdout, dataset)
    prior = training.labels(split.train_validation, dataset).mean()
    assert np.allclose(s, prior)
    assert training.score(base, split.holdout, dataset, "roc_auc") == pytest.approx(0.5)
    assert base.predict_proba(pd.DataFrame([{c: None for c in dataset.feature_names}])).shape == (1, 2)


# --------------------------------------------------------------------------------------- baseline


def test_best_single_feature_baseline_picks_on_validation_and_refits_on_train_validation(split, dataset) -> None:
    rule = BestSingleFeatureBaseline(kind="best_single_feature", max_depth=3)
    base = training.fit_baseline(split, dataset, rule, "roc_auc", ImputationConfig(), seed=1)
    # every feature got its one-feature tree, scored on validation; the best one won
    assert list(base.validation_scores) == sorted(dataset.feature_names, key=lambda f: -base.validation_scores[f])
    assert base.feature == next(iter(base.validation_scores))
    one_feature = training.single_feature_pipeline(dataset, base.feature, ImputationConfig(), 3, seed=1)
    chosen = training.fit(one_feature, split.train, dataset)
    best_score = base.validation_scores[base.feature]
    assert training.score(chosen, split.validation, dataset, "roc_auc") == pytest.approx(best_score)
    # it reads its feature alone: scrambling every other column changes nothing
    holdout = split.holdout
    others = [c for c in dataset.feature_names if c != base.feature]
    scrambled = holdout.assign(**{c: holdout[c].sample(frac=1.0, random_state=0).to_numpy() for c in others})
    scores = training.predict_scores(base.pipeline, holdout, dataset)
    assert np.array_equal(scores, training.predict_scores(base.pipeline, scrambled, dataset))
    # refit on train + validation, never the holdout; a real model, far from the prior's 0.5
    assert base.pipeline.named_steps["model"].get_depth() <= 3
    assert base.pipeline.named_steps["model"].tree_.n_node_samples[0] == len(split.train_validation)
    assert 0.6 < training.score(base.pipeline, holdout, dataset, "roc_auc") < 0.8
    assert base.summary()["feature"] == base.feature and base.max_depth == 3
    assert base.pipeline.predict_proba(pd.DataFrame([{c: None for c in dataset.feature_names}])).shape == (1, 2)
    again = training.fit_baseline(split, dataset, rule, "roc_auc", ImputationConfig(), seed=1)
    assert again.validation_scores == base.validation_scores


def test_best_single_feature_baseline_uses_the_metric_it_is_given(split, dataset) -> None:
    rule = BestSingleFeatureBaseline(kind="best_single_feature")
    base = training.fit_baseline(split, dataset, rule, "average_precision", ImputationConfig(), seed=1)
    assert base.metric == "average_precision"
    one_feature = training.single_feature_pipeline(dataset, base.feature, ImputationConfig(), 3, seed=1)
    chosen = training.fit(one_feature, split.train, dataset)
    ap = training.score(chosen, split.validation, dataset, "average_precision")
    assert base.validation_scores[base.feature] == pytest.approx(ap) == max(base.validation_scores.values())
    assert f"validation average_precision {ap:.4f}" in base.description


def test_shallow_tree_baseline_uses_every_feature_through_the_pipeline_preprocessing(split, dataset) -> None:
    rule = ShallowTreeBaseline(kind="shallow_tree", max_depth=2)
    base = training.fit_baseline(split, dataset, rule, "roc_auc", ImputationConfig(), seed=1)
    assert (base.kind, base.feature, base.validation_scores) == ("shallow_tree", None, {})
    tree = base.pipeline.named_steps["model"]
    assert tree.get_depth() == 2 and tree.tree_.n_node_samples[0] == len(split.train_validation)
    features = base.pipeline.named_steps["features"]
    assert {name for name, _, _ in features.transformers} == {"numeric", "categorical"}
    assert features.named_transformers_["numeric"].named_steps["impute"].strategy == "median"
    assert 0.6 < training.score(base.pipeline, split.holdout, dataset, "roc_auc") < 0.8
    assert base.description == "shallow_tree (depth-2 tree on every feature)"
    one = pd.DataFrame([{c: None for c in dataset.feature_names}])
    assert np.isfinite(base.pipeline.predict_proba(one)).all()


# ----------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("family,params", [("logistic_regression", {"C": 0.3}),
                                           ("hist_gradient_boosting", {"max_iter": 20, "max_depth": 3})])
def test_a_trial_scores_what_fitting_the_whole_pipeline_scores(family, params, split, dataset) -> None:
    """Trials share one preprocessing (`trial_inputs`); the scores are those of fitting `build_pipeline`'s
    pipeline, preprocessing included, on train."""
    imputation = ImputationConfig(numeric="mean", categorical="most_frequent")
    trial = training.evaluate_trial(split, dataset, imputation, 5, "log_loss", family, params)
    pipe = training.fit(training.build_pipeline(family, params, dataset, imputation, 5), split.train, dataset)
    for part, value in (("validation", trial.validation_metric), ("train", trial.train_metric)):
        frame = getattr(split, part)
        expected = training.metric_value("log_loss", training.labels(frame, dataset),
                                         training.predict_scores(pipe, frame, dataset))
        assert value == pytest.approx(expected, rel=1e-12), part


def test_trial_inputs_are_computed_once_per_split_and_kind_and_leave_with_the_split(frame, dataset) -> None:
    import gc

    split = training.split_by_time(frame, dataset)
    first = training.trial_inputs(split, dataset, ImputationConfig(), scale=True)
    assert training.trial_inputs(split, dataset, ImputationConfig(), scale=True) is first
    assert training.trial_inputs(split, dataset, ImputationConfig(), scale=False) is not first
    assert training.trial_inputs(split, dataset, ImputationConfig(numeric="mean"), scale=True) is not first
    assert first.x_train.shape[0] == len(split.train) and first.x_validation.shape[0] == len(split.validation)
    assert np.allclose(first.x_train.mean(axis=0)[: len(dataset.numeric_features)], 0.0, atol=1e-9), "scaled"
    other = training.split_by_time(frame, dataset)  # equal data, another split: its own entry
    assert training.trial_inputs(other, dataset, ImputationConfig(), scale=True) is not first
    ids = {id(split.train), id(other.train)}
    before = sum(1 for k in training._TRIAL_INPUTS if k[0] in ids)
    del split, other
    gc.collect()
    assert before == 4 and not any(k[0] in ids for k in training._TRIAL_INPUTS), "entries leave with the split"


def test_a_search_frees_its_preprocessed_inputs_when_it_ends(split, dataset) -> None:
    mine = (id(split.train), id(split.validation))
    seen: list[int] = []

    def count(i: int, n: int, trial: training.Trial) -> None:
        seen.append(sum(1 for k in training._TRIAL_INPUTS if k[:2] == mine))

    training.search_candidates(split, dataset, cfg("grid", 2, families=["logistic_regression"]), on_trial=count)
    assert seen == [1, 1], "one preprocessing shared by the trials while the search runs"
    assert not any(k[:2] == mine for k in training._TRIAL_INPUTS), "and none left after it"


def test_the_search_part_of_a_split_holds_what_trials_read(split, dataset) -> None:
    part = training.search_part(split, dataset)
    assert list(part.train.columns) == [*dataset.feature_names, dataset.label]
    assert len(part.train) == len(split.train) and len(part.validation) == len(split.validation)
    assert part.holdout.empty and part.validation_start == split.validation_start
    trial = ("hist_gradient_boosting", {"max_iter": 10})
    a, b = (training.evaluate_trial(s, dataset, ImputationConfig(), 1, "roc_auc", *trial) for s in (part, split))
    assert (a.validation_metric, a.train_metric) == (b.validation_metric, b.train_metric)


@pytest.mark.parametrize("method", ["grid", "random", "bayesian"])
def test_search_is_deterministic_and_respects_budget(method, split, dataset) -> None:
    c = cfg(
        method,
        trials=3,
        families=["logistic_regression"],
        search_space={"logistic_regression": {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}},
    )
    seen: list[tuple[int, int]] = []
    a = training.search_candidates(split, dataset, c, on_trial=lambda i, n, t: seen.append((i, n)))
    b = training.search_candidates(split, dataset, c)
    assert len(a.trials) == 3 and a.budget == {"logistic_regression": 3}
    assert seen == [(1, 3), (2, 3), (3, 3)]
    key = [(t.family, t.params, t.validation_metric, t.train_metric) for t in a.trials]
    assert key == [(t.family, t.params, t.validation_metric, t.train_metric) for t in b.trials]
    assert a.best == max(a.trials, key=lambda t: (t.validation_metric, -t.number))
    assert all(t.params["C"] in (0.001, 0.01, 0.1, 1.0, 10.0) for t in a.trials)
    if method == "grid":  # thinned evenly: the ends of the grid are kept
        assert [t.params["C"] for t in a.trials] == [0.001, 0.1, 10.0]
    if method == "random":
        assert len({t.params["C"] for t in a.trials}) == 3  # without replacement


def test_bayesian_search_models_every_trial_after_the_startup_trials(split, dataset, monkeypatch) -> None:
    """TPE draws its start-up trials from its internal RandomSampler, then proposes from its model. Count the
    random draws: optuna's default of 10 start-up trials would have made all 6 trials (12 draws) random."""
    import optuna

    draws: list[str] = []
    random_draw = optuna.samplers.RandomSampler.sample_independent

    def counted(self, study, trial, name, distribution):  # the real RandomSampler, counted
        draws.append(name)
        return random_draw(self, study, trial, name, distribution)

    monkeypatch.setattr(optuna.samplers.RandomSampler, "sample_independent", counted)
    space = {"logistic_regression": {"C": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0], "fit_intercept": [True, False]}}
    c = cfg("bayesian", trials=6, families=["logistic_regression"], search_space=space)
    assert c.search.n_startup_trials == 2  # max(1, 6 // 3)
    a = training.search_candidates(split, dataset, c)
    assert len(a.trials) == 6
    assert sorted(draws) == ["C", "C", "fit_intercept", "fit_intercept"]  # 2 start-up trials x 2 parameters
    # an explicit start-up count is honoured; the proposals are seeded: same seed, same trials
    draws.clear()
    later = cfg("bayesian", 6, startup_trials=4, families=["logistic_regression"], search_space=space)
    b = training.search_candidates(split, dataset, later)
    assert len(draws) == 8
    again = training.search_candidates(split, dataset, c)
    assert [t.params for t in again.trials] == [t.params for t in a.trials]
    assert [t.validation_metric for t in again.trials] == [t.validation_metric for t in a.trials]
    assert [t.params for t in b.trials][:2] == [t.params for t in a.trials][:2]  # same seed, same random start


def test_search_startup_trials_default_and_validation() -> None:
    assert [SearchConfig(trials=n).n_startup_trials for n in (1, 2, 4, 6, 12)] == [1, 1, 1, 2, 4]
    assert SearchConfig(trials=6, startup_trials=5).n_startup_trials == 5
    with pytest.raises(ValueError, match=r"startup_trials \(4\) must be smaller than trials \(4\)"):
        SearchConfig(trials=4, startup_trials=4)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        SearchConfig(trials=4, startup_trials=0)


def test_search_across_families_uses_default_spaces(split, dataset) -> None:
    c = cfg(
        "random",
        trials=2,
        families=["logistic_regression", "random_forest"],
        search_space={"logistic_regression": {"C": [0.1, 1.0]}},
    )
    r = training.search_candidates(split, dataset, c)
    assert r.budget == {"logistic_regression": 2, "random_forest": 2}
    rf = [t.params for t in r.trials if t.family == "random_forest"]
    assert all(set(p) == set(training.DEFAULT_SPACES["random_forest"]) for p in rf)


def test_grid_smaller_than_budget_runs_every_combination(split, dataset) -> None:
    c = cfg(
        "grid", trials=10, families=["logistic_regression"], search_space={"logistic_regression": {"C": [0.1, 1.0]}}
    )
    assert [t.params for t in training.search_candidates(split, dataset, c).trials] == [{"C": 0.1}, {"C": 1.0}]


def test_log_loss_is_minimised(split, dataset) -> None:
    # a huge penalty (C tiny) gives near-prior probabilities: worse log loss than a sensible C
    space = {"logistic_regression": {"C": [1e-6, 1.0]}}
    r = training.search_candidates(
        split, dataset, cfg("grid", 2, "log_loss", families=["logistic_regression"], search_space=space)
    )
    assert not r.greater_is_better
    assert r.best.params == {"C": 1.0}
    assert r.best.validation_metric == min(t.validation_metric for t in r.trials)
    auc = training.search_candidates(
        split, dataset, cfg("grid", 2, "roc_auc", families=["logistic_regression"], search_space=space)
    )
    assert auc.greater_is_better and auc.best.validation_metric == max(t.validation_metric for t in auc.trials)


def test_fit_final_never_sees_the_holdout(split, dataset) -> None:
    pipe = training.fit_final(split, dataset, "logistic_regression", {"C": 1.0}, ImputationConfig(), seed=1)
    # the imputer's fitted medians equal train+validation's, not the full frame's
    medians = pipe.named_steps["features"].named_transformers_["numeric"].named_steps["impute"].statistics_
    tv = split.train_validation[dataset.numeric_features].median().to_numpy()
    everything = pd.concat([split.train_validation, split.holdout])[dataset.numeric_features].median().to_numpy()
    assert np.allclose(medians, tv)
    assert not np.allclose(tv, everything)
    # refitting on train+validation alone gives the very same model: the holdout played no part
    again = training.fit(
        training.build_pipeline("logistic_regression", {"C": 1.0}, dataset, ImputationConfig(), 1),
        split.train_validation,
        dataset,
    )
    assert np.array_equal(pipe.named_steps["model"].coef_, again.named_steps["model"].coef_)
    assert len(split.train_validation) + len(split.holdout) == sum(split.counts().values())


# ---------------------------------------------------------------------------------------- scoring


def test_metrics_slices_and_importance(split, dataset) -> None:
    pipe = training.fit_final(split, dataset, "logistic_regression", {}, ImputationConfig(), seed=1)
    overall = training.overall_metrics(pipe, split.holdout, dataset)
    assert set(overall) == {"roc_auc", "average_precision", "log_loss", "brier", "accuracy", "f1"}
    assert overall["roc_auc"] == training.score(pipe, split.holdout, dataset, "roc_auc") > 0.7
    slices = training.slice_metrics(pipe, split.holdout, dataset)
    regions = {k: v for k, v in slices.items() if k.startswith("region=")}
    assert set(regions) == {f"region={r}" for r in ("east", "north", "south", "west")}
    assert sum(v["rows"] for v in regions.values()) == len(split.holdout)
    assert all(v["roc_auc"] is not None and 0 <= v["positive_rate"] <= 1 for v in regions.values())
    one_class = split.holdout[training.labels(split.holdout, dataset) == 0]
    assert all(v["roc_auc"] is None for v in training.slice_metrics(pipe, one_class, dataset).values())

    imp = training.feature_importance(pipe, split.holdout, dataset, seed=1, max_rows=500, repeats=2)
    assert list(imp) != [] and set(imp) == set(dataset.feature_names)
    assert list(imp.values()) == sorted(imp.values(), reverse=True)
    assert next(iter(imp)) in {"support_tickets_30d", "contract_type", "tenure_months", "payment_delay_days"}
    assert imp == training.feature_importance(pipe, split.holdout, dataset, seed=1, max_rows=500, repeats=2)


def test_plots_render(split, dataset, tmp_path: Path) -> None:
    pipe = training.fit_final(split, dataset, "logistic_regression", {}, ImputationConfig(), seed=1)
    y = training.labels(split.holdout, dataset).to_numpy()
    s = training.predict_scores(pipe, split.holdout, dataset)
    figs = {
        "cm": training.plot_confusion_matrix(y, s),
        "roc": training.plot_roc(y, s),
        "cal": training.plot_calibration(y, s),
        "imp": training.plot_feature_importance({"a": 0.2, "b": 0.1}),
    }
    for name, fig in figs.items():
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------- lineage


def test_frame_hash_is_stable_and_sensitive(frame: pd.DataFrame) -> None:
    small = frame.head(200)
    assert frame_hash(small) == frame_hash(small.copy().reset_index(drop=True).set_axis(range(5, 205)))
    changed = small.copy()
    changed.iloc[3, changed.columns.get_loc("monthly_charges")] += 0.01
    assert frame_hash(changed) != frame_hash(small)
    assert frame_hash(small.rename(columns={"region": "area"})) != frame_hash(small)
    assert frame_hash(small.astype({"tenure_months": "float64"})) != frame_hash(small)
    assert len(frame_hash(small.iloc[:0])) == 64


def test_git_sha_outside_and_inside_a_checkout(tmp_path: Path) -> None:
    assert git_sha(tmp_path) == "unknown"
    assert git_sha(tmp_path / "does-not-exist") == "unknown"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    try:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        (tmp_path / "f.txt").write_text("a")
        subprocess.run(["git", "-C", str(tmp_path), "add", "f.txt"], check=True)
        subprocess.run(
            ["git", "-C", str(tmp_path), "commit", "-qm", "x"], check=True, env={**env, "PATH": "/usr/bin:/bin"}
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    sha = git_sha(tmp_path)
    assert len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)
    (tmp_path / "f.txt").write_text("b")
    assert git_sha(tmp_path) == f"{sha}+dirty"


def test_hardware_and_stage_timer() -> None:
    hw = hardware()
    assert int(hw["cpu_count"]) >= 1 and hw["python"].startswith("3.") and hw["memory_gb"]
    timer = StageTimer()
    with timer.stage("search"):
        pass
    with pytest.raises(RuntimeError), timer.stage("fit_final"):
        raise RuntimeError("boom")
    with timer.stage("search"):
        pass
    assert set(timer.as_metrics()) == {"time.search_s", "time.fit_final_s"}
    assert all(v >= 0 for v in timer.as_metrics().values())
