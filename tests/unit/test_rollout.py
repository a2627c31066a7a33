"""Rollout policy: plan parsing, guards, canary progression, the A/B readout (pure logic, no service)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flywheel.errors import ConfigError
from flywheel.rollout import (
    ABTestPlan,
    CanaryPlan,
    GuardResult,
    Guards,
    RolloutDecision,
    ShadowPlan,
    StepReadout,
    ab_next,
    ab_readout,
    canary_next,
    error_rate,
    evaluate_guards,
    failure_reason,
    gradual_shares,
    judge_step,
    load_plans,
    predict_request_counts,
    psi,
    roc_auc,
    shadow_guards,
)
from tests.conftest import PROJECT

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
CEILING = 50.0  # the profile's p99 ceiling (rollout.max_p99_latency_ms) in these tests
CI_CEILING = 200.0  # configs/ci.yaml
SNAPSHOT = datetime(2026, 11, 1, tzinfo=UTC)  # the event time of the feature snapshot every prediction used


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(version: str, probs: np.ndarray, start: int = 0, latency: float = 5.0, shadow: bool = False,
          request_ids: list[str] | None = None) -> pd.DataFrame:
    n = len(probs)
    return pd.DataFrame({
        "at": [NOW] * n,
        "request_id": request_ids or [f"r{start + i}" for i in range(n)],
        "entity": [str(start + i) for i in range(n)],
        "version": [version] * n,
        "arm": ["champion" if version == "1" else "challenger"] * n,
        "probability": probs,
        "prediction": probs >= 0.5,
        "latency_ms": [latency] * n,
        "shadow": [shadow] * n,
        "feature_time": [SNAPSHOT] * n,
    })


# ------------------------------------------------------------------------------------------- plans


def test_project_plan_file_parses_with_default_canary_ramp() -> None:
    plans = load_plans(PROJECT / "configs" / "rollout.yaml")
    canary = plans.select()
    assert isinstance(canary, CanaryPlan)
    assert [s.share for s in canary.steps] == [0.05, 0.5, 1.0]
    assert {p.strategy for p in plans.plans.values()} == {"shadow", "canary", "blue_green", "ab_test"}
    assert plans.select("ab_test").strategy == "ab_test"
    g = canary.guards
    assert (g.max_p99_latency_ratio, g.p99_latency_slack_ms, g.min_requests) == (1.5, 2.0, 20)


@pytest.mark.parametrize(("profile", "ceiling"), [("local", 50.0), ("ci", CI_CEILING), ("production", 10.0)])
def test_latency_ceiling_is_set_per_profile(profile: str, ceiling: float) -> None:
    from flywheel.settings import load_settings

    assert load_settings(profile, PROJECT / "configs", environ={}).rollout.max_p99_latency_ms == ceiling


def test_a_bad_latency_ceiling_fails_naming_its_source() -> None:
    from flywheel.settings import load_settings

    with pytest.raises(ConfigError) as err:
        load_settings("local", PROJECT / "configs", environ={"FLYWHEEL_ROLLOUT__MAX_P99_LATENCY_MS": "0"})
    assert "FLYWHEEL_ROLLOUT__MAX_P99_LATENCY_MS" in str(err.value) and "rollout.max_p99_latency_ms" in str(err.value)


def test_shared_guards_are_overridden_key_by_key(tmp_path: Path) -> None:
    plans = load_plans(_write(tmp_path, {
        "default": "c",
        "guards": {"max_psi": 0.3, "max_error_rate": 0.05},
        "plans": {"c": {"strategy": "canary", "steps": [{"share": 0.5, "hold_s": 1}],
                        "guards": {"max_psi": 0.9}}},
    }))
    g = plans.select().guards
    assert (g.max_psi, g.max_error_rate) == (0.9, 0.05)


@pytest.mark.parametrize(("data", "key", "message"), [
    ({"default": "c", "plans": {"c": {"strategy": "rainbow"}}}, "plans.c", "does not match any of the expected tags"),
    ({"default": "c", "plans": {"c": {"strategy": "canary", "steps": [{"share": 0.5, "hold_s": 1},
                                                                       {"share": 0.2, "hold_s": 1}]}}},
     "plans.c.canary.steps", "strictly increase"),
    ({"default": "c", "plans": {"c": {"strategy": "canary", "steps": [{"share": 1.5, "hold_s": 1}]}}},
     "plans.c.canary.steps.0.share", "less than or equal to 1"),
    ({"default": "c", "plans": {"c": {"strategy": "blue_green", "hold_s": 1, "colour": "teal"}}},
     "plans.c.blue_green.colour", "Extra inputs are not permitted"),
    ({"default": "x", "plans": {"c": {"strategy": "blue_green", "hold_s": 1}}}, "", "default plan 'x'"),
    ({"default": "c", "guards": {"max_p99_latency_ms": 250}, "plans": {"c": {"strategy": "blue_green", "hold_s": 1}}},
     "guards", "rollout.max_p99_latency_ms in configs/base.yaml or configs/<profile>.yaml"),
    ({"default": "c", "plans": {"c": {"strategy": "blue_green", "hold_s": 1, "guards": {"min_requests": 0}}}},
     "plans.c.blue_green.guards.min_requests", "greater than or equal to 1"),
    ({"default": "c", "plans": {"c": {"strategy": "blue_green", "hold_s": 1,
                                      "guards": {"max_p99_latency_ratio": 0.5}}}},
     "plans.c.blue_green.guards.max_p99_latency_ratio", "greater than or equal to 1"),
])
def test_invalid_plans_fail_naming_file_and_key(tmp_path: Path, data: dict, key: str, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_plans(path)
    text = str(err.value)
    assert str(path) in text and message in text, text
    if key:
        assert key in text, text


def test_unknown_plan_name_is_refused(tmp_path: Path) -> None:
    plans = load_plans(PROJECT / "configs" / "rollout.yaml")
    with pytest.raises(ConfigError, match="no such plan"):
        plans.select("yolo")


# ------------------------------------------------------------------------------------------ guards


def test_similar_arms_pass_every_guard() -> None:
    rng = np.random.default_rng(0)
    champ = _rows("1", rng.beta(2, 5, 400))
    chall = _rows("2", rng.beta(2, 5, 300), start=1000)
    results = {g.name: g for g in evaluate_guards(champ, chall, Guards(), None, error_rate_value=0.0,
                                                  ceiling_ms=CEILING)}
    assert {n: g.status for n, g in results.items()} == {
        "error_rate": "pass", "p99_latency_vs_champion": "pass", "p99_latency_ms": "pass", "psi": "pass",
        "mean_probability_diff": "pass", "auc_drop": "skipped"}
    assert results["psi"].value < 0.2


def test_constant_challenger_breaches_distribution_guards() -> None:
    rng = np.random.default_rng(1)
    champ = _rows("1", rng.beta(2, 5, 400))
    chall = _rows("2", np.full(300, 0.27), start=1000)
    results = {g.name: g for g in evaluate_guards(champ, chall, Guards(), None, ceiling_ms=CEILING)}
    assert results["psi"].status == "breach" and results["psi"].value > 1
    assert results["error_rate"].status == "skipped"  # no requests counted: not judged


def test_service_error_rate_breaches_alone() -> None:
    rng = np.random.default_rng(2)
    champ = _rows("1", rng.beta(2, 5, 100))
    chall = _rows("2", rng.beta(2, 5, 100), start=1000)
    results = evaluate_guards(champ, chall, Guards(), None, error_rate_value=0.2, ceiling_ms=CEILING)
    assert [g.name for g in results if g.status == "breach"] == ["error_rate"]


def test_challenger_failures_breach_the_error_guard_without_any_5xx() -> None:
    rng = np.random.default_rng(3)
    champ = _rows("1", rng.beta(2, 5, 200))
    chall = _rows("2", rng.beta(2, 5, 97), start=1000)
    g = Guards(max_error_rate=0.02)
    # 3 failed rows of 100 the challenger was asked for: 3% > 2%, though the service answered every request
    (bad,) = [r for r in evaluate_guards(champ, chall, g, None, 0.0, challenger_failures=3, ceiling_ms=CEILING)
              if r.name == "error_rate"]
    assert (bad.status, bad.value) == ("breach", 0.03) and "challenger failed 3 of 100 rows" in bad.detail
    (ok,) = [r for r in evaluate_guards(champ, chall, g, None, 0.0, challenger_failures=1, ceiling_ms=CEILING)
             if r.name == "error_rate"]
    assert (ok.status, ok.value) == ("pass", round(1 / 98, 6))
    # the service-wide 5xx share still counts when it is the worse of the two
    (http,) = [r for r in evaluate_guards(champ, chall, g, None, 0.5, challenger_failures=0, ceiling_ms=CEILING)
               if r.name == "error_rate"]
    assert (http.status, http.value) == ("breach", 0.5) and "service 5xx share 0.5000" in http.detail


def _breaches(champ: pd.DataFrame, chall: pd.DataFrame, guards: Guards, **kw: object) -> dict[str, GuardResult]:
    """Every guard by name, for tests that check which ones breach (no 5xx: the error guard is judged)."""
    return {g.name: g for g in evaluate_guards(champ, chall, guards, None, 0.0, **{"ceiling_ms": CEILING, **kw})}


def _statuses(results: dict[str, GuardResult]) -> dict[str, str]:
    return {name: g.status for name, g in results.items()}


JUDGED = {"error_rate": "pass", "p99_latency_vs_champion": "pass", "p99_latency_ms": "pass", "psi": "pass",
          "mean_probability_diff": "pass", "auc_drop": "skipped"}


def test_a_challenger_three_times_slower_than_the_champion_breaches_alone() -> None:
    rng = np.random.default_rng(7)
    p = rng.beta(2, 5, 100)
    champ = _rows("1", p, latency=10.0)
    chall = _rows("2", p, start=1000, latency=30.0)  # same predictions: only latency differs
    results = _breaches(champ, chall, Guards())
    assert _statuses(results) == {**JUDGED, "p99_latency_vs_champion": "breach"}, results
    lat = results["p99_latency_vs_champion"]
    assert (lat.value, lat.threshold) == (30.0, 17.0), lat  # 1.5 x 10 ms + 2 ms
    assert "champion p99 10 ms (same window)" in lat.detail and "answered alone" in lat.detail, lat.detail
    assert results["p99_latency_ms"].value == 30.0 and results["p99_latency_ms"].threshold == CEILING


def test_one_slow_request_among_a_few_dozen_is_not_a_significant_breach() -> None:
    # CI saw it: at the 100% step a p99 over ~30 requests is their slowest one, and one request held up by the
    # busy machine (40 ms against the champion's 10) rolled a good challenger back
    rng = np.random.default_rng(12)
    p = rng.beta(2, 5, 30)
    champ = _rows("1", p, latency=10.0)
    chall = _rows("2", p, start=1000, latency=10.0)
    chall.loc[chall.index[-1], "latency_ms"] = 40.0
    results = _breaches(champ, chall, Guards())
    lat = results["p99_latency_vs_champion"]
    assert lat.value > lat.threshold, "the plain p99 is over the limit"
    assert lat.status == "pass" and "not significant" in lat.detail, lat
    # the same single outlier over the profile's ceiling: not a breach of the ceiling either
    over_ceiling = chall.copy()
    over_ceiling.loc[over_ceiling.index[-1], "latency_ms"] = 10 * CEILING
    ceiling = _breaches(champ, over_ceiling, Guards())["p99_latency_ms"]
    assert ceiling.value > CEILING and ceiling.status == "pass" and "not significant" in ceiling.detail, ceiling


def test_a_challenger_slow_throughout_breaches_at_a_few_dozen_requests() -> None:
    rng = np.random.default_rng(13)
    p = rng.beta(2, 5, 30)
    champ = _rows("1", p, latency=10.0)
    champ["latency_ms"] = rng.normal(10.0, 1.0, 30)
    chall = _rows("2", p, start=1000)
    chall["latency_ms"] = rng.normal(30.0, 3.0, 30)
    lat = _breaches(champ, chall, Guards())["p99_latency_vs_champion"]
    assert lat.status == "breach" and "over the limit in 100% of resamples" in lat.detail, lat
    chall["latency_ms"] = rng.normal(10 * CEILING, 3.0, 30)
    assert _breaches(champ, chall, Guards())["p99_latency_ms"].status == "breach"


def test_both_arms_slow_alike_pass_under_the_ceiling() -> None:
    # a busy machine: both arms at 40 ms, the same model would read 5 ms on a quiet one
    rng = np.random.default_rng(8)
    p = rng.beta(2, 5, 100)
    results = _breaches(_rows("1", p, latency=40.0), _rows("2", p, start=1000, latency=40.0), Guards())
    assert _statuses(results) == JUDGED, results


def test_both_arms_above_the_ceiling_breach_it_alone() -> None:
    rng = np.random.default_rng(9)
    p = rng.beta(2, 5, 100)
    results = _breaches(_rows("1", p, latency=80.0), _rows("2", p, start=1000, latency=80.0), Guards())
    assert _statuses(results) == {**JUDGED, "p99_latency_ms": "breach"}, results
    assert (results["p99_latency_ms"].value, results["p99_latency_ms"].threshold) == (80.0, CEILING)


def test_too_few_requests_are_not_judged_and_hold_the_step() -> None:
    rng = np.random.default_rng(10)
    champ = _rows("1", rng.beta(2, 5, 100), latency=5.0)
    # 60 entities (enough for the distribution guards) in 2 batch requests of 30: too few for a p99
    chall = _rows("2", rng.beta(2, 5, 60), start=1000, latency=500.0,
                  request_ids=[f"batch{i // 30}" for i in range(60)])
    results = _breaches(champ, chall, Guards(min_requests=20))
    for name in ("p99_latency_vs_champion", "p99_latency_ms"):
        assert results[name].status == "skipped" and results[name].detail.startswith("too few requests"), results
        assert "challenger 2" in results[name].detail
    assert results["psi"].status == "pass", "the distribution guards are judged on entities"
    readout = StepReadout(step="s", policy={}, started_at=NOW, ended_at=NOW, champion_entities=100,
                          challenger_entities=60, guards=list(results.values()))
    assert readout.insufficient and not readout.breached
    assert canary_next(CanaryPlan(strategy="canary"), 0, readout, 0) == "extend"
    # too few on the champion's side: the comparison waits, the ceiling is judged on the challenger alone
    results = _breaches(champ.head(5), _rows("2", rng.beta(2, 5, 100), start=1000), Guards(min_predictions=5))
    assert results["p99_latency_vs_champion"].status == "skipped", results
    assert "too few requests (champion 5 (same window)" in results["p99_latency_vs_champion"].detail
    assert results["p99_latency_ms"].status == "pass"


def test_a_champion_without_requests_in_the_window_is_timed_in_the_preceding_one() -> None:
    # at 100% (or on the green slot) the champion answers nothing in the step: its p99 comes from the
    # window of the same length before it, where the machine's load was the nearest
    rng = np.random.default_rng(11)
    history = _rows("1", rng.beta(2, 5, 100), latency=10.0)
    chall = _rows("2", rng.beta(2, 5, 100), start=1000, latency=30.0)
    empty = history.head(0)
    earlier = (_rows("1", rng.beta(2, 5, 40), start=5000, latency=10.0), empty)
    results = _breaches(history, chall, Guards(), champion_window=empty, before=earlier)
    lat = results["p99_latency_vs_champion"]
    assert lat.status == "breach" and lat.threshold == 17.0, lat
    assert "preceding window (it answered 0 requests in this one)" in lat.detail, lat.detail
    # no earlier traffic either: not judged (the step is held), never passed unjudged
    results = _breaches(history, chall, Guards(), champion_window=empty, before=(empty, empty))
    assert results["p99_latency_vs_champion"].detail.startswith("too few requests"), results


def test_latency_is_compared_on_requests_each_arm_answered_alone() -> None:
    rng = np.random.default_rng(6)
    # 10 batch requests shared by both arms were timed as a whole (400 ms, logged on both arms' rows);
    # 30 single-entity requests per arm were answered by one arm alone
    shared = [f"b{i}" for i in range(10)]
    champ = pd.concat([_rows("1", rng.beta(2, 5, 30), latency=5.0),
                       _rows("1", rng.beta(2, 5, 10), start=500, latency=400.0, request_ids=shared)])
    alone = _rows("2", rng.beta(2, 5, 30), start=1000, latency=6.0)
    mixed = _rows("2", rng.beta(2, 5, 10), start=2000, latency=400.0, request_ids=shared)
    g = Guards(min_requests=20, min_predictions=20)
    results = _breaches(champ, pd.concat([alone, mixed]), g)
    vs, ceiling = results["p99_latency_vs_champion"], results["p99_latency_ms"]
    assert (vs.status, vs.value, vs.threshold) == ("pass", 6.0, 9.5), vs  # 6 ms vs 1.5 x 5 ms + 2 ms
    assert "requests each arm answered alone: champion 30, challenger 30" in vs.detail, vs.detail
    assert (ceiling.status, ceiling.value) == ("pass", 6.0) and "answered by the challenger alone: 30" in ceiling.detail
    # too few answered alone by the challenger: both arms are judged on every request (the shared batches
    # count on both sides, so the comparison stays like for like) and the ceiling on all of the challenger's
    results = _breaches(champ, pd.concat([alone.head(12), mixed]), g)
    vs, ceiling = results["p99_latency_vs_champion"], results["p99_latency_ms"]
    assert vs.status == "pass" and "all requests of both arms" in vs.detail, vs
    assert ceiling.status == "breach" and "too few answered by the challenger alone" in ceiling.detail, ceiling


def _guard(champ: pd.DataFrame, chall: pd.DataFrame, guards: Guards, name: str) -> GuardResult:
    return next(r for r in evaluate_guards(champ, chall, guards, None, ceiling_ms=CEILING) if r.name == name)


def test_psi_breaches_only_when_the_shift_is_significant() -> None:
    rng = np.random.default_rng(4)
    g = Guards(min_predictions=20, max_mean_probability_diff=None)
    # a real shift on a few entities is significant (same-distribution arms: the next test)
    shifted = _guard(_rows("1", rng.beta(2, 5, 25)), _rows("2", rng.beta(6, 2, 25), start=1000), g, "psi")
    assert shifted.status == "breach" and "not significant" not in shifted.detail, shifted
    # with plenty of traffic the permutation floor is small and the usual threshold governs
    big = _guard(_rows("1", rng.beta(2, 5, 2000)), _rows("2", rng.beta(3, 5, 2000), start=5000), g, "psi")
    floor = float(big.detail.split(": ")[1].split(" ")[0])
    assert floor < 0.05 and big.status == ("breach" if big.value > g.max_psi else "pass"), big


def test_good_challengers_on_small_traffic_are_rarely_rolled_back_on_psi() -> None:
    rng = np.random.default_rng(5)
    g = Guards(min_predictions=20)
    guards = [_guard(_rows("1", rng.beta(2, 5, 30)), _rows("2", rng.beta(2, 5, 30), start=1000), g, "psi")
              for _ in range(40)]
    # PSI alone would roll back nearly all of them: on 30 + 30 entities it is far above 0.25 by chance
    assert sum(r.value > g.max_psi for r in guards) >= 36
    breaches = sum(r.status == "breach" for r in guards)
    assert breaches <= 4, f"{breaches}/40 same-distribution canaries rolled back (a 5% test expects ~2)"


def test_too_few_entities_are_not_judged() -> None:
    champ = _rows("1", np.full(5, 0.2))
    chall = _rows("2", np.full(5, 0.9), start=100)
    results = {g.name: g for g in evaluate_guards(champ, chall, Guards(min_predictions=20), None,
                                                  ceiling_ms=CEILING)}
    assert results["psi"].status == "skipped" and "too few" in results["psi"].detail


def _labelled(n: int, skill: float, start: int, version: str, rng: np.random.Generator,
              arrived: datetime = NOW + timedelta(hours=1)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions (at NOW) and the outcomes of their snapshots, arrived at `arrived`."""
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + skill * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    rows = _rows(version, p, start=start)
    return rows, pd.DataFrame({"entity": rows["entity"], "event_time": SNAPSHOT, "y": y, "arrived_at": arrived})


