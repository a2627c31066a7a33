"""Staged rollout policy: the plan (configs/rollout.yaml), guard evaluation, the A/B readout, decisions.

Pure logic plus a read-only adapter of the prediction log (outcomes are read by flywheel.outcomes); no
Prefect and no HTTP here (tasks/rollout.py talks to the service, flows/rollout.py tells the story).

Strategies (a plan is discriminated by `strategy`):
- shadow: the challenger scores a sample of requests in the background; its predictions are compared
  with the champion's on the same requests (agreement, latency). Ends in `hold` or `promote`.
- canary: a sticky share of entities goes to the challenger, ramping through `steps`; each step is
  held for `hold_s`, then the guards are judged on that step's traffic. A breach rolls back.
- blue_green: an instant switch of all traffic to the challenger slot; the champion stays loaded
  (warm) for `hold_s`, so rollback is one routing call. Then promotion.
- ab_test: a fixed split for `duration_s`; per-arm outcome metrics from delayed labels and a readout
  with a bootstrap confidence interval on the difference: promote only a significantly better arm.

Label-based judgements (the AUC guard, the A/B readout) use only honestly joined outcomes
(`flywheel.outcomes.join_outcomes`): the outcome of the feature snapshot a prediction used, arrived after
the prediction was made. A label already known at prediction time never counts; with fewer joined
outcomes than `min_labelled` per arm they report "not enough outcomes yet".

Guards compare the challenger's traffic of a step with the champion's traffic of the whole rollout
(at 100% the champion serves nothing in that step): error rate (the worse of the challenger's failed
share of its rows, from the service's error table, and the service-wide 5xx share of /predict from
/metrics), prediction-distribution shift (PSI on the two arms' probabilities, mean-probability
difference), and ROC AUC per arm when enough joined outcomes exist
(outcomes that arrived after the predictions: flywheel/outcomes.py). PSI and AUC breach only when the
difference is larger than the threshold AND significant (PSI: above the 95th percentile of a
permutation test; AUC: the bootstrap interval of the drop excludes zero): small arms must not roll
back a good model on noise.

Latency is judged twice, on the challenger's p99 request latency: against the champion's p99 in the
same step window (ratio x champion p99 + slack: a busy machine slows both arms alike, so the champion
measures the machine), and against an absolute ceiling that is a setting per profile
(`rollout.max_p99_latency_ms`: the production budget is not a laptop's), so two equally slow models
still fail. When the champion answered too few requests in the window (a 100% step, blue/green), its
p99 comes from the preceding window of the same length. Like PSI and AUC, a latency breach must also be
significant: over a few dozen requests a p99 is their slowest one, so a single request held up by the
machine would decide the rollout. The guard resamples each arm's latencies (bootstrap) and breaches only
when the challenger's p99 is over its limit in at least 95% of the resamples; a challenger that is slow
throughout breaches at any size, and on thousands of requests the test converges to the plain comparison.

A candidate trained because the data drifted is expected to predict differently from the champion, so
prediction-shift guards would roll it back for doing its job. Its version carries why its training ran
(`flywheel.trigger`), and `by_trigger` in the plan file picks its plan (e.g. `drift_detected:
after_drift`). There, `prediction_shift: report` makes PSI, the mean-probability difference and shadow
agreement `report` (computed and shown, never a breach), and `await_outcomes: true` makes the AUC guard on
joined outcomes the one that decides: until `min_labelled` outcomes per arm arrived it counts as too
little to judge, so the step is held (in shadow, for `after_drift`) up to `max_extensions`, then rolled
back, as any unjudgeable step: never promoted unjudged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flywheel.errors import ConfigError, FlywheelError
from flywheel.stats import psi  # one PSI for rollout guards and monitoring

Strategy = Literal["shadow", "canary", "blue_green", "ab_test"]
Outcome = Literal["promoted", "rolled_back", "held", "rejected"]
GuardStatus = Literal["pass", "breach", "skipped", "report"]  # report: computed and shown, never decides
TOO_FEW = "too few"
NOT_ENOUGH_OUTCOMES = "not enough outcomes yet"  # label-based checks: reported, never an unjudgeable step


class RolloutError(FlywheelError):
    """A rollout cannot start or continue (no challenger, the service refused it, ...)."""


# ------------------------------------------------------------------------------------------- plan


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Guards(Strict):
    """Thresholds judged at every step; `null` switches a guard off."""

    max_error_rate: float | None = Field(0.02, ge=0, le=1, description="challenger's failed share of its rows, "
                                         "or the service's 5xx share of /predict requests")
    max_p99_latency_ratio: float | None = Field(1.5, ge=1, description="challenger p99 request latency <= "
                                                "ratio x champion p99 in the same window + p99_latency_slack_ms")
    p99_latency_slack_ms: float = Field(2.0, ge=0, le=1000, description="absolute slack of the comparison: at a few "
                                        "ms a ratio alone breaches on one preempted request")
    min_requests: int = Field(20, ge=1, description="requests per arm before latency is judged; also the number of "
                              "requests answered by one arm alone before those alone are the basis")
    max_psi: float | None = Field(0.25, gt=0, description="PSI of challenger vs champion probabilities "
                                  "(a breach must also be significant: permutation test)")
    max_mean_probability_diff: float | None = Field(0.15, gt=0, le=1)
    max_auc_drop: float | None = Field(0.05, ge=0, le=1, description="champion AUC - challenger AUC (outcomes "
                                       "joined to the predictions, arrived after them)")
    min_predictions: int = Field(20, ge=1, description="distinct entities per arm before distributions are judged")
    min_labelled: int = Field(200, ge=10, description="entities per arm with a joined outcome before AUC is judged")
    max_extensions: int = Field(3, ge=0, le=100, description="extra holds of a step with too little traffic; "
                                "then the rollout rolls back (a challenger is never promoted unjudged)")
    psi_bins: int = Field(10, ge=2, le=50)
    bootstrap_samples: int = Field(200, ge=50, le=10_000)
    seed: int = 0
    prediction_shift: Literal["judge", "report"] = Field(
        "judge", description="report: PSI, mean-probability difference and shadow agreement are shown, never a "
                             "breach (a candidate retrained on drifted data is expected to predict differently)")
    await_outcomes: bool = Field(False, description="the AUC guard must be judged: until min_labelled joined "
                                 "outcomes per arm arrived the step is held (then rolled back, never promoted)")

    @model_validator(mode="before")
    @classmethod
    def _ceiling_is_a_setting(cls, data: Any) -> Any:
        # the old absolute threshold: say where it went rather than only "extra inputs are not permitted"
        if isinstance(data, dict) and "max_p99_latency_ms" in data:
            raise ValueError("max_p99_latency_ms is no longer a plan key: the absolute p99 ceiling is set per "
                             "profile (rollout.max_p99_latency_ms in configs/base.yaml or configs/<profile>.yaml); "
                             "plans set max_p99_latency_ratio and p99_latency_slack_ms against the champion")
        return data


class CanaryStep(Strict):
    share: float = Field(gt=0, le=1, description="share of entities answered by the challenger")
    hold_s: float = Field(gt=0, description="seconds of traffic observed before the guards are judged")


class ShadowPlan(Strict):
    strategy: Literal["shadow"]
    sample: float = Field(1.0, gt=0, le=1, description="share of requests the challenger also scores")
    duration_s: float = Field(gt=0)
    min_agreement: float = Field(0.9, ge=0, le=1, description="share of shadowed rows with the same label")
    on_pass: Literal["hold", "promote"] = "hold"
    guards: Guards = Guards()


class CanaryPlan(Strict):
    strategy: Literal["canary"]
    steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(share=s, hold_s=300) for s in (0.05, 0.5, 1.0)], min_length=1
    )
    rollback: Literal["instant", "gradual"] = "instant"
    rollback_hold_s: float = Field(5.0, ge=0, description="gradual rollback: seconds at each lower share")
    guards: Guards = Guards()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        shares = [s.share for s in steps]
        if any(b <= a for a, b in itertools.pairwise(shares)):
            raise ValueError(f"canary step shares must strictly increase, got {shares}")
        return steps


class BlueGreenPlan(Strict):
    strategy: Literal["blue_green"]
    hold_s: float = Field(gt=0, description="seconds on the new slot, the old one warm, before promotion")
    guards: Guards = Guards()


class ABTestPlan(Strict):
    strategy: Literal["ab_test"]
    share: float = Field(0.5, gt=0, lt=1, description="share of entities in the challenger arm")
    duration_s: float = Field(gt=0)
    metric: Literal["roc_auc", "accuracy", "log_loss", "brier"] = "roc_auc"
    confidence: float = Field(0.95, gt=0.5, lt=1)
    bootstrap_samples: int = Field(1000, ge=100, le=20_000)
    min_labelled: int = Field(100, ge=10, description="entities per arm with a joined outcome for a readout")
    on_inconclusive: Literal["hold", "rollback"] = "hold"
    seed: int = 0
    guards: Guards = Guards()


Plan = Annotated[ShadowPlan | CanaryPlan | BlueGreenPlan | ABTestPlan, Field(discriminator="strategy")]


class RolloutPlans(Strict):
    """configs/rollout.yaml: named plans; `guards` at the top is the default every plan starts from."""

    default: str
    guards: Guards = Guards()
    plans: dict[str, Plan] = Field(min_length=1)
    # why a candidate's training ran (its version's trigger tag) -> the plan it is rolled out with
    by_trigger: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _shared_guards(cls, data: Any) -> Any:
        # a plan's own `guards:` overrides the shared ones key by key
        if isinstance(data, dict) and isinstance(data.get("plans"), dict):
            shared = data.get("guards") or {}
            if isinstance(shared, dict):
                data = {**data, "plans": {
                    name: ({**plan, "guards": {**shared, **(plan.get("guards") or {})}}
                           if isinstance(plan, dict) else plan)
                    for name, plan in data["plans"].items()
                }}
        return data

    @model_validator(mode="after")
    def _default_exists(self) -> RolloutPlans:
        if self.default not in self.plans:
            raise ValueError(f"default plan {self.default!r} is not among plans {sorted(self.plans)}")
        unknown = {k: v for k, v in self.by_trigger.items() if v not in self.plans}
        if unknown:
            raise ValueError(f"by_trigger names plans that do not exist: {unknown} (plans: {sorted(self.plans)})")
        return self

    def plan_name_for(self, name: str | None, trigger: str | None) -> str | None:
        """The plan to use: a name given explicitly wins; else the one `by_trigger` maps the candidate's
        trigger to; else None (the default)."""
        return name or (self.by_trigger.get(trigger) if trigger else None)

    def select(self, name: str | None = None) -> Plan:
        """A plan by name (or its strategy when no plan has that name); the default when None."""
        name = name or self.default
        if name in self.plans:
            return self.plans[name]
        by_strategy = [p for p in self.plans.values() if p.strategy == name]
        if len(by_strategy) == 1:
            return by_strategy[0]
        raise ConfigError([("rollout plan", name, f"no such plan; configured: {sorted(self.plans)}")])


def load_plans(path: Path) -> RolloutPlans:
    """Parse and check configs/rollout.yaml; errors name the file and the key."""
    from flywheel.settings import load_yaml_model

    return load_yaml_model(RolloutPlans, Path(path))


# ------------------------------------------------------------------------------------ observations

PREDICTION_COLUMNS = ["at", "request_id", "entity", "version", "arm", "probability", "prediction", "latency_ms",
                      "shadow", "feature_time"]


def _read_log(url: str, table_name: str, model: str, since: datetime, until: datetime | None,
              select: Callable[[Any], Any], fetch: Callable[[Any, Any], Any], missing: Any) -> Any:
    """One windowed read of a service log table: `select(table)` narrowed to `model` and [since, until),
    run by `fetch(conn, query)`; `missing` when the service has not created the table yet."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        table = sa.Table(table_name, sa.MetaData(), autoload_with=engine)
        q = select(table).where(table.c.model == model, table.c.at >= _db_time(since, engine))
        if until is not None:
            q = q.where(table.c.at < _db_time(until, engine))
        with engine.connect() as conn:
            return fetch(conn, q)
    except sa.exc.NoSuchTableError:
        return missing
    finally:
        engine.dispose()


