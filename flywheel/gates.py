"""Promotion gates: score a candidate against fixed rules and against the champion on the same holdout.

Pure logic (numpy / pandas / scikit-learn). The champion is always re-scored on the holdout the
candidate is scored on, never compared through metrics it logged in the past: an old number was
measured on other data and proves nothing about this holdout.

Rules, one `GateResult` each (names are stable: the flow and the MLflow metrics use them):
  primary, vs_champion, slice:<column>=<value>, calibration, latency, fairness, baseline,
  overfitting, behavioral:<test name>.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from flywheel.errors import FlywheelError
from flywheel.predictor import Predictor, build_predictor
from flywheel.schemas import BehavioralTest, DatasetDefinition, GateReport, GateResult, GatesConfig

MetricFn = Callable[[np.ndarray, np.ndarray], float]
_LATENCY_WARMUP = 20  # calls before timing: first calls pay lazy imports, allocations and cache misses
_EQUAL_TOL = 1e-9  # directional tests: a probability that does not move counts as "not the wrong way"


class _Unscorable(Exception):
    """A model could not be scored on the holdout; the message says why."""


# ------------------------------------------------------------------------------------------ helpers


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic (ties get average ranks): equals sklearn's roc_auc_score,
    without its per-call input validation, which dominated the bootstrap's cost (about 20 ms a call)."""
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, sum over thresholds of (R_n - R_n-1) * P_n: equals sklearn's definition."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last row of each distinct score
    tps = np.cumsum(ys)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


_METRICS: dict[str, MetricFn] = {"roc_auc": roc_auc, "average_precision": average_precision}


def labels(frame: pd.DataFrame, dataset: DatasetDefinition) -> np.ndarray:
    """0/1 target: 1 where the label equals the dataset's positive label."""
    return (frame[dataset.label] == dataset.positive_label).astype(int).to_numpy()


def model_columns(model: Any, dataset: DatasetDefinition) -> list[str]:
    """The columns a fitted model expects: what it was fitted on when it says so, else the dataset's."""
    names = getattr(model, "feature_names_in_", None)
    return [str(c) for c in names] if names is not None else list(dataset.feature_names)


def _positive_index(model: Any, dataset: DatasetDefinition) -> int:
    """Column of predict_proba for the positive class (models are fitted on 0/1, or on raw labels)."""
    classes = list(getattr(model, "classes_", []))
    for wanted in (dataset.positive_label, 1):
        if wanted in classes:
            return classes.index(wanted)
    return 1


def positive_proba(model: Any, frame: pd.DataFrame, dataset: DatasetDefinition) -> np.ndarray:
    """P(positive) for every row of `frame`: through the served predictor for a `Predictor`, else
    `predict_proba` on the columns the model was fitted on (the baseline, which never serves)."""
    if isinstance(model, Predictor):
        try:
            return model.predict_frame(frame)
        except Exception as exc:
            raise _Unscorable(f"{model.kind} predictor failed: {type(exc).__name__}: {exc}") from exc
    cols = model_columns(model, dataset)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise _Unscorable(f"holdout lacks column(s) the model was fitted on: {missing}")
    try:
        proba = np.asarray(model.predict_proba(frame[cols]), dtype=float)
    except Exception as exc:  # any model failure is reported, never swallowed silently
        raise _Unscorable(f"predict_proba failed: {type(exc).__name__}: {exc}") from exc
    return proba[:, _positive_index(model, dataset)]


def served_predictor(model: Any, holdout: pd.DataFrame, dataset: DatasetDefinition) -> Predictor:
    """The predictor that will serve `model` (built and verified on the whole holdout), or `model`
    itself when it already is one."""
    if isinstance(model, Predictor):
        return model
    cols = model_columns(model, dataset)
    missing = [c for c in cols if c not in holdout.columns]
    if missing:
        raise _Unscorable(f"holdout lacks column(s) the model was fitted on: {missing}")
    try:
        return build_predictor(model, dataset, verify=holdout)
    except Exception as exc:
        raise _Unscorable(f"no served predictor: {type(exc).__name__}: {exc}") from exc