def test_auc_drop_breaches_only_when_large_and_significant() -> None:
    rng = np.random.default_rng(3)
    champ, lc = _labelled(600, 0.6, 0, "1", rng)
    bad, lb = _labelled(600, 0.0, 10_000, "2", rng)
    labels = pd.concat([lc, lb])
    g = Guards(max_psi=None, max_mean_probability_diff=None, min_labelled=100)
    (auc,) = [r for r in evaluate_guards(champ, bad, g, labels, ceiling_ms=CEILING) if r.name == "auc_drop"]
    assert auc.status == "breach" and auc.value > 0.3, auc
    # the same model on both arms: no breach
    good, lg = _labelled(600, 0.6, 20_000, "2", rng)
    (auc,) = [r for r in evaluate_guards(champ, good, g, pd.concat([lc, lg]), ceiling_ms=CEILING)
              if r.name == "auc_drop"]
    assert auc.status == "pass", auc


def test_auc_guard_counts_only_outcomes_that_arrived_after_the_predictions() -> None:
    rng = np.random.default_rng(3)
    g = Guards(max_psi=None, max_mean_probability_diff=None, min_labelled=100)
    # the same breach as above, but every label was already known when the predictions were made
    champ, lc = _labelled(600, 0.6, 0, "1", rng, arrived=NOW - timedelta(days=1))
    bad, lb = _labelled(600, 0.0, 10_000, "2", rng, arrived=NOW - timedelta(days=1))
    results = {r.name: r for r in evaluate_guards(champ, bad, g, pd.concat([lc, lb]), ceiling_ms=CEILING)}
    auc = results["auc_drop"]
    assert auc.status == "skipped" and auc.detail.startswith("not enough outcomes yet"), auc
    assert "champion 0, challenger 0" in auc.detail
    # the only guard that says so; and a missing outcome never makes the step unjudgeable
    assert [r.name for r in results.values() if "outcomes" in r.detail] == ["auc_drop"]
    readout = StepReadout(step="s", policy={}, started_at=NOW, ended_at=NOW, champion_entities=600,
                          challenger_entities=600, guards=list(results.values()))
    assert not readout.insufficient and not readout.breached
    # outcomes of another snapshot of the same entities (an older one) do not count either
    older = pd.concat([lc, lb]).assign(event_time=SNAPSHOT - timedelta(days=7), arrived_at=NOW + timedelta(hours=1))
    (auc,) = [r for r in evaluate_guards(champ, bad, g, older, ceiling_ms=CEILING) if r.name == "auc_drop"]
    assert auc.status == "skipped" and "not enough outcomes yet" in auc.detail