def read_predictions(url: str, model: str, versions: list[str], since: datetime,
                     until: datetime | None = None) -> pd.DataFrame:
    """Logged predictions of `model` (the given versions) in [since, until), oldest first."""
    import sqlalchemy as sa

    from flywheel.predictionlog import PREDICTIONS_TABLE

    frame = _read_log(
        url, PREDICTIONS_TABLE, model, since, until,
        # a log written before `feature_time` existed reads it as null (such rows never join an outcome)
        lambda t: (sa.select(*[t.c[c] if c in t.c else sa.null().label(c) for c in PREDICTION_COLUMNS])
                   .where(t.c.version.in_([str(v) for v in versions])).order_by(t.c.id)),
        lambda conn, q: pd.DataFrame([dict(r._mapping) for r in conn.execute(q)], columns=PREDICTION_COLUMNS),
        pd.DataFrame(columns=PREDICTION_COLUMNS),
    )
    frame["shadow"] = frame["shadow"].astype(bool)
    frame["probability"] = frame["probability"].astype(float)
    frame["latency_ms"] = frame["latency_ms"].astype(float)
    frame["version"] = frame["version"].astype(str)
    return frame


def count_failures(url: str, model: str, version: str, since: datetime, until: datetime | None = None,
                   shadow: bool = False) -> int:
    """Rows `model` v`version` failed to score in [since, until) (the service's error table)."""
    import sqlalchemy as sa

    from flywheel.predictionlog import ERRORS_TABLE

    return int(_read_log(
        url, ERRORS_TABLE, model, since, until,
        lambda t: sa.select(sa.func.count()).select_from(t).where(t.c.version == str(version), t.c.shadow == shadow),
        lambda conn, q: conn.execute(q).scalar_one(),
        0,
    ))