def request_rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Holdout rows as a request carries them: plain Python values, None for missing."""
    sub = frame[list(columns)].astype(object)
    return [{c: (None if pd.isna(v) else v) for c, v in row.items()} for row in sub.to_dict("records")]


def _metric(name: str, y: np.ndarray, p: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(_METRICS[name](y, p))


def _bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_ci(
    metric: str,
    y: np.ndarray,
    p: np.ndarray,
    samples: int,
    confidence: float,
    seed: int,
    p_other: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile CI of metric(p) — or, with `p_other`, of metric(p) - metric(p_other) computed on
    the SAME resampled rows (paired: the rows' difficulty cancels out, so the CI is much tighter)."""
    stats = []
    for idx in _bootstrap_indices(len(y), samples, seed):
        yb = y[idx]
        if yb.min() == yb.max():  # a one-class resample has no AUC; skip it
            continue
        s = _METRICS[metric](yb, p[idx])
        if p_other is not None:
            s -= _METRICS[metric](yb, p_other[idx])
        stats.append(s)
    if not stats:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int) -> float:
    """ECE over `bins` equal-width bins on [0, 1]: sum of |observed rate - mean prob| weighted by bin size."""
    idx = np.minimum((np.clip(p, 0, 1) * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(ece)


def single_row_latency_ms(predictor: Predictor, frame: pd.DataFrame, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(wall, cpu) milliseconds per single-row call of the served predictor, single-threaded.

    Each call is what a request executes for the model: one raw feature dict in, P(positive) out
    (`Predictor.predict_rows`), on the path the service will use. The dicts are built before timing:
    the service pays its own request parsing, counted in the rest of the budget. BLAS/OpenMP pools are
    limited to one thread, as a serving worker sharing cores with others would be. The gate judges
    wall time, corrected for preemption with the thread's CPU time (see `_latency`)."""
    base = request_rows(frame.reset_index(drop=True), predictor.features)
    if not base:
        raise FlywheelError("latency gate needs at least one holdout row")
    singles = [[base[i % len(base)]] for i in range(rows + _LATENCY_WARMUP)]
    wall, cpu = np.empty(rows), np.empty(rows)
    with threadpool_limits(limits=1):
        for one in singles[:_LATENCY_WARMUP]:
            predictor.predict_rows(one)
        for i, one in enumerate(singles[_LATENCY_WARMUP:]):
            t0, c0 = time.perf_counter(), time.thread_time()
            predictor.predict_rows(one)
            wall[i] = (time.perf_counter() - t0) * 1000.0
            cpu[i] = (time.thread_time() - c0) * 1000.0
    return wall, cpu


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ------------------------------------------------------------------------------------------- rules


def _primary(cfg: GatesConfig, y: np.ndarray, p: np.ndarray, seed: int) -> tuple[GateResult, float]:
    rule = cfg.primary
    value = _metric(rule.metric, y, p)
    lo, hi = bootstrap_ci(rule.metric, y, p, rule.bootstrap.samples, rule.bootstrap.confidence, seed)
    ci = f"{rule.bootstrap.confidence:.0%} CI [{_fmt(lo)}, {_fmt(hi)}] ({rule.bootstrap.samples} bootstrap samples)"
    return (
        GateResult(
            rule="primary",
            value=_num(value),
            threshold=f"{rule.metric} >= {rule.min_value}",
            passed=bool(value >= rule.min_value),
            detail=f"{rule.metric} {_fmt(value)}; {ci}; n={len(y)}",
        ),
        value,
    )


def _vs_champion(
    cfg: GatesConfig,
    y: np.ndarray,
    p_cand: np.ndarray,
    p_champ: np.ndarray | None,
    champ_problem: str | None,
    cand_value: float,
    seed: int,
) -> GateResult:
    rule = cfg.primary
    threshold = f"candidate - champion >= -{rule.max_drop_vs_champion}"
    if champ_problem == "absent":
        return GateResult(
            rule="vs_champion",
            value=None,
            threshold=threshold,
            passed=True,
            gated=False,
            detail="no champion yet (first model): not applicable",
        )
    if p_champ is None:
        return GateResult(
            rule="vs_champion",
            value=None,
            threshold=threshold,
            passed=False,
            detail=f"champion could not be scored on this holdout, failing closed: {champ_problem}",
        )
    champ_value = _metric(rule.metric, y, p_champ)
    diff = cand_value - champ_value
    lo, hi = bootstrap_ci(
        rule.metric, y, p_cand, rule.bootstrap.samples, rule.bootstrap.confidence, seed, p_other=p_champ
    )
    # The decision is on the point estimate: requiring the CI's lower bound to clear -epsilon would
    # block any candidate that is merely as good as the champion on a small holdout. The paired CI
    # is reported so a reviewer sees how much of the difference is noise.
    return GateResult(
        rule="vs_champion",
        value=_num(diff),
        threshold=threshold,
        passed=bool(diff >= -rule.max_drop_vs_champion),
        detail=(
            f"{rule.metric} candidate {_fmt(cand_value)} vs champion {_fmt(champ_value)} (re-scored on this "
            f"holdout); paired {rule.bootstrap.confidence:.0%} CI of the difference [{_fmt(lo)}, {_fmt(hi)}]; "
            "decision on the point estimate"
        ),
    )


def _slices(
    cfg: GatesConfig,
    holdout: pd.DataFrame,
    dataset: DatasetDefinition,
    y: np.ndarray,
    p_cand: np.ndarray,
    p_champ: np.ndarray | None,
    champ_problem: str | None,
) -> list[GateResult]:
    rule, metric = cfg.slices, cfg.primary.metric
    threshold = f"relative drop vs champion <= {rule.max_relative_drop:.0%}"
    out: list[GateResult] = []
    for col in dataset.slices:
        if col not in holdout.columns:
            out.append(
                GateResult(
                    rule=f"slice:{col}",
                    value=None,
                    threshold=threshold,
                    passed=False,
                    detail=f"holdout lacks slice column {col!r}: cannot check slices, failing closed",
                )
            )
            continue
        values = holdout[col].to_numpy()
        for v in sorted(pd.unique(holdout[col].dropna()), key=str):
            mask = values == v
            n, ys = int(mask.sum()), y[mask]
            name = f"slice:{col}={v}"
            cand = _metric(metric, ys, p_cand[mask])
            base = f"n={n}; candidate {metric} {_fmt(cand)}"
            if n < rule.min_rows or len(np.unique(ys)) < 2:
                why = f"fewer than {rule.min_rows} rows" if n < rule.min_rows else "a single class"
                out.append(
                    GateResult(
                        rule=name,
                        value=None,
                        threshold=threshold,
                        passed=True,
                        gated=False,
                        detail=f"{base}; reported only: {why}",
                    )
                )
                continue
            if champ_problem == "absent":
                out.append(
                    GateResult(
                        rule=name,
                        value=None,
                        threshold=threshold,
                        passed=True,
                        gated=False,
                        detail=f"{base}; no champion yet: not applicable",
                    )
                )
                continue
            if p_champ is None:
                out.append(
                    GateResult(
                        rule=name,
                        value=None,
                        threshold=threshold,
                        passed=False,
                        detail=f"{base}; champion could not be scored, failing closed: {champ_problem}",
                    )
                )
                continue
            champ = _metric(metric, ys, p_champ[mask])
            drop = (champ - cand) / champ if champ > 0 else 0.0
            out.append(
                GateResult(
                    rule=name,
                    value=float(drop),
                    threshold=threshold,
                    passed=bool(drop <= rule.max_relative_drop),
                    detail=f"{base} vs champion {_fmt(champ)} (relative drop {drop:+.2%})",
                )
            )
    return out


def _calibration(cfg: GatesConfig, y: np.ndarray, p: np.ndarray) -> GateResult:
    rule = cfg.calibration
    ece = expected_calibration_error(y, p, rule.bins)
    return GateResult(
        rule="calibration",
        value=ece,
        threshold=f"ECE <= {rule.max_ece}",
        passed=bool(ece <= rule.max_ece),
        detail=f"expected calibration error over {rule.bins} equal-width bins; mean p {p.mean():.4f}, "
        f"observed rate {y.mean():.4f}",
    )


def _latency(cfg: GatesConfig, predictor: Predictor, holdout: pd.DataFrame) -> GateResult:
    rule = cfg.latency
    threshold = (
        f"p99 <= {rule.model_share_ms:g} ms (the model's share of the service's {rule.service_budget_ms:g} ms p99)"
    )
    try:
        times, cpu = single_row_latency_ms(predictor, holdout, rule.rows)
    except Exception as exc:
        return GateResult(
            rule="latency",
            value=None,
            threshold=threshold,
            passed=False,
            detail=f"single-row prediction through the {predictor.kind} path failed: {type(exc).__name__}: {exc}",
        )
    p50, p99 = np.percentile(times, [50, 99])
    cpu99 = float(np.percentile(cpu, 99))
    # Judged: the wall p99, unless preemption inflated it (a busy machine): then the larger of the
    # thread-CPU p99 and the wall median, which preemption barely moves. A model that waits (sleep, I/O)
    # still fails through its median; a costly one (a big forest on the pipeline path) through its CPU time.
    judged = float(min(p99, max(cpu99, p50)))
    waited = "; CPU far below wall: the calls waited (sleep/IO or a busy machine)" if cpu99 < 0.5 * p99 else ""
    return GateResult(
        rule="latency",
        value=judged,
        threshold=threshold,
        passed=bool(judged <= rule.model_share_ms),
        detail=(
            f"timed path: {predictor.kind} (what the service runs for this model: one raw feature dict in, "
            f"P(positive) out) x{rule.rows} after {_LATENCY_WARMUP} warm-up calls, threadpool_limits(1), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}: "
            f"wall p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {times.max():.3f} ms; thread CPU p99 {cpu99:.3f} ms"
            f"{waited}; judged min(wall p99, max(CPU p99, wall p50)) = {judged:.3f} ms"
        ),
    )


def _inference(predictor: Predictor) -> GateResult:
    """Reported only: which path serves and how close it is to predict_proba (a path that was not
    within its tolerance on the whole holdout was never chosen; `fallbacks` says why)."""
    from flywheel.predictor import tolerance

    return GateResult(
        rule="inference",
        value=predictor.max_abs_diff,
        threshold=f"max |dp| vs predict_proba <= {tolerance(predictor.kind):g}",
        passed=True,
        gated=False,
        detail=f"served through {predictor.summary()}",
    )


def _fairness(
    cfg: GatesConfig, holdout: pd.DataFrame, dataset: DatasetDefinition, y: np.ndarray, p: np.ndarray
) -> GateResult:
    rule = cfg.fairness
    attr = dataset.protected_attribute
    threshold = f"{rule.metric} <= {rule.max_difference}"
    name = "fairness"
    if not attr:
        return GateResult(
            rule=name,
            value=None,
            threshold=threshold,
            passed=True,
            gated=False,
            detail="dataset declares no protected attribute: not checked",
        )
    if attr not in holdout.columns:
        return GateResult(
            rule=name,
            value=None,
            threshold=threshold,
            passed=False,
            detail=f"holdout lacks protected attribute column {attr!r}: failing closed",
        )
    pred = p >= rule.decision_threshold
    groups = holdout[attr].astype(object).where(holdout[attr].notna(), "<missing>").to_numpy()
    rates: dict[str, float] = {}
    excluded: list[str] = []
    for g in sorted(pd.unique(groups), key=str):
        mask = groups == g
        if rule.metric == "equal_opportunity_difference":
            mask = mask & (y == 1)  # TPR: among the actual positives of the group
        n = int(mask.sum())
        if n < rule.min_group_rows:
            excluded.append(f"{g} (n={n})")
            continue
        rates[str(g)] = float(pred[mask].mean())
    what = "TPR" if rule.metric == "equal_opportunity_difference" else "positive rate"
    listed = ", ".join(f"{g}: {r:.3f}" for g, r in rates.items())
    excl = f"; excluded (< {rule.min_group_rows} rows): {', '.join(excluded)}" if excluded else ""
    if len(rates) < 2:
        return GateResult(
            rule=name,
            value=None,
            threshold=threshold,
            passed=True,
            gated=False,
            detail=f"{attr}: fewer than 2 groups with enough rows, not gated; {what} {listed or 'none'}{excl}",
        )
    diff = max(rates.values()) - min(rates.values())
    return GateResult(
        rule=name,
        value=float(diff),
        threshold=threshold,
        passed=bool(diff <= rule.max_difference),
        detail=f"{attr} at threshold {rule.decision_threshold}: {what} {listed}{excl}",
    )


def _baseline(
    cfg: GatesConfig, baseline: Any, holdout: pd.DataFrame, dataset: DatasetDefinition, y: np.ndarray, cand: float
) -> GateResult:
    """`baseline`: a training.Baseline (its fitted pipeline and what it is), or any fitted model."""
    metric, margin = cfg.primary.metric, cfg.baseline.min_margin
    threshold = f"candidate - baseline >= {margin}"
    model = getattr(baseline, "pipeline", baseline)
    name = getattr(baseline, "description", type(model).__name__)
    try:
        base = _metric(metric, y, positive_proba(model, holdout, dataset))
    except _Unscorable as exc:
        return GateResult(
            rule="baseline",
            value=None,
            threshold=threshold,
            passed=False,
            detail=f"baseline ({name}) could not be scored, failing closed: {exc}",
        )
    gain = cand - base
    return GateResult(
        rule="baseline",
        value=_num(gain),
        threshold=threshold,
        passed=bool(gain >= margin),
        detail=f"{metric} candidate {_fmt(cand)} vs baseline {_fmt(base)}; baseline: {name}",
    )


def _overfitting(cfg: GatesConfig, train_metric: float, validation_metric: float) -> GateResult:
    gap = train_metric - validation_metric
    return GateResult(
        rule="overfitting",
        value=_num(float(gap)),
        threshold=f"train - validation <= {cfg.overfitting.max_gap}",
        passed=bool(gap <= cfg.overfitting.max_gap),  # NaN compares False: fails closed
        detail=f"train {_fmt(train_metric)}, validation {_fmt(validation_metric)}",
    )


# -------------------------------------------------------------------------------------- behavioral


def _behavioral_rows(holdout: pd.DataFrame, test: BehavioralTest, seed: int, dropna: str | None) -> pd.DataFrame:
    frame = holdout.dropna(subset=[dropna]) if dropna else holdout
    if frame.empty:
        raise FlywheelError(f"no holdout rows with a value in {dropna!r}")
    n = min(test.rows, len(frame))
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)


def _run_behavioral(
    test: BehavioralTest, model: Predictor, holdout: pd.DataFrame, seed: int
) -> tuple[float, str, bool, str]:
    """(value, threshold, passed, detail) for one test, through the served predictor; exceptions
    propagate to the caller."""
    cols = list(model.features)
    if test.kind == "minimum_functionality":
        p = np.asarray(model.predict_rows([dict.fromkeys(cols)]), dtype=float)
        ok = p.shape == (1,) and bool(np.isfinite(p).all()) and 0.0 <= p[0] <= 1.0
        return float(p[0]), "a probability in [0, 1]", ok, f"every feature missing -> p={p[0]:.4f}"
    assert test.feature is not None  # the schema validator guarantees it for these kinds
    if test.kind == "invariance":
        rows = _behavioral_rows(holdout, test, seed, None)
        probs = []
        for v in test.values:
            x = rows[cols].copy()
            x[test.feature] = v
            probs.append(model.predict_frame(x))
        stacked = np.vstack(probs)
        spread = stacked.max(axis=0) - stacked.min(axis=0)
        worst = float(spread.max())
        return (
            worst,
            f"max |dp| <= {test.max_delta}",
            worst <= test.max_delta,
            f"{test.feature} through {test.values} on {len(rows)} rows: max |dp| {worst:.4f}, mean {spread.mean():.4f}",
        )
    # directional
    assert test.delta is not None
    rows = _behavioral_rows(holdout, test, seed, test.feature)
    x = rows[cols]
    moved = x.copy()
    moved[test.feature] = moved[test.feature].astype(float) + test.delta
    before = model.predict_frame(x)
    after = model.predict_frame(moved)
    d = after - before
    right = (d >= -_EQUAL_TOL) if test.direction == "increase" else (d <= _EQUAL_TOL)
    share = float(right.mean())
    return (
        share,
        f"share {test.direction} or equal >= {test.min_share}",
        share >= test.min_share,
        f"{test.feature} {test.delta:+g} on {len(rows)} rows: {share:.1%} moved the right way (or stayed); "
        f"mean dp {d.mean():+.4f}",
    )


def _behavioral(
    cfg: GatesConfig, model: Predictor, holdout: pd.DataFrame, dataset: DatasetDefinition, seed: int
) -> list[GateResult]:
    suite = dataset.behavioral
    out = []
    for test in suite.tests:
        name = f"behavioral:{test.name}"
        try:
            value, threshold, passed, detail = _run_behavioral(test, model, holdout, seed)
        except Exception as exc:  # a test that crashes is a failed test, not a crashed evaluation
            value, threshold, passed = None, f"{test.kind} test runs", False
            detail = f"error: {type(exc).__name__}: {exc}"
        out.append(
            GateResult(
                rule=name,
                value=_num(value),
                threshold=threshold,
                passed=bool(passed),
                gated=cfg.behavioral_required,
                detail=f"suite {suite.version}, {test.kind}: {detail}",
            )
        )
    return out


# ----------------------------------------------------------------------------------------- entry


def evaluate_gates(
    candidate: Any,
    champion: Any | None,
    baseline: Any,
    holdout: pd.DataFrame,
    dataset: DatasetDefinition,
    cfg: GatesConfig,
    train_metric: float,
    validation_metric: float,
    seed: int = 0,
    candidate_version: str | None = None,
    champion_version: str | None = None,
) -> GateReport:
    """Every gate, candidate vs rules and vs the champion re-scored on the same `holdout`, each scored
    through the predictor that will serve it (a fitted pipeline is turned into one here, verified on
    this whole holdout; a `Predictor` is used as it is).

    `champion=None` (first model): the comparison rules are reported as not applicable. A champion
    that cannot be scored on this holdout (missing columns, a crash) fails those rules closed."""
    if dataset.label not in holdout.columns:
        raise FlywheelError(f"holdout has no label column {dataset.label!r}")
    holdout = holdout.reset_index(drop=True)
    y = labels(holdout, dataset)
    if len(np.unique(y)) < 2:
        raise FlywheelError(
            f"holdout of {len(y)} rows has a single class in {dataset.label!r}: the gates cannot be evaluated"
        )
    try:
        candidate = served_predictor(candidate, holdout, dataset)
        p_cand = positive_proba(candidate, holdout, dataset)
    except _Unscorable as exc:
        raise FlywheelError(f"candidate could not be scored on the holdout: {exc}") from exc

    p_champ: np.ndarray | None = None
    champ_problem: str | None = None
    if champion is None:
        champ_problem = "absent"
    else:
        try:
            champion = served_predictor(champion, holdout, dataset)
            p_champ = positive_proba(champion, holdout, dataset)
        except _Unscorable as exc:
            champ_problem = str(exc)

    primary, cand_value = _primary(cfg, y, p_cand, seed)
    results = [
        primary,
        _vs_champion(cfg, y, p_cand, p_champ, champ_problem, cand_value, seed),
        *_slices(cfg, holdout, dataset, y, p_cand, p_champ, champ_problem),
        _calibration(cfg, y, p_cand),
        _inference(candidate),
        _latency(cfg, candidate, holdout),
        _fairness(cfg, holdout, dataset, y, p_cand),
        _baseline(cfg, baseline, holdout, dataset, y, cand_value),
        _overfitting(cfg, train_metric, validation_metric),
        *_behavioral(cfg, candidate, holdout, dataset, seed),
    ]
    return GateReport(
        candidate_version=candidate_version,
        champion_version=champion_version,
        candidate_inference=candidate.kind,
        champion_inference=champion.kind if isinstance(champion, Predictor) else None,
        results=results,
    )


# ----------------------------------------------------------------------------------------- report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_gate_report(report: GateReport, title: str) -> str:
    """Markdown: the verdict first, then one table row per rule."""
    if report.passed:
        verdict = "**Verdict: PASSED** (every gated rule passed)"
    else:
        verdict = f"**Verdict: REJECTED** (failed: {', '.join(report.failed_rules)})"
    versions = (
        f"Candidate: `{report.candidate_version or 'unregistered'}` · champion: `{report.champion_version or 'none'}`"
    )
    lines = [
        f"# {title}",
        "",
        verdict,
        "",
        versions,
        "",
        "| rule | value | threshold | result | detail |",
        "|---|---|---|---|---|",
    ]
    for r in report.results:
        result = ("pass" if r.passed else "FAIL") if r.gated else ("info" if r.passed else "info (fail)")
        value = "n/a" if r.value is None else f"{r.value:.4g}"
        lines.append(f"| {_cell(r.rule)} | {value} | {_cell(r.threshold)} | {result} | {_cell(r.detail)} |")
    return "\n".join(lines) + "\n"