def test_auc_guard_counts_an_entity_predicted_twice_once_per_arm() -> None:
    rng = np.random.default_rng(9)
    champ, lc = _labelled(150, 0.6, 0, "1", rng)
    chall, lh = _labelled(150, 0.6, 10_000, "2", rng)
    g = Guards(max_psi=None, max_mean_probability_diff=None, min_labelled=100)
    labels = pd.concat([lc, lh])
    (once,) = [r for r in evaluate_guards(champ, chall, g, labels, ceiling_ms=CEILING) if r.name == "auc_drop"]
    twice = pd.concat([chall, chall.assign(at=NOW + timedelta(minutes=1), request_id="again")])
    (again,) = [r for r in evaluate_guards(champ, twice, g, labels, ceiling_ms=CEILING) if r.name == "auc_drop"]
    assert once.detail.count("(n=150)") == 2, once.detail  # both arms: 150 entities, each once
    assert once.detail == again.detail and once.value == again.value, (once, again)


def test_shadow_agreement_on_the_same_requests() -> None:
    rng = np.random.default_rng(4)
    p = rng.beta(2, 5, 200)
    champ = _rows("1", p)
    same = _rows("2", p + 0.01, shadow=True, request_ids=list(champ["request_id"]))
    flipped = _rows("2", 1 - p, shadow=True, request_ids=list(champ["request_id"]))
    plan = ShadowPlan(strategy="shadow", duration_s=1, min_agreement=0.9)
    ok = {g.name: g for g in shadow_guards(pd.concat([champ, same]), "1", "2", plan, ceiling_ms=CEILING)}
    bad = {g.name: g for g in shadow_guards(pd.concat([champ, flipped]), "1", "2", plan, ceiling_ms=CEILING)}
    assert ok["agreement"].status == "pass" and ok["agreement"].value > 0.95
    assert ok["p99_latency_vs_champion"].status == "pass"
    assert bad["agreement"].status == "breach"
    # the background scoring shares the champion's request ids, yet is timed on its own: a slow shadow
    # challenger is compared request for request with the champion, and breaches
    slow = _rows("2", p + 0.01, shadow=True, request_ids=list(champ["request_id"]), latency=20.0)
    slow_guards = {g.name: g for g in shadow_guards(pd.concat([champ, slow]), "1", "2", plan, ceiling_ms=CEILING)}
    assert [n for n, g in slow_guards.items() if g.status == "breach"] == ["p99_latency_vs_champion"], slow_guards


