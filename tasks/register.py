"""Registry tasks: load the champion, render the model card, register a candidate and move its alias."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger
from pydantic import BaseModel

from flywheel.challenger_queue import CHALLENGER_REASON, FIRST_CHAMPION_REASON  # noqa: F401 (re-exported)
from flywheel.clock import Clock
from flywheel.errors import RegistryError
from flywheel.schemas import DatasetDefinition, GateReport
from tasks._prefect import in_run, retry_transient

logger = get_logger("flywheel.register")

# queued: passed, waits for the challenger alias (a rollout in flight, or the loop paused: flywheel/challenger_queue.py)
# stale: passed against a champion that was replaced before it could be registered: not rolled out
# duplicate: the same data and config as a registered version (flywheel/version_claims.py): that one is reported
Outcome = Literal["champion", "challenger", "queued", "stale", "rejected", "duplicate"]
EVENTS: dict[str, str] = {
    "champion": "flywheel.model.champion-registered",
    "challenger": "flywheel.model.challenger-registered",  # the rollout deployment's trigger
    "queued": "flywheel.model.challenger-queued",
    "stale": "flywheel.model.challenger-stale",
    "rejected": "flywheel.model.rejected",
}


class RegistrationOutcome(BaseModel):
    model_name: str
    version: str
    outcome: Outcome
    alias: str | None
    previous_champion: str | None
    model_uri: str
    event: str | None = None  # the Prefect event emitted, if any
    reason: str | None = None  # why it got its outcome (queued: behind which rollout, or the loop paused)


def _in_prefect() -> bool:
    """True when an event has somewhere to go: inside a run, or with an API configured. Outside both
    (unit tests calling `.fn`), emitting would start a throwaway ephemeral server (about 30 s)."""
    return in_run() or bool(os.environ.get("PREFECT_API_URL"))


def emit_model_event(
    event: str, name: str, version: str, payload: dict[str, Any], related_run_id: str | None = None
) -> str | None:
    """Emit `event` about model `name` v`version`; never fails the caller. Returns the event name if sent."""
    if not _in_prefect():
        logger.debug("no Prefect run or API: event %s not emitted", event)
        return None
    from prefect.events import emit_event

    related = (
        [{"prefect.resource.id": f"mlflow.run.{related_run_id}", "prefect.resource.role": "mlflow-run"}]
        if related_run_id
        else None
    )
    try:
        sent = emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"flywheel.model.{name}.{version}",
                "prefect.resource.name": f"{name} v{version}",
                "flywheel.model": name,
                "flywheel.version": str(version),
            },
            related=related,
            payload=payload,
        )
    except Exception as exc:  # an event is a notification, not part of the registration
        logger.warning("could not emit %s for %s v%s: %s", event, name, version, exc)
        return None
    return event if sent is not None else None


def gate_summary(report: GateReport) -> dict[str, Any]:
    return {
        "passed": report.passed,
        "failed_rules": report.failed_rules,
        "champion_version": report.champion_version,
        "values": {r.rule: r.value for r in report.results if r.gated},
    }


def version_tags(lineage: dict[str, str]) -> dict[str, str]:
    """The few short tags a model version shows in the MLflow UI (besides status and what the code reads back:
    feature service, trigger, inference path, gated-against, digests): family, a short data hash, the Prefect run.
    Everything else of the lineage is on the version's MLflow run."""
    from flywheel.registry import TAG_TRIGGER
    from flywheel.serving import TAG_FEATURE_SERVICE
    from tasks.summary import prefect_run_url

    # the trigger is read back too: the rollout picks its plan by it
    out = {k: lineage[k] for k in (TAG_FEATURE_SERVICE, "flywheel.family", TAG_TRIGGER) if k in lineage}
    if "flywheel.data_hash" in lineage:
        out["flywheel.data_hash"] = lineage["flywheel.data_hash"][:12]
    url = prefect_run_url() if in_run() else None
    if url:
        out["flywheel.prefect_run"] = url
    return out


def _publish_gate_report(model_name: str, report: GateReport, markdown: str) -> None:
    """The gate report as the flow run's `gate-report-<model>` artifact (inside a run only)."""
    if not in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    from tasks.evaluate import versions_label

    verdict = "PASSED" if report.passed else f"REJECTED ({', '.join(report.failed_rules)})"
    create_markdown_artifact(markdown=markdown, key="gate-report-" + re.sub(r"[^a-z0-9]+", "-", model_name.lower()),
                             description=f"Gates for {versions_label(model_name, report)}: {verdict}"[:500])