def _db_time(dt: datetime, engine: Any) -> datetime:
    # SQLite stores the writer's UTC times without an offset: compare naive UTC there
    dt = dt.astimezone(UTC)
    return dt.replace(tzinfo=None) if engine.dialect.name == "sqlite" else dt


def split_arms(rows: pd.DataFrame, champion: str, challenger: str, shadow: bool = False
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(champion rows, challenger rows) by version; `shadow` picks the challenger's background rows."""
    champ = rows[(rows["version"] == str(champion)) & ~rows["shadow"]]
    chall = rows[(rows["version"] == str(challenger)) & (rows["shadow"] == shadow)]
    return champ, chall


def per_entity(rows: pd.DataFrame) -> pd.DataFrame:
    """The newest prediction of each entity (repeated requests must not weigh an entity more)."""
    rows = rows[rows["entity"].notna()]
    return rows.groupby("entity", sort=False).tail(1)


def joined_arm(rows: pd.DataFrame, outcomes: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, probability) of one arm: its predictions joined honestly with their outcomes, then one per entity
    (the newest joined prediction: an entity predicted twice counts once)."""
    from flywheel.outcomes import join_outcomes

    j = per_entity(join_outcomes(rows, outcomes))
    return j["y"].to_numpy(int), j["probability"].to_numpy(float)


# ------------------------------------------------------------------------------------------- stats


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """The gates' ROC AUC (one implementation serves gates and guards); None when only one class is present."""
    from flywheel.gates import roc_auc as shared_roc_auc

    y = np.asarray(y, int)
    if int(y.sum()) in (0, len(y)):
        return None
    return shared_roc_auc(y, np.asarray(p, float))


def metric_value(metric: str, y: np.ndarray, p: np.ndarray) -> float | None:
    y, p = np.asarray(y, int), np.asarray(p, float)
    if metric == "roc_auc":
        return roc_auc(y, p)
    if metric == "accuracy":
        return float(np.mean((p >= 0.5) == (y == 1)))
    if metric == "brier":
        return float(np.mean((p - y) ** 2))
    if metric == "log_loss":
        q = np.clip(p, 1e-15, 1 - 1e-15)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    raise ValueError(f"unknown metric {metric!r}")


HIGHER_IS_BETTER = {"roc_auc": True, "accuracy": True, "brier": False, "log_loss": False}


def bootstrap_diff(metric: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                   samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of metric(b) - metric(a), resampling each arm independently."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(samples):
        ia = rng.integers(0, len(a[0]), len(a[0]))
        ib = rng.integers(0, len(b[0]), len(b[0]))
        va, vb = metric_value(metric, a[0][ia], a[1][ia]), metric_value(metric, b[0][ib], b[1][ib])
        if va is not None and vb is not None:
            diffs.append(vb - va)
    if not diffs:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def p99(values: pd.Series) -> float:
    return float(np.percentile(values.to_numpy(float), 99))


def predict_request_counts(metrics_text: str) -> tuple[float, float]:
    """(all /predict requests, 5xx ones) from the service's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = errors = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "flywheel_http_requests":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("path") == "/predict":
                total += s.value
                if s.labels.get("status", "").startswith("5"):
                    errors += s.value
    return total, errors


def error_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """5xx share of the /predict requests between two scrapes; None when there were none."""
    total, errors = after[0] - before[0], after[1] - before[1]
    return None if total <= 0 else errors / total


# ------------------------------------------------------------------------------------------ guards


class GuardResult(Strict):
    name: str
    status: GuardStatus
    value: float | None = None
    threshold: float | None = None
    detail: str = ""


class StepReadout(Strict):
    """What one step (or observation window) saw and how its guards came out."""

    step: str
    policy: dict[str, Any]
    started_at: datetime
    ended_at: datetime
    champion_entities: int
    challenger_entities: int
    guards: list[GuardResult]

    @property
    def breaches(self) -> list[GuardResult]:
        return [g for g in self.guards if g.status == "breach"]

    @property
    def breached(self) -> bool:
        return bool(self.breaches)

    @property
    def insufficient(self) -> bool:
        """Too little traffic for the distribution guards: the step cannot be judged yet."""
        return any(g.status == "skipped" and g.detail.startswith(TOO_FEW) for g in self.guards)

    def evidence(self) -> dict[str, Any]:
        return {"step": self.step, "policy": self.policy,
                "entities": {"champion": self.champion_entities, "challenger": self.challenger_entities},
                "guards": {g.name: {"status": g.status, "value": g.value, "threshold": g.threshold}
                           for g in self.guards}}


def _judge(name: str, value: float | None, threshold: float | None, worse_if_above: bool = True,
           skip: str = "") -> GuardResult:
    if threshold is None:
        return GuardResult(name=name, status="skipped", value=value, detail="guard off")
    if value is None or skip:
        return GuardResult(name=name, status="skipped", value=value, threshold=threshold, detail=skip or "no data")
    bad = value > threshold if worse_if_above else value < threshold
    return GuardResult(name=name, status="breach" if bad else "pass", value=round(value, 6), threshold=threshold)


def evaluate_guards(
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    guards: Guards,
    outcomes: pd.DataFrame | None = None,
    error_rate_value: float | None = None,
    challenger_failures: int | None = None,
    *,
    ceiling_ms: float,
    champion_window: pd.DataFrame | None = None,
    before: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> list[GuardResult]:
    """Every guard of `guards` on the two arms' logged predictions (see the module docstring).

    `champion` is the champion's reference for the distribution guards (its traffic over the rollout);
    `challenger` the challenger's rows of the step window. The latency guards compare the challenger with
    `champion_window`, the champion's rows of the same window (`champion` when not given), or, when it
    answered too few requests there, with the champion's rows of `before` (champion rows, challenger
    rows of the preceding window of the same length); `ceiling_ms` is the profile's absolute p99 ceiling.
    """
    ch_e, cp_e = per_entity(challenger), per_entity(champion)
    out = [_error_guard(len(challenger), challenger_failures, error_rate_value, guards.max_error_rate)]
    window = (champion if champion_window is None else champion_window, challenger)
    out += _latency_guards(window, before, guards, ceiling_ms)
    few = ""
    if len(ch_e) < guards.min_predictions or len(cp_e) < guards.min_predictions:
        few = (f"{TOO_FEW} entities (champion {len(cp_e)}, challenger {len(ch_e)}; "
               f"need {guards.min_predictions} each)")
    shift = [_psi_guard(cp_e["probability"].to_numpy(float), ch_e["probability"].to_numpy(float), guards, few)]
    diff = abs(float(ch_e["probability"].mean() - cp_e["probability"].mean())) if not few else None
    shift.append(_judge("mean_probability_diff", diff, guards.max_mean_probability_diff, skip=few))
    out += [reported(g, guards) for g in shift]
    out.append(_auc_guard(champion, challenger, guards, outcomes))
    return out


def reported(result: GuardResult, guards: Guards) -> GuardResult:
    """A prediction-shift guard under `prediction_shift: report`: its figure is shown and decides nothing
    (neither a breach nor, with too few entities, a reason to hold the step)."""
    if guards.prediction_shift != "report" or result.detail == "guard off":
        return result
    verdict = {"breach": "would breach", "pass": "within threshold"}.get(result.status, result.detail or "no data")
    return result.model_copy(update={"status": "report", "detail": f"reported, not judged ({verdict}"
                                     + (f"; {result.detail}" if result.detail and result.status != "skipped" else "")
                                     + "): a candidate retrained on drifted data is expected to predict differently"})


def _error_guard(answered: int, failed: int | None, http_rate: float | None, threshold: float | None) -> GuardResult:
    """The worse of: the challenger's failed share of its rows (its failures are answered by the champion,
    so they never show as 5xx) and the service-wide 5xx share of /predict requests."""
    tried = answered + (failed or 0)
    arm_rate = (failed or 0) / tried if failed is not None and tried else None
    values = [v for v in (arm_rate, http_rate) if v is not None]
    result = _judge("error_rate", max(values) if values else None, threshold)
    detail = (f"challenger failed {failed} of {tried} rows; " if failed is not None else "") + (
        f"service 5xx share {http_rate:.4f}" if http_rate is not None else "no /predict requests counted")
    return result.model_copy(update={"detail": f"{result.detail}; {detail}" if result.detail else detail})


class _Requests(NamedTuple):
    """One arm's requests (one latency each), and those the arm answered alone."""

    every: pd.DataFrame
    alone: pd.DataFrame