def test_psi_and_auc_helpers() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=2000)
    assert psi(a, rng.normal(size=2000)) < 0.05
    assert psi(a, rng.normal(1.5, 1, size=2000)) > 0.5
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_error_rate_from_prometheus_scrapes() -> None:
    text = (
        '# HELP flywheel_http_requests_total HTTP requests\n# TYPE flywheel_http_requests_total counter\n'
        'flywheel_http_requests_total{method="POST",path="/predict",status="200"} 90.0\n'
        'flywheel_http_requests_total{method="POST",path="/predict",status="503"} 10.0\n'
        'flywheel_http_requests_total{method="GET",path="/health",status="503"} 7.0\n'
    )
    after = predict_request_counts(text)
    assert after == (100.0, 10.0)
    assert error_rate((50.0, 0.0), after) == pytest.approx(0.2)
    assert error_rate(after, after) is None


# --------------------------------------------------------------------------------- canary decisions


def _readout(breach: bool) -> StepReadout:
    from flywheel.rollout import GuardResult

    g = GuardResult(name="psi", status="breach" if breach else "pass", value=2.0 if breach else 0.01, threshold=0.25)
    return StepReadout(step="s", policy={}, started_at=NOW, ended_at=NOW, champion_entities=10,
                       challenger_entities=10, guards=[g])