# ------------------------------------------------------------------------------------- tasks


@task(
    name="load_champion",
    task_run_name="load-champion-{model_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def load_champion(tracking_uri: str, audit_db_url: str, model_name: str) -> Any | None:
    """The verified champion (LoadedModel), or None when the model has no champion yet."""
    from flywheel.audit import AuditLog
    from flywheel.registry import CHAMPION, Registry

    registry = Registry(tracking_uri, AuditLog(audit_db_url))
    if registry.alias_version(model_name, CHAMPION) is None:
        return None
    return registry.load(model_name, alias=CHAMPION)


def _first(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        value = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if value is not None:
            return value
    return default


@task(name="write_model_card", task_run_name="model-card-{model_name}", cache_policy=NO_CACHE)
def write_model_card(
    model_name: str,
    dataset: DatasetDefinition,
    feature_service: str,
    trained: Any,
    report: GateReport,
    lineage: dict[str, str],
    limitations: list[str] | None = None,
) -> str:
    """The model card markdown, with a version placeholder that register_model fills in."""
    from flywheel.modelcard import VERSION_PLACEHOLDER, render_model_card
    from tasks.evaluate import render_named_gate_report

    # `trained` is the training task's result; read by attribute name so the card does not pin its class
    params = dict(_first(trained, ("params", "best_params"), {}))
    family = _first(trained, ("family",), None)
    if family:
        params = {"family": family, **params}
    for key, attr in (("search_metric", "metric"), ("search_trials", "trials")):
        value = _first(trained, (attr,), None)
        if value is not None:
            params[key] = value
    metrics = dict(_first(trained, ("holdout_metrics", "metrics"), {}))
    importance = _first(trained, ("feature_importance",), None)
    slices = dict(_first(trained, ("slice_metrics", "holdout_slice_metrics"), {}))
    default_limits = [
        f"Trained on data up to {lineage.get('flywheel.as_of', 'the recorded as-of time')}; "
        "performance drifts as customer behaviour changes (drift monitoring triggers retraining).",
        f"The protected attribute `{dataset.protected_attribute}` is not a feature, but correlated features "
        "can carry it: see the fairness gate."
        if dataset.protected_attribute
        else "No protected attribute is declared: fairness was not checked.",
        "Slices under the gate's minimum row count are reported, not gated.",
    ]
    return render_model_card(
        model_name,
        None,
        dataset,
        feature_service,
        params,
        {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        {s: {k: (float("nan") if v is None else float(v)) for k, v in m.items()} for s, m in slices.items()},
        # named by the version it will get: register_model fills the placeholder in
        render_named_gate_report(model_name, report.model_copy(update={"candidate_version": VERSION_PLACEHOLDER})),
        lineage,
        limitations if limitations is not None else default_limits,
        feature_importance={k: float(v) for k, v in importance.items()} if importance else None,
    )


def _existing_version(registry: Any, model_name: str, run_id: str) -> str | None:
    """A version of `model_name` already registered from this run (a retry). One an earlier attempt created but
    could not finish (its store went away before the digests were written, and so did the clean-up) is
    finished now: the retry completes it rather than leaving it half-written beside a new one."""
    from flywheel.registry import TAG_DIGESTS, TAG_DIGESTS_ARTIFACT

    versions = registry.client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    if not ({TAG_DIGESTS, TAG_DIGESTS_ARTIFACT} & set(newest.tags or {})):
        logger.warning("%s v%s from run %s was left without digests: finishing it", model_name, newest.version,
                       run_id)
        registry.finish_registration(model_name, str(newest.version), run_id)
    return str(newest.version)


def _digests_of(lineage: dict[str, str]) -> tuple[str, str] | None:
    """(data digest, config digest) of the training, when its lineage has both (flows/training.py records them)."""
    data, config = lineage.get("flywheel.data_hash"), lineage.get("flywheel.config_digest")
    return (data, config) if data and config else None


def _finish_move(registry: Any, model_name: str, alias: str, version: str, previous: str | None, actor: str,
                 evidence: dict[str, Any]) -> None:
    """A retry finding `alias` on `version` already: an earlier attempt moved it and then lost its store before
    the status tag or the audit row was written. Write what is missing, so every move stays audited."""
    from flywheel.registry import TAG_STATUS

    if registry.version_tags(model_name, version).get(TAG_STATUS) != alias:
        registry.set_status(model_name, version, alias)
    if not any(e.to_version == version for e in registry.audit.entries(model_name, alias)):
        registry.audit.append(model_name, alias, previous, version,
                              "recorded on retry: the first attempt moved the alias but lost its store before "
                              "auditing it", actor, evidence)


def _release_if_nothing_registered(registry: Any, claims: Any, model_name: str, digests: tuple[str, str] | None,
                                   run_id: str) -> None:
    """After a failed attempt: give the claim back when no version of this run exists, so another training
    may register; keep it when one does (or the registry cannot tell): this run's retry finishes that one."""
    if digests is None:
        return
    try:
        if not registry.client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
            claims.release(model_name, *digests, run_id)
    except Exception as exc:  # the store is still away: the claim's lease ends it
        logger.warning("could not release the registration claim of run %s: %s", run_id, exc)


def _duplicate(registry: Any, claim: Any, model_name: str, mlflow_run_id: str) -> RegistrationOutcome:
    """The outcome of a training whose data and config are those of a version registered already: nothing is
    registered; its MLflow run says which version it duplicates."""
    from flywheel.registry import CHAMPION

    if claim.version is None:
        raise RegistryError(
            f"{model_name}: a training of the same data and config (MLflow run {claim.holder}) holds the "
            "registration claim and has registered no version yet; not registering a second one (retry once "
            "it has finished, or after its lease expires if it crashed)")
    version = claim.version
    mv = registry.model_version(model_name, version)
    aliases = [a for a, v in registry.aliases(model_name).items() if v == version]
    registry.client.set_tag(mlflow_run_id, "flywheel.duplicate_of", f"{model_name} v{version}")
    reason = (f"same data and config as {model_name} v{version} (MLflow run {mv.run_id}); "
              "not registered again")
    logger.info("%s: %s", model_name, reason)
    return RegistrationOutcome(model_name=model_name, version=version, outcome="duplicate",
                               alias=aliases[0] if aliases else None,
                               previous_champion=registry.alias_version(model_name, CHAMPION),
                               model_uri=mv.source, reason=reason)


@task(
    name="register_model",
    task_run_name="register-{model_name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
)
def register_model(
    pipeline: Any,
    input_example: pd.DataFrame,
    mlflow_run_id: str,
    model_name: str,
    gate_report: GateReport,
    model_card_md: str | None,
    lineage: dict[str, str],
    tracking_uri: str,
    audit_db_url: str,
    actor: str,
    gate_markdown: str | None = None,
    clock: Clock | None = None,
) -> RegistrationOutcome:
    """Log, register and verify the candidate; by its gate report: rejected, or champion / challenger, or
    queued while a rollout of the model is in flight or its loop is paused (flywheel/challenger_queue.py).
    `clock`: the project clock the alias moves are audited on (default: wall)."""
    import mlflow
    from mlflow.entities import RunTag

    from flywheel.audit import AuditLog
    from flywheel.challenger_queue import admit
    from flywheel.locks import RolloutLocks
    from flywheel.loopcontrol import LoopControl
    from flywheel.modelcard import fill_version
    from flywheel.predictor import TAG_INFERENCE
    from flywheel.registry import (
        CHALLENGER,
        CHAMPION,
        NO_CHAMPION,
        STATUS_QUEUED,
        STATUS_STALE,
        TAG_GATED_AGAINST,
        TAG_QUEUED_REASON,
        TAG_STATUS,
        Registry,
        log_model,
    )
    from flywheel.version_claims import VersionClaims
    from tasks.evaluate import render_named_gate_report, report_json

    registry = Registry(tracking_uri, AuditLog(audit_db_url, clock))
    # one version per (model, data, config): the first training to claim it registers, the others report it
    digests, claims = _digests_of(lineage), VersionClaims(audit_db_url)
    if digests is not None:
        claim = claims.wait(model_name, *digests, holder=mlflow_run_id)
        if not claim.won:
            return _duplicate(registry, claim, model_name, mlflow_run_id)

    try:
        version = _existing_version(registry, model_name, mlflow_run_id)  # set on a retry after registration
    except Exception:
        _release_if_nothing_registered(registry, claims, model_name, digests, mlflow_run_id)
        raise
    if version is None:
        if mlflow.get_tracking_uri() != tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == mlflow_run_id:
            model_uri = log_model(pipeline, input_example)
        else:
            with mlflow.start_run(run_id=mlflow_run_id, nested=active is not None):
                model_uri = log_model(pipeline, input_example)
        # the inference path the gates verified on the holdout and timed: the service starts from it
        served = {TAG_INFERENCE: gate_report.candidate_inference} if gate_report.candidate_inference else {}
        gated = {TAG_GATED_AGAINST: gate_report.champion_version or NO_CHAMPION}  # what "passed" compared with
        # the whole lineage stays on the run (reproduce reads it there); the version keeps a few short tags
        try:
            registry.client.log_batch(mlflow_run_id, tags=[RunTag(k, str(v)) for k, v in lineage.items()])
            version = registry.register(model_uri, model_name, mlflow_run_id,
                                        {**version_tags(lineage), **served, **gated})
        except Exception:
            _release_if_nothing_registered(registry, claims, model_name, digests, mlflow_run_id)
            raise
    else:
        model_uri = registry.model_version(model_name, version).source
        logger.info("%s v%s was already registered from run %s: resuming", model_name, version, mlflow_run_id)
    if digests is not None:
        claims.record(model_name, *digests, mlflow_run_id, version)

    if model_card_md:
        registry.set_model_card(model_name, version, fill_version(model_card_md, version))
    # the gate report, naming the versions it compared, stored once (the run's gates/gate_report.md)
    named = gate_report.model_copy(update={"candidate_version": version})
    gate_markdown = gate_markdown or render_named_gate_report(model_name, named)
    registry.store_gate_report(mlflow_run_id, gate_markdown, report_json(named))
    _publish_gate_report(model_name, named, gate_markdown)

    aliases = registry.aliases(model_name)
    held = [a for a, v in aliases.items() if v == version]
    champion = aliases.get(CHAMPION)
    evidence = {"gates": gate_summary(gate_report), "mlflow_run_id": mlflow_run_id, "model_uri": model_uri}

    tags = registry.version_tags(model_name, version)
    outcome: Outcome
    reason: str | None = None
    if not gate_report.passed:
        reason = "failed gates: " + ", ".join(gate_report.failed_rules)
        registry.mark_rejected(model_name, version, reason, gate_markdown, actor=actor)  # points at that copy
        outcome, alias, previous = "rejected", None, champion
    elif CHAMPION in held:  # a retry that already promoted this version
        outcome, alias = "champion", CHAMPION
        moves = [e for e in registry.audit.entries(model_name, CHAMPION) if e.to_version == version]
        previous = moves[-1].from_version if moves else None
        _finish_move(registry, model_name, CHAMPION, version, None, actor, evidence)
    elif CHALLENGER in held:
        outcome, alias, previous = "challenger", CHALLENGER, champion
        _finish_move(registry, model_name, CHALLENGER, version, champion, actor, evidence)
    elif tags.get(TAG_STATUS) in (STATUS_QUEUED, STATUS_STALE):  # a retry after the decision was made
        outcome, alias, previous = tags[TAG_STATUS], None, champion  # type: ignore[assignment]
        reason = tags.get(TAG_QUEUED_REASON)
    else:
        # under the rollout lock: challenger now, or queued behind a rollout in flight / a paused loop
        admission = admit(registry, RolloutLocks(audit_db_url), LoopControl(audit_db_url), model_name, version,
                          gate_report.champion_version, actor, evidence)
        outcome, reason, previous = admission.outcome, admission.reason, admission.champion
        alias = {"champion": CHAMPION, "challenger": CHALLENGER}.get(outcome)
        if outcome == "champion":
            previous = None

    sent = emit_model_event(
        EVENTS[outcome],
        model_name,
        version,
        {"version": version, "outcome": outcome, "previous_champion": previous, "gates": gate_summary(gate_report),
         **({"reason": reason} if reason else {})},
        related_run_id=mlflow_run_id,
    )
    logger.info("%s v%s registered: %s%s", model_name, version, outcome, f" ({reason})" if reason else "")
    return RegistrationOutcome(
        model_name=model_name,
        version=version,
        outcome=outcome,
        alias=alias,
        previous_champion=previous,
        model_uri=model_uri,
        event=sent,
        reason=reason,
    )