def _requests(rows: pd.DataFrame, other: pd.DataFrame) -> _Requests:
    """A request whose rows went to both arms (a batch) was timed as a whole: its latency is the sum of
    both models' work, so it is "alone" only when `other` answered none of its rows. Shadow rows are timed
    on their own (the challenger's background scoring), so they never make a request shared."""
    every = rows.drop_duplicates("request_id")
    live_other = other.loc[~other["shadow"].astype(bool), "request_id"]
    shared = every["request_id"].isin(live_other) & ~every["shadow"].astype(bool)
    return _Requests(every=every, alone=every[~shared])


def _champion_requests(window: tuple[pd.DataFrame, pd.DataFrame], before: tuple[pd.DataFrame, pd.DataFrame] | None,
                       need: int) -> tuple[_Requests, str]:
    """The champion's requests in the step window; in the preceding window when it answered too few in
    this one (at 100% or on the green slot it answers none), which is the nearest load the machine had."""
    in_window = _requests(*window)
    if len(in_window.every) >= need or before is None:
        return in_window, "same window"
    earlier = _requests(*before)
    if len(earlier.every) <= len(in_window.every):
        return in_window, "same window"
    return earlier, f"preceding window (it answered {len(in_window.every)} requests in this one)"


def _joint_basis(champion: _Requests, challenger: _Requests, need: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Like for like: the requests each arm answered alone when both have enough of them, else every request
    of both (a shared batch then counts on both sides with the same latency). Alone on one side and every
    request on the other would compare single requests with batches."""
    if len(champion.alone) >= need and len(challenger.alone) >= need:
        return champion.alone, challenger.alone, "requests each arm answered alone"
    return champion.every, challenger.every, "all requests of both arms (too few answered by one arm alone)"


def _latency_guards(window: tuple[pd.DataFrame, pd.DataFrame], before: tuple[pd.DataFrame, pd.DataFrame] | None,
                    guards: Guards, ceiling_ms: float) -> list[GuardResult]:
    """The challenger's p99 against the champion's (same window) and against the profile's ceiling."""
    need = guards.min_requests
    challenger = _requests(window[1], window[0])
    champion, where = _champion_requests(window, before, need)
    return [_vs_champion_guard(champion, challenger, where, guards), _ceiling_guard(challenger, guards, ceiling_ms)]


def _vs_champion_guard(champion: _Requests, challenger: _Requests, where: str, guards: Guards) -> GuardResult:
    name, ratio = "p99_latency_vs_champion", guards.max_p99_latency_ratio
    if ratio is None:
        return GuardResult(name=name, status="skipped", detail="guard off")
    need = guards.min_requests
    if len(champion.every) < need or len(challenger.every) < need:
        return GuardResult(name=name, status="skipped", detail=(
            f"{TOO_FEW} requests (champion {len(champion.every)} ({where}), challenger {len(challenger.every)}; "
            f"need {need} each)"))
    cp, ch, basis = _joint_basis(champion, challenger, need)
    champion_p99 = p99(cp["latency_ms"])
    limit = ratio * champion_p99 + guards.p99_latency_slack_ms
    result = _judge(name, p99(ch["latency_ms"]), round(limit, 6))
    over = share_over_limit(ch["latency_ms"], cp["latency_ms"], ratio, guards.p99_latency_slack_ms, guards)
    return _significant_latency(result, over, (
        f"champion p99 {champion_p99:.4g} ms ({where}) x {ratio:g} + {guards.p99_latency_slack_ms:g} ms; "
        f"{basis}: champion {len(cp)}, challenger {len(ch)}"))


LATENCY_CONFIDENCE = 0.95  # share of resamples in which the challenger's p99 must be over its limit


def share_over_limit(challenger_ms: pd.Series, champion_ms: pd.Series | None, ratio: float, constant_ms: float,
                     guards: Guards) -> float:
    """Share of bootstrap resamples in which the challenger's p99 exceeds ratio x the champion's p99 +
    `constant_ms` (without a champion: exceeds `constant_ms`, the ceiling). Both arms are resampled."""
    rng = np.random.default_rng(guards.seed)
    ch = challenger_ms.to_numpy(float)
    ch_p99 = np.percentile(ch[rng.integers(0, len(ch), (guards.bootstrap_samples, len(ch)))], 99, axis=1)
    limit = np.full(guards.bootstrap_samples, constant_ms)
    if champion_ms is not None:
        cp = champion_ms.to_numpy(float)
        cp_p99 = np.percentile(cp[rng.integers(0, len(cp), (guards.bootstrap_samples, len(cp)))], 99, axis=1)
        limit = ratio * cp_p99 + constant_ms
    return float(np.mean(ch_p99 > limit))


def _significant_latency(result: GuardResult, over: float, detail: str) -> GuardResult:
    """A latency breach stands only when the challenger's p99 was over the limit in LATENCY_CONFIDENCE of
    the resamples; otherwise it is noise from a few slow requests and passes, saying so."""
    significant = over >= LATENCY_CONFIDENCE
    status = "pass" if result.status == "breach" and not significant else result.status
    note = f"; over the limit in {over:.0%} of resamples"
    if result.status == "breach" and not significant:
        note += f" (not significant: a breach needs {LATENCY_CONFIDENCE:.0%})"
    return result.model_copy(update={"status": status, "detail": detail + note})


def _ceiling_guard(challenger: _Requests, guards: Guards, ceiling_ms: float) -> GuardResult:
    """The challenger's own latency: the requests it answered alone when there are enough (a shared batch
    also carries the champion's work), else all its requests (conservative)."""
    name, need = "p99_latency_ms", guards.min_requests
    if len(challenger.every) < need:
        return GuardResult(name=name, status="skipped", threshold=ceiling_ms,
                           detail=f"{TOO_FEW} requests (challenger {len(challenger.every)}; need {need})")
    basis, what = ((challenger.alone, "requests answered by the challenger alone") if len(challenger.alone) >= need
                   else (challenger.every, "all its requests (too few answered by the challenger alone)"))
    result = _judge(name, p99(basis["latency_ms"]), ceiling_ms)
    over = share_over_limit(basis["latency_ms"], None, 1.0, ceiling_ms, guards)
    return _significant_latency(result, over, f"profile ceiling; {what}: {len(basis)}")


def _psi_guard(reference: np.ndarray, current: np.ndarray, guards: Guards, few: str) -> GuardResult:
    """PSI of the challenger's probabilities against the champion's; a breach must be both above
    `max_psi` and significant: above the 95th percentile of PSI between random splits of the two arms
    pooled (a permutation test). On a few dozen entities PSI is noise: two samples of one distribution
    score 1.9 on average at 20 + 20 entities and 10 bins (measured), far above the usual 0.25."""
    if few or guards.max_psi is None:
        return _judge("psi", None, guards.max_psi, skip=few)
    value = psi(reference, current, guards.psi_bins)
    pooled = np.concatenate([reference, current])
    rng = np.random.default_rng(guards.seed)
    null = [psi(p[:len(reference)], p[len(reference):], guards.psi_bins)
            for p in (rng.permutation(pooled) for _ in range(guards.bootstrap_samples))]
    floor = float(np.quantile(null, 0.95))
    significant = value > floor
    result = _judge("psi", value, guards.max_psi)
    if result.status == "breach" and not significant:
        result = result.model_copy(update={"status": "pass"})
    return result.model_copy(update={"detail": f"95% of PSI with no shift (permutation): {floor:.4f}"
                                               + ("" if significant else " (not significant)")})


def _auc_guard(champion: pd.DataFrame, challenger: pd.DataFrame, guards: Guards, outcomes: pd.DataFrame | None
               ) -> GuardResult:
    """ROC AUC per arm on the outcomes joined honestly to each arm's predictions (see joined_arm)."""
    if guards.max_auc_drop is None:
        return GuardResult(name="auc_drop", status="skipped", detail="guard off")
    arms = [joined_arm(champion, outcomes), joined_arm(challenger, outcomes)]
    n = (len(arms[0][0]), len(arms[1][0]))
    if min(n) < guards.min_labelled:
        # awaited (the plan's deciding guard): too little to judge, so the step is held; else only reported
        wait = f"{TOO_FEW} outcomes to judge, and the plan awaits them ({NOT_ENOUGH_OUTCOMES})" if (
            guards.await_outcomes) else NOT_ENOUGH_OUTCOMES
        return GuardResult(name="auc_drop", status="skipped", threshold=guards.max_auc_drop,
                           detail=f"{wait}: entities with an outcome that arrived after their "
                                  f"prediction: champion {n[0]}, challenger {n[1]}; need {guards.min_labelled}")
    a_c, a_h = roc_auc(*arms[0]), roc_auc(*arms[1])
    if a_c is None or a_h is None:
        return GuardResult(name="auc_drop", status="skipped", threshold=guards.max_auc_drop,
                           detail="one arm's labels hold a single class")
    drop = a_c - a_h
    # interval of challenger - champion: a drop is significant when its upper bound is below zero
    lo, hi = bootstrap_diff("roc_auc", arms[0], arms[1], guards.bootstrap_samples, 0.95, guards.seed)
    significant = hi < 0
    status: GuardStatus = "breach" if drop > guards.max_auc_drop and significant else "pass"
    return GuardResult(name="auc_drop", status=status, value=round(drop, 6), threshold=guards.max_auc_drop,
                       detail=f"AUC champion {a_c:.4f} (n={n[0]}), challenger {a_h:.4f} (n={n[1]}); "
                              f"95% CI of challenger-champion [{lo:.4f}, {hi:.4f}]"
                              + ("" if significant else " (not significant)"))


def shadow_guards(rows: pd.DataFrame, champion: str, challenger: str, plan: ShadowPlan,
                  outcomes: pd.DataFrame | None = None, error_rate_value: float | None = None,
                  challenger_failures: int | None = None, *, ceiling_ms: float) -> list[GuardResult]:
    """Shadow readout: agreement of the two models on the same requests, plus the usual guards (the latency
    guards compare the challenger's background scoring with the champion's requests of the same window)."""
    champ, chall = split_arms(rows, champion, challenger, shadow=True)
    pairs = champ.merge(chall, on=["request_id", "entity"], suffixes=("_champion", "_challenger"))
    agreement = float((pairs["prediction_champion"] == pairs["prediction_challenger"]).mean()) if len(pairs) else None
    need = plan.guards.min_predictions
    few = "" if len(pairs) >= need else f"{TOO_FEW} shadowed rows ({len(pairs)}; need {need})"
    out = [reported(_judge("agreement", agreement, plan.min_agreement, worse_if_above=False, skip=few), plan.guards)]
    return out + evaluate_guards(champ, chall, plan.guards, outcomes, error_rate_value, challenger_failures,
                                 ceiling_ms=ceiling_ms)


# ------------------------------------------------------------------------------------- A/B readout


class ABReadout(Strict):
    metric: str
    champion_value: float | None
    challenger_value: float | None
    difference: float | None  # challenger - champion
    ci_low: float | None
    ci_high: float | None
    confidence: float
    n_champion: int
    n_challenger: int
    significant: bool
    winner: Literal["challenger", "champion", "none"]
    detail: str = ""


def ab_readout(champion: pd.DataFrame, challenger: pd.DataFrame, outcomes: pd.DataFrame | None, plan: ABTestPlan
               ) -> ABReadout:
    """Per-arm outcome metric on honestly joined outcomes (see joined_arm) and a bootstrap interval on the
    difference; significant if it excludes 0."""
    arms = [joined_arm(champion, outcomes), joined_arm(challenger, outcomes)]
    n = (len(arms[0][0]), len(arms[1][0]))
    base = {"metric": plan.metric, "confidence": plan.confidence, "n_champion": n[0], "n_challenger": n[1]}
    if min(n) < plan.min_labelled:
        return ABReadout(**base, champion_value=None, challenger_value=None, difference=None, ci_low=None,
                         ci_high=None, significant=False, winner="none",
                         detail=f"{NOT_ENOUGH_OUTCOMES}: entities with an outcome that arrived after their "
                                f"prediction: champion {n[0]}, challenger {n[1]} (need {plan.min_labelled} per arm)")
    vc, vh = metric_value(plan.metric, *arms[0]), metric_value(plan.metric, *arms[1])
    if vc is None or vh is None:
        return ABReadout(**base, champion_value=vc, challenger_value=vh, difference=None, ci_low=None,
                         ci_high=None, significant=False, winner="none", detail="an arm's labels hold one class")
    lo, hi = bootstrap_diff(plan.metric, arms[0], arms[1], plan.bootstrap_samples, plan.confidence, plan.seed)
    significant = bool(lo > 0 or hi < 0)
    better_up = HIGHER_IS_BETTER[plan.metric]
    winner: Literal["challenger", "champion", "none"] = "none"
    if significant:
        winner = "challenger" if (lo > 0) == better_up else "champion"
    return ABReadout(**base, champion_value=vc, challenger_value=vh, difference=vh - vc, ci_low=lo, ci_high=hi,
                     significant=significant, winner=winner,
                     detail=f"{plan.metric}: challenger - champion = {vh - vc:+.4f}, "
                            f"{plan.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
                            + (f"; {winner} is significantly better" if significant else "; not significant"))


# ---------------------------------------------------------------------------------------- decisions

Action = Literal["advance", "promote", "rollback", "hold", "extend"]


def judge_step(readout: StepReadout, guards: Guards, extensions: int) -> Literal["breach", "extend", "ok"]:
    """A breach; or too little traffic to judge (hold longer, up to `max_extensions`, then a breach:
    a challenger is never promoted on guards that were never judged); or ok."""
    if readout.breached:
        return "breach"
    if readout.insufficient:
        return "extend" if extensions < guards.max_extensions else "breach"
    return "ok"


def canary_next(plan: CanaryPlan, step_index: int, readout: StepReadout, extensions: int = 0) -> Action:
    """After step `step_index`: roll back on a breach, hold longer when unjudgeable, promote after the
    last step, else advance."""
    verdict = judge_step(readout, plan.guards, extensions)
    if verdict == "breach":
        return "rollback"
    if verdict == "extend":
        return "extend"
    return "promote" if step_index >= len(plan.steps) - 1 else "advance"


def failure_reason(readout: StepReadout) -> str:
    if readout.breached:
        return f"{readout.step}: guard breach " + ", ".join(
            f"{g.name}={g.value} (threshold {g.threshold})" for g in readout.breaches)
    return f"{readout.step}: not enough traffic to judge the guards after every extension (" + "; ".join(
        g.detail for g in readout.guards if g.detail.startswith(TOO_FEW)) + ")"


def ab_next(plan: ABTestPlan, readout: ABReadout, guards_breached: bool) -> Action:
    if guards_breached or readout.winner == "champion":
        return "rollback"
    if readout.winner == "challenger":
        return "promote"
    return "hold" if plan.on_inconclusive == "hold" else "rollback"


def gradual_shares(current: float, plan: CanaryPlan) -> list[float]:
    """The shares a gradual rollback passes through: the plan's lower steps, descending, then 0."""
    return [s.share for s in reversed(plan.steps) if s.share < current] + [0.0]


class RolloutDecision(Strict):
    """The end of a rollout, with everything that led to it (audit evidence and the run artifact)."""

    model: str
    plan: str
    strategy: Strategy
    champion: str
    challenger: str
    outcome: Outcome
    reason: str
    steps: list[StepReadout] = []
    ab: ABReadout | None = None
    approval: dict[str, Any] | None = None
    rollback_path: list[float] = Field(default_factory=list, description="gradual rollback: challenger shares "
                                       "held on the way down, ending at 0")
    decided_at: datetime  # the project clock's time (the flow passes it)

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plan": self.plan, "strategy": self.strategy, "champion": self.champion,
                               "challenger": self.challenger, "outcome": self.outcome,
                               "steps": [s.evidence() for s in self.steps]}
        if self.ab is not None:
            out["ab_readout"] = self.ab.model_dump()
        if self.approval is not None:
            out["approval"] = self.approval
        if self.rollback_path:
            out["rollback_path"] = self.rollback_path
        return out

    def markdown(self) -> str:
        verdict = {"promoted": "promoted to champion", "rolled_back": "rolled back (champion kept)",
                   "held": "held (no alias moved)", "rejected": "rejected at approval (champion kept)"}[self.outcome]
        lines = [f"# Rollout of {self.model} v{self.challenger}: {verdict}", "",
                 f"- plan **{self.plan}** (strategy `{self.strategy}`), champion v{self.champion}",
                 f"- decision: **{self.outcome}** — {self.reason}",
                 f"- decided at {self.decided_at.isoformat()}", ""]
        if self.rollback_path:
            lines[-1:-1] = ["- gradual rollback, challenger share: "
                            + " → ".join(f"{s:.0%}" for s in self.rollback_path)]
        for s in self.steps:
            lines += [f"## {s.step} — {'BREACH' if s.breached else 'ok'}", "",
                      f"policy `{s.policy}`; entities: champion {s.champion_entities}, "
                      f"challenger {s.challenger_entities}; {s.started_at:%H:%M:%S}–{s.ended_at:%H:%M:%S} UTC", "",
                      "| guard | status | value | threshold | detail |", "|---|---|---|---|---|"]
            lines += [f"| {g.name} | {g.status} | {_fmt(g.value)} | {_fmt(g.threshold)} | {g.detail} |"
                      for g in s.guards]
            lines.append("")
        if self.ab is not None:
            a = self.ab
            lines += ["## A/B readout", "", f"| arm | {a.metric} | labelled entities |", "|---|---|---|",
                      f"| champion v{self.champion} | {_fmt(a.champion_value)} | {a.n_champion} |",
                      f"| challenger v{self.challenger} | {_fmt(a.challenger_value)} | {a.n_challenger} |", "",
                      f"{a.detail}", ""]
        if self.approval is not None:
            lines += ["## Approval", "", f"`{self.approval}`", ""]
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"