def test_canary_advances_step_by_step_then_promotes_and_rolls_back_on_breach() -> None:
    plan = CanaryPlan(strategy="canary")
    actions = [canary_next(plan, i, _readout(False)) for i in range(len(plan.steps))]
    assert actions == ["advance", "advance", "promote"]
    assert canary_next(plan, 1, _readout(True)) == "rollback"
    assert gradual_shares(0.5, plan) == [0.05, 0.0]
    assert gradual_shares(1.0, plan) == [0.5, 0.05, 0.0]


def test_a_step_with_too_little_traffic_is_extended_then_rolled_back() -> None:
    champ = _rows("1", np.full(5, 0.2))
    chall = _rows("2", np.full(5, 0.9), start=100)
    plan = CanaryPlan(strategy="canary", guards=Guards(min_predictions=20, max_extensions=2))
    guards = evaluate_guards(champ, chall, plan.guards, None, ceiling_ms=CEILING)
    readout = StepReadout(step="s", policy={}, started_at=NOW, ended_at=NOW, champion_entities=5,
                          challenger_entities=5, guards=guards)
    assert readout.insufficient and not readout.breached
    assert [canary_next(plan, 0, readout, k) for k in range(3)] == ["extend", "extend", "rollback"]
    assert "not enough traffic" in failure_reason(readout)


def test_decision_markdown_and_evidence_carry_guard_values() -> None:
    d = RolloutDecision(model="churn", plan="canary", strategy="canary", champion="1", challenger="2",
                        outcome="rolled_back", reason="psi breach", steps=[_readout(True)], decided_at=NOW)
    md = d.markdown()
    assert "rolled back" in md and "| psi | breach | 2 | 0.25 |" in md
    assert d.evidence()["steps"][0]["guards"]["psi"] == {"status": "breach", "value": 2.0, "threshold": 0.25}


# ------------------------------------------------------------------------------------------ A/B test


def test_ab_readout_detects_a_significantly_better_challenger() -> None:
    rng = np.random.default_rng(6)
    champ, lc = _labelled(800, 0.2, 0, "1", rng)
    chall, lh = _labelled(800, 0.6, 10_000, "2", rng)
    plan = ABTestPlan(strategy="ab_test", duration_s=1, bootstrap_samples=300)
    r = ab_readout(champ, chall, pd.concat([lc, lh]), plan)
    assert r.significant and r.winner == "challenger" and r.ci_low > 0, r
    assert r.challenger_value > r.champion_value
    assert ab_next(plan, r, guards_breached=False) == "promote"
    # lower-is-better metric: the worse arm is still the champion here
    r = ab_readout(champ, chall, pd.concat([lc, lh]), plan.model_copy(update={"metric": "brier"}))
    assert r.winner == "challenger" and r.ci_high < 0


def test_ab_readout_on_equal_arms_is_not_significant() -> None:
    rng = np.random.default_rng(7)
    champ, lc = _labelled(400, 0.4, 0, "1", rng)
    chall, lh = _labelled(400, 0.4, 10_000, "2", rng)
    plan = ABTestPlan(strategy="ab_test", duration_s=1, bootstrap_samples=300)
    r = ab_readout(champ, chall, pd.concat([lc, lh]), plan)
    assert not r.significant and r.winner == "none" and r.ci_low < 0 < r.ci_high, r
    assert ab_next(plan, r, guards_breached=False) == "hold"
    assert ab_next(plan.model_copy(update={"on_inconclusive": "rollback"}), r, False) == "rollback"
    assert ab_next(plan, r, guards_breached=True) == "rollback"


def test_ab_readout_needs_enough_labels() -> None:
    rng = np.random.default_rng(8)
    champ, lc = _labelled(30, 0.4, 0, "1", rng)
    chall, lh = _labelled(30, 0.4, 10_000, "2", rng)
    r = ab_readout(champ, chall, pd.concat([lc, lh]), ABTestPlan(strategy="ab_test", duration_s=1))
    assert r.winner == "none" and r.detail.startswith("not enough outcomes yet") and r.n_champion == 30


def test_ab_readout_ignores_labels_known_before_the_predictions() -> None:
    rng = np.random.default_rng(6)
    champ, lc = _labelled(800, 0.2, 0, "1", rng)
    chall, lh = _labelled(800, 0.6, 10_000, "2", rng)
    plan = ABTestPlan(strategy="ab_test", duration_s=1, bootstrap_samples=300)
    # the significant win of the first A/B test, had its labels been known before the test began
    known = pd.concat([lc, lh]).assign(arrived_at=NOW - timedelta(seconds=1))
    r = ab_readout(champ, chall, known, plan)
    assert (r.winner, r.n_champion, r.n_challenger) == ("none", 0, 0), r
    assert r.detail.startswith("not enough outcomes yet") and ab_next(plan, r, guards_breached=False) == "hold"


# ------------------------------------------------------------------------- candidates retrained after drift

AFTER_DRIFT = Guards(prediction_shift="report", await_outcomes=True, min_labelled=100)


def _shifted(rng: np.random.Generator, n: int = 400) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Champion and a challenger that predicts very differently (shifted probabilities) but ranks as well:
    what a model retrained on drifted data looks like; with outcomes that arrived after the predictions."""
    champ, lc = _labelled(n, 0.6, 0, "1", rng)
    chall, lh = _labelled(n, 0.6, 10_000, "2", rng)
    chall = chall.assign(probability=np.clip(chall["probability"] * 0.4 + 0.55, 0, 1))
    return champ, chall, pd.concat([lc, lh])


def _step(guards: list[GuardResult]) -> StepReadout:
    return StepReadout(step="s", policy={}, started_at=NOW, ended_at=NOW, champion_entities=400,
                       challenger_entities=400, guards=guards)


def test_the_project_plan_file_rolls_drift_retrained_candidates_out_by_the_after_drift_plan() -> None:
    plans = load_plans(PROJECT / "configs" / "rollout.yaml")
    assert plans.by_trigger == {"drift_detected": "after_drift"}
    plan = plans.plans["after_drift"]
    assert isinstance(plan, ShadowPlan) and plan.on_pass == "promote"
    assert (plan.guards.prediction_shift, plan.guards.await_outcomes) == ("report", True)
    assert plan.guards.max_psi == 0.25  # still computed and shown, with the shared threshold
    assert plans.plan_name_for(None, "drift_detected") == "after_drift"
    assert plans.plan_name_for(None, "retrain_requested") is None  # the default
    assert plans.plan_name_for("canary", "drift_detected") == "canary"  # a plan named for the run wins
    assert plans.plans["canary"].guards.prediction_shift == "judge"


def test_by_trigger_must_name_existing_plans(tmp_path: Path) -> None:
    data = yaml.safe_load((PROJECT / "configs" / "rollout.yaml").read_text())
    data["by_trigger"] = {"drift_detected": "gentle"}
    with pytest.raises(ConfigError, match="by_trigger names plans that do not exist"):
        load_plans(_write(tmp_path, data))


def test_a_shifted_candidate_breaches_the_prediction_shift_guards_of_an_ordinary_plan() -> None:
    champ, chall, _ = _shifted(np.random.default_rng(11))
    results = _breaches(champ, chall, Guards(min_labelled=100))
    assert results["psi"].status == "breach" and results["mean_probability_diff"].status == "breach"


def test_after_drift_the_prediction_shift_is_reported_and_the_outcomes_decide() -> None:
    champ, chall, labels = _shifted(np.random.default_rng(11))
    results = {g.name: g for g in evaluate_guards(champ, chall, AFTER_DRIFT, labels, 0.0, ceiling_ms=CEILING)}
    for name in ("psi", "mean_probability_diff"):
        assert results[name].status == "report" and "would breach" in results[name].detail, results[name]
        assert results[name].value > results[name].threshold  # the figure is still there to read
    assert results["auc_drop"].status == "pass", results["auc_drop"]
    readout = _step(list(results.values()))
    assert not readout.breached and not readout.insufficient
    plan = ShadowPlan(strategy="shadow", duration_s=1, guards=AFTER_DRIFT)
    assert judge_step(readout, plan.guards, 0) == "ok"


def test_after_drift_a_worse_candidate_is_still_rolled_back_on_its_outcomes() -> None:
    rng = np.random.default_rng(12)
    champ, lc = _labelled(400, 0.6, 0, "1", rng)
    bad, lb = _labelled(400, 0.0, 10_000, "2", rng)
    results = {g.name: g for g in evaluate_guards(champ, bad, AFTER_DRIFT, pd.concat([lc, lb]), 0.0,
                                                  ceiling_ms=CEILING)}
    assert [n for n, g in results.items() if g.status == "breach"] == ["auc_drop"], results
    assert judge_step(_step(list(results.values())), AFTER_DRIFT, 0) == "breach"


def test_after_drift_without_outcomes_yet_the_step_is_held_then_rolled_back_never_promoted() -> None:
    champ, chall, labels = _shifted(np.random.default_rng(13))
    early = labels.assign(arrived_at=NOW - timedelta(days=1))  # known before the predictions: never counted
    guards = AFTER_DRIFT.model_copy(update={"max_extensions": 2})
    results = {g.name: g for g in evaluate_guards(champ, chall, guards, early, 0.0, ceiling_ms=CEILING)}
    assert results["auc_drop"].status == "skipped" and "the plan awaits them" in results["auc_drop"].detail
    readout = _step(list(results.values()))
    assert readout.insufficient and not readout.breached
    assert [judge_step(readout, guards, k) for k in range(3)] == ["extend", "extend", "breach"]
    assert "outcomes" in failure_reason(readout)
    # an ordinary plan only reports the missing outcomes: they never hold its step
    plain = {g.name: g for g in evaluate_guards(champ, chall, Guards(min_labelled=100, max_psi=None,
                                                                     max_mean_probability_diff=None), early, 0.0,
                                                ceiling_ms=CEILING)}
    assert not _step(list(plain.values())).insufficient


def test_after_drift_too_few_entities_for_the_shift_guards_do_not_hold_the_step() -> None:
    champ, chall = _rows("1", np.full(5, 0.2)), _rows("2", np.full(5, 0.9), start=100)
    guards = AFTER_DRIFT.model_copy(update={"await_outcomes": False, "min_requests": 1})  # latency judged
    results = {g.name: g for g in evaluate_guards(champ, chall, guards, None, 0.0, ceiling_ms=CEILING)}
    assert results["psi"].status == "report" and "too few" in results["psi"].detail
    assert not _step(list(results.values())).insufficient


def test_after_drift_shadow_agreement_is_reported() -> None:
    rng = np.random.default_rng(14)
    p = rng.beta(2, 5, 200)
    champ = _rows("1", p)
    flipped = _rows("2", 1 - p, shadow=True, request_ids=list(champ["request_id"]))
    plan = ShadowPlan(strategy="shadow", duration_s=1, min_agreement=0.9,
                      guards=AFTER_DRIFT.model_copy(update={"await_outcomes": False}))
    got = {g.name: g for g in shadow_guards(pd.concat([champ, flipped]), "1", "2", plan, ceiling_ms=CEILING)}
    assert got["agreement"].status == "report" and "would breach" in got["agreement"].detail
    assert not [g for g in got.values() if g.status == "breach"]
