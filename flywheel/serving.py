"""Online serving logic: model slots, routing, online features, prediction, explanations (no FastAPI here).

- Slots: the `champion` and optional `challenger` are immutable `ModelSlot`s held in one immutable
  `Slots` object. A swap replaces that object; a request takes a reference at its start, so
  in-flight requests finish on the models they started with and nothing is ever half-swapped.
- Models come from the registry by alias (`Registry.load(name, alias=...)`: digests and the skops
  allow-list are verified). A refused version (tampered, untrusted types, no feature service) is
  reported on /health and the slot keeps its previous model; the same version is not retried by the
  poll loop until its alias moves again (an admin reload retries it).
- Features of entity requests are read through the model's OWN Feast feature service (version tag
  `flywheel.feature_service`). Feast reads an unknown entity and an entity without features alike
  (all None): an entity with no value for any of the model's features is unknown (404); one with
  some values missing is served with the pipeline's imputation and the imputed names are reported.
- Routing (`RoutingPolicy`): single | canary (sticky share of entities to the challenger, by a stable
  hash of the entity id, or of the row when there is no id) | shadow (the challenger scores a share
  in the background; logged, never returned) | blue_green (one active slot, the other kept loaded).
- Outages fail fast: with the registry unreachable /health turns unready and predictions are refused
  with 503 (`serve.on_registry_outage: refuse`, the default; `serve_loaded` keeps answering with the
  verified models in memory). With the feature store unreachable, entity predictions are refused with
  503 at once, without touching the store, until the background poll's probe read succeeds again
  (every `serve.registry_poll_seconds`); raw-row predictions need no store and go on. Both recover by
  themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flywheel.clock import Clock, build_clock
from flywheel.errors import FlywheelError
from flywheel.predictionlog import PredictionLog
from flywheel.predictor import TAG_INFERENCE, Predictor, build_predictor

if TYPE_CHECKING:
    from flywheel.featurestore import OnlineReader
    from flywheel.registry import LoadedModel, Registry
    from flywheel.schemas import DatasetDefinition, FeatureSpec
    from flywheel.settings import Settings

Arm = Literal["champion", "challenger"]
ARMS: tuple[Arm, Arm] = ("champion", "challenger")
TAG_FEATURE_SERVICE = "flywheel.feature_service"
EXPLAIN_TOP = 10  # contributions returned per explained prediction
SHADOW_MAX_PENDING = 1000  # shadow batches waiting for the background scorer; past it they are skipped
log = logging.getLogger("flywheel.serving")


# ------------------------------------------------------------------------------------------ errors


class ServingError(FlywheelError):
    """A request the service cannot answer; `status` is the HTTP status the API returns."""

    status = 400

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)


class InvalidInput(ServingError):
    status = 422


class BatchTooLarge(ServingError):
    status = 413


class UnknownEntities(ServingError):
    status = 404

    def __init__(self, ids: list[Any], entity: str) -> None:
        self.ids = ids
        shown = ", ".join(repr(i) for i in ids[:20]) + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
        super().__init__(f"unknown {entity} id(s) (no features in the online store): {shown}")


class Unavailable(ServingError):
    status = 503


class ModelFailure(ServingError):
    """The champion raised (or returned non-finite probabilities) on valid input: a server fault."""

    status = 500


# ----------------------------------------------------------------------------------------- routing


class RoutingPolicy(BaseModel):
    """How requests are split between the champion and challenger slots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["single", "canary", "shadow", "blue_green"] = Field(
        "single", description="single: champion only; canary: `share` of entities answered by the challenger; "
        "shadow: champion answers, challenger scores `share` in the background; blue_green: `active` answers"
    )
    share: float = Field(0.0, ge=0.0, le=1.0, description="canary / shadow: share of entities for the challenger")
    active: Arm = Field("champion", description="blue_green: the slot that answers")


def bucket(key: str) -> float:
    """A stable position in [0, 1) for a routing key (same key, same arm, across restarts and hosts)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def routing_key(entity: Any, row: dict[str, Any] | None) -> str:
    if entity is not None:
        return f"id:{entity}"
    return "row:" + json.dumps(row, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------- slots


@dataclass(frozen=True, eq=False)
class ModelSlot:
    """One loaded, verified model version and what serving it needs. Immutable (but for its lazy explainer)."""

    arm: Arm
    name: str
    version: str
    predictor: Predictor  # the same object the gates scored and timed (flywheel.predictor)
    feature_service: str
    loaded_at: datetime
    run_id: str | None = None
    _explainer: dict[str, Any] = field(default_factory=dict, repr=False)
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pipeline(self) -> Any:
        return self.predictor.pipeline

    @property
    def features(self) -> tuple[str, ...]:
        return self.predictor.features

    @property
    def positive_index(self) -> int:
        return self.predictor.positive_index

    def frame(self, rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
        return self.predictor.frame(rows)

    def probabilities(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        return self.predictor.predict_rows(rows)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "feature_service": self.feature_service,
            "loaded_at": self.loaded_at.isoformat(),
            "run_id": self.run_id,
            "inference": self.predictor.describe(),
        }


@dataclass(frozen=True)
class Slots:
    champion: ModelSlot | None = None
    challenger: ModelSlot | None = None

    def get(self, arm: Arm) -> ModelSlot | None:
        return self.champion if arm == "champion" else self.challenger


def make_slot(loaded: LoadedModel, arm: Arm, dataset: DatasetDefinition) -> ModelSlot:
    """A slot from a verified registry load; refuses models the dataset definition cannot serve.

    The predictor starts at the inference path the gates verified on the holdout and timed (the
    version's `flywheel.inference` tag); it is checked again here on probe rows, and falls back to a
    slower exact path (reported on /health) if that check fails."""
    pipeline = loaded.pipeline
    service = loaded.tags.get(TAG_FEATURE_SERVICE)
    what = f"model {loaded.name} v{loaded.version}"
    if not service:
        raise FlywheelError(f"{what} has no {TAG_FEATURE_SERVICE} tag: cannot tell which features it was trained on")
    classes = list(getattr(pipeline, "classes_", [0, 1]))
    if 1 not in classes:
        raise FlywheelError(f"{what} has no positive class (classes {classes})")
    try:
        predictor = build_predictor(pipeline, dataset, start_at=loaded.tags.get(TAG_INFERENCE))
    except FlywheelError as exc:
        raise FlywheelError(f"{what}: {exc}") from exc
    return ModelSlot(
        arm=arm,
        name=loaded.name,
        version=str(loaded.version),
        predictor=predictor,
        feature_service=service,
        loaded_at=datetime.now(UTC),  # wall: the process's own status, not the project's logic
        run_id=loaded.run_id,
    )


# ------------------------------------------------------------------------------------ explanations


def _feature_owner(pre: Any, features: Sequence[str]) -> np.ndarray | None:
    """For each transformed column of a fitted ColumnTransformer, the index of its raw input feature."""
    from sklearn.compose import ColumnTransformer

    if not isinstance(pre, ColumnTransformer):
        return None
    index = {f: i for i, f in enumerate(features)}
    width = sum(s.stop - s.start for s in pre.output_indices_.values())
    owner = np.full(width, -1)
    for name, trans, cols in pre.transformers_:
        sl = pre.output_indices_.get(name)
        if sl is None or sl.stop == sl.start or trans == "drop":
            continue
        cols = list(cols) if not isinstance(cols, str) else [cols]
        names = list(trans.get_feature_names_out(cols)) if hasattr(trans, "get_feature_names_out") else cols
        for j, out in zip(range(sl.start, sl.stop), names, strict=True):
            # one-hot columns are named <feature>_<category>: the longest matching feature owns it
            hits = [c for c in cols if out == c or out.startswith(f"{c}_")]
            if not hits:
                return None
            owner[j] = index[max(hits, key=len)]
    return owner if (owner >= 0).all() else None


class Explainer:
    """Contributions of raw input features to one prediction.

    SHAP on the transformed features where it applies (LinearExplainer for linear models against the
    pipeline's imputed "typical" row, TreeExplainer for tree ensembles), summed back over one-hot
    columns to their source feature; units are log-odds. Otherwise occlusion: each raw feature set to
    missing (so the pipeline imputes it), contribution = probability change; units are probability.
    """

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot
        self.method = "occlusion"
        self.unit = "probability"
        self._shap: Any = None
        self._owner: np.ndarray | None = None
        steps = getattr(slot.pipeline, "steps", None)
        if not steps or len(steps) != 2:
            return
        pre, model = steps[0][1], steps[1][1]
        owner = _feature_owner(pre, slot.features)
        if owner is None:
            return
        try:
            with warnings.catch_warnings():  # shap's import warns about matplotlib colormap APIs
                warnings.simplefilter("ignore")
                import shap

            if hasattr(model, "coef_") and np.shape(model.coef_)[0] == 1:
                # background: one row of all-missing features, i.e. the pipeline's imputation values
                background = pre.transform(slot.frame([{}]))
                self._shap = shap.LinearExplainer(model, background)
                self.method, self.unit = "shap_linear", "log_odds"
            elif type(model).__name__ in (
                "HistGradientBoostingClassifier", "RandomForestClassifier", "GradientBoostingClassifier",
                "DecisionTreeClassifier", "ExtraTreesClassifier",
            ):
                self._shap = shap.TreeExplainer(model)
                self.method = "shap_tree"
                self.unit = "probability" if type(model).__name__ in (
                    "RandomForestClassifier", "DecisionTreeClassifier", "ExtraTreesClassifier") else "log_odds"
            else:
                return
            self._owner = owner
            self._pre = pre
        except Exception as exc:  # an explainer that cannot be built must not break serving
            log.warning("SHAP explainer unavailable for %s v%s (%s); using occlusion", slot.name, slot.version, exc)
            self._shap, self._owner, self.method, self.unit = None, None, "occlusion", "probability"

    def explain(self, rows: Sequence[dict[str, Any]], proba: np.ndarray) -> list[dict[str, Any]]:
        if self._shap is not None and self._owner is not None:
            try:
                return self._explain_shap(rows)
            except Exception as exc:
                log.warning("SHAP failed for %s v%s (%s); occlusion instead", self.slot.name, self.slot.version, exc)
        return self._explain_occlusion(rows, proba)

    def _explain_shap(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self._owner is not None
        x = self._pre.transform(self.slot.frame(rows))
        values = self._shap.shap_values(x)
        values = np.asarray(values[self.slot.positive_index] if isinstance(values, list) else values)
        if values.ndim == 3:  # (rows, columns, classes)
            values = values[:, :, self.slot.positive_index]
        base = np.ravel(np.asarray(self._shap.expected_value, dtype=float))
        base_value = float(base[self.slot.positive_index] if base.size > 1 else base[0])
        n = len(self.slot.features)
        out = []
        for i, row in enumerate(rows):
            per_feature = np.bincount(self._owner, weights=values[i], minlength=n)
            out.append(self._format(row, per_feature, base_value))
        return out

    def _explain_occlusion(self, rows: Sequence[dict[str, Any]], proba: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(rows):
            # one call for all variants: each raw feature set to missing, i.e. to the pipeline's imputation
            variants = [{**row, f: None} for f in self.slot.features]
            p = self.slot.probabilities(variants)
            out.append(self._format(row, float(proba[i]) - p, None))
        return out

    def _format(self, row: dict[str, Any], per_feature: np.ndarray, base_value: float | None) -> dict[str, Any]:
        order = np.argsort(-np.abs(per_feature), kind="stable")[:EXPLAIN_TOP]
        return {
            "method": self.method,
            "unit": self.unit,
            "base_value": base_value,
            "contributions": [
                {"feature": self.slot.features[j], "value": row.get(self.slot.features[j]),
                 "contribution": float(per_feature[j])}
                for j in order
            ],
        }


def explainer_for(slot: ModelSlot) -> Explainer:
    """The slot's explainer, built on first use (SHAP's import and set-up never touch the plain path)."""
    ex = slot._explainer.get("x")
    if ex is None:
        with slot._explainer_lock:
            ex = slot._explainer.get("x")
            if ex is None:
                ex = Explainer(slot)
                slot._explainer["x"] = ex
    return ex


# ---------------------------------------------------------------------------------- input checking


def snapshot_time(value: Any) -> datetime | None:
    """A raw row's named feature snapshot (the dataset's timestamp column): ISO 8601 with a UTC offset, or
    null. ValueError when it is anything else: a snapshot without an offset could be any hour."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 time with its offset, got {type(value).__name__} {value!r}")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset (e.g. 2026-03-01T00:00:00Z)")
    return at.astimezone(UTC)


def check_rows(rows: list[dict[str, Any]], dataset: DatasetDefinition) -> list[str]:
    """Problems with raw feature rows (missing/extra features, wrong types, NaN, out of domain, a named
    snapshot time that is not an ISO time with its offset)."""
    specs = {f.name: f for f in dataset.features}
    problems: list[str] = []
    for i, row in enumerate(rows):
        missing = [f for f in specs if f not in row]
        extra = sorted(k for k in row if k not in specs and k not in (dataset.entity, dataset.timestamp))
        if dataset.timestamp in row:
            try:
                snapshot_time(row[dataset.timestamp])
            except ValueError as exc:
                problems.append(f"rows[{i}].{dataset.timestamp}: {exc}")
        if missing:
            problems.append(f"rows[{i}]: missing feature(s) {missing} (send null for an unknown value)")
        if extra:
            problems.append(f"rows[{i}]: unknown feature(s) {extra}; expected {list(specs)}")
        for name, spec in specs.items():
            if name in row:
                msg = _check_value(row[name], spec)
                if msg:
                    problems.append(f"rows[{i}].{name}: {msg}")
        if dataset.entity in row:
            msg = _check_entity(row[dataset.entity], dataset)
            if msg:
                problems.append(f"rows[{i}].{dataset.entity}: {msg}")
    return problems


_FLOAT_MAX = int(sys.float_info.max)


def _shown(value: float) -> str:
    """A number for an error message: a 300-digit integer is shown as 1e+300, not digit by digit."""
    text = repr(value)
    return text if len(text) <= 32 else f"{float(value):.6g}"


def _check_value(value: Any, spec: FeatureSpec) -> str | None:
    if value is None:
        return None if spec.nullable else "may not be null"
    if spec.type == "category":
        if not isinstance(value, str):
            return f"expected a string, got {type(value).__name__} {value!r}"
        if spec.allowed and value not in spec.allowed:
            return f"{value!r} is not one of {spec.allowed}"
        return None
    if spec.type == "bool":
        return None if isinstance(value, bool) else f"expected true/false, got {type(value).__name__} {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {type(value).__name__} {value!r}"
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:
        # JSON integers are unbounded: math.isfinite (and the model's float arrays) raise OverflowError on them
        return f"is too large a number ({len(str(abs(value)))} digits); the largest accepted is about 1.8e308"
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if spec.type == "int" and not float(value).is_integer():
        return f"expected an integer, got {value!r}"
    if spec.min is not None and value < spec.min:
        return f"{_shown(value)} is below the minimum {spec.min:g}"
    if spec.max is not None and value > spec.max:
        return f"{_shown(value)} is above the maximum {spec.max:g}"
    return None


def _check_entity(value: Any, dataset: DatasetDefinition) -> str | None:
    if dataset.entity_type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer id, got {type(value).__name__} {value!r}"
        if not -(2**63) <= value < 2**63:
            shown = value if abs(value) < 10**30 else f"of {len(str(abs(value)))} digits"
            return f"id {shown} is outside the 64-bit integer range"
    elif not isinstance(value, str | int) or isinstance(value, bool):
        return f"expected a string id, got {type(value).__name__} {value!r}"
    return None


# ------------------------------------------------------------------------------------------ results


@dataclass
class RowResult:
    entity: Any
    prediction: bool
    probability: float
    model: str
    version: str
    arm: Arm
    imputed: list[str]
    explanation: dict[str, Any] | None = None


@dataclass
class PredictOutcome:
    request_id: str
    results: list[RowResult]
    latency_ms: float


# ------------------------------------------------------------------------------------------ server


class ServingState:
    """Everything the HTTP layer calls: load/reload, routing, predict, health. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        dataset: DatasetDefinition,
        *,
        registry_factory: Callable[[], Registry] | None = None,
        admin_token: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        # the prediction log's `at` is the project's time (monitoring windows and the outcome join read it);
        # load and reload times and latencies stay on the wall clock
        self.clock = clock or build_clock(settings.clock)
        self.dataset = dataset
        self.cfg = settings.serve
        self.model_name = self.cfg.model_name or settings.register_.model_name or dataset.name
        self.admin_token = admin_token
        self._registry_factory = registry_factory or self._default_registry
        self._registry: Registry | None = None
        self._registry_error: str | None = None
        self._store: Any = None
        self._store_error: str | None = None
        self._store_lock = threading.Lock()
        self._services: dict[str, OnlineReader] = {}  # feature service name -> its reader
        self._slots = Slots()
        self._policy = RoutingPolicy()
        self._reload_lock = threading.Lock()
        self._refused: dict[Arm, dict[str, str]] = {}
        self._notes: dict[Arm, str] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._shadow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()
        self.shadow_skipped = 0
        self.last_reload: datetime | None = None
        self.on_prediction: Callable[[RowResult, float, bool], None] | None = None  # metrics hook
        self.on_model_event: Callable[[str, Arm, str], None] | None = None  # (event, arm, version)
        self.log = PredictionLog(settings.store_url(self.cfg.prediction_log_url), self.cfg.log_flush_seconds)

    # ------------------------------------------------------------------ life cycle

    def _default_registry(self) -> Registry:
        from flywheel.audit import AuditLog
        from flywheel.registry import Registry

        return Registry(self.settings.mlflow_tracking_uri, AuditLog(self.settings.audit_db_url))

    def start(self, poll: bool = True) -> None:
        """Open the stores, load the policy and the models; then poll the registry in the background."""
        self.log.start()
        stored = self.log.load_policy(self.model_name)
        if stored:
            try:
                self._policy = RoutingPolicy.model_validate(stored)
            except ValueError as exc:
                log.error("stored routing policy is invalid (%s); using single", exc)
        self._open_store()
        self.reload()
        if poll:
            self._poller = threading.Thread(target=self._poll, name="registry-poll", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        """Stop polling, finish shadow scoring, flush the prediction log."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        self._shadow.shutdown(wait=True)
        self.log.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.registry_poll_seconds):
            try:
                # a probe read every tick: /health notices an outage (and a recovery) without traffic
                self._open_store() if self._store is None else self._probe_store()
                self.reload()
            except Exception:  # the loop must survive anything; the next tick retries
                log.exception("registry poll failed")

    # ------------------------------------------------------------------ feature store

    def _open_store(self) -> None:
        from flywheel.featurestore import open_store, render_repo

        try:
            repo = render_repo(self.settings.stores, self.settings.paths.home)
            store = open_store(repo)
            store.list_feature_services()  # touches the registry: fails now rather than on a request
        except Exception as exc:
            self._store_error = f"feature store unavailable: {type(exc).__name__}: {exc}"
            log.error(self._store_error)
            return
        with self._store_lock:
            self._store, self._services = store, {}
        self._store_error = None

    def _service(self, name: str) -> OnlineReader:
        from flywheel.featurestore import OnlineReader

        hit = self._services.get(name)
        if hit is None:
            if self._store is None:
                raise Unavailable(self._store_error or "feature store not loaded")
            hit = OnlineReader(self._store, self._store.get_feature_service(name, allow_cache=False))
            self._services[name] = hit
        return hit

    def _probe_store(self) -> None:
        slot = self._slots.champion
        if slot is None:
            return
        try:
            self.fetch(slot.feature_service, [_probe_id(self.dataset)], probe=True)
        except Unavailable:
            return

    def fetch(self, service_name: str, ids: Sequence[Any], probe: bool = False) -> list[dict[str, Any]]:
        """Online feature values (None where missing) of each entity, through one feature service.

        While the store is known to be unreachable, requests fail at once (no connection attempt, no
        timeout on the request path); only the poll loop's probe tries it."""
        return self.fetch_timed(service_name, ids, probe)[0]

    def fetch_timed(self, service_name: str, ids: Sequence[Any], probe: bool = False
                    ) -> tuple[list[dict[str, Any]], list[datetime | None]]:
        """`fetch`, plus each entity's snapshot (event) time from the online store: the prediction log
        records it, and outcomes are joined to predictions by it."""
        if self._store_error and not probe:
            raise Unavailable(f"{self._store_error}; retried every {self.cfg.registry_poll_seconds:g} s")
        try:
            with self._store_lock:
                rows, times = self._service(service_name).read_timed(ids)
        except ServingError:
            raise
        except Exception as exc:
            self._store_error = f"feature store unavailable: {type(exc).__name__}: {exc}"
            log.error(self._store_error)
            raise Unavailable(self._store_error) from exc
        if self._store_error:
            self._store_error = None  # recovered
        return [{c: _clean(v) for c, v in row.items()} for row in rows], times

    # ------------------------------------------------------------------ models

    @property
    def slots(self) -> Slots:
        return self._slots

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Bring the slots in line with the registry aliases; returns what changed and what was refused."""
        from flywheel.errors import ModelIntegrityError

        with self._reload_lock:
            self.last_reload = datetime.now(UTC)  # wall: the process's own status
            try:
                registry = self._registry or self._registry_factory()
                wanted = {arm: registry.alias_version(self.model_name, arm) for arm in ARMS}
            except Exception as exc:
                self._registry = None  # rebuilt next time: a fresh client reconnects cleanly
                self._registry_error = f"model registry unreachable: {type(exc).__name__}: {_short(exc)}"
                log.error(self._registry_error)
                return {"changed": {}, "refused": dict(self._refused), "error": self._registry_error}
            self._registry, self._registry_error = registry, None
            current = self._slots
            new: dict[Arm, ModelSlot | None] = {}
            changed: dict[str, str | None] = {}
            for arm in ARMS:
                slot, version = current.get(arm), wanted[arm]
                if version is None:
                    # an unset champion alias does not stop service: keep the verified model in memory
                    self._notes.pop(arm, None)
                    if arm == "champion" and slot is not None:
                        self._notes[arm] = f"alias {arm!r} is unset in the registry; still serving v{slot.version}"
                    new[arm] = slot if arm == "champion" else None
                    if arm == "challenger" and slot is not None:
                        changed[arm] = None
                    continue
                self._notes.pop(arm, None)
                if slot is not None and slot.version == version:
                    new[arm] = slot
                    self._refused.pop(arm, None)
                    continue
                if not force and self._refused.get(arm, {}).get("version") == version:
                    new[arm] = slot
                    continue
                try:
                    loaded = registry.load(self.model_name, alias=arm)
                    fresh = make_slot(loaded, arm, self.dataset)
                    self._check_service(fresh)
                except (ModelIntegrityError, FlywheelError) as exc:
                    self._refused[arm] = {"version": version, "reason": str(exc), "at": _now_iso()}
                    log.error("refused %s v%s for %s: %s", self.model_name, version, arm, exc)
                    if self.on_model_event:
                        self.on_model_event("refused", arm, version)
                    new[arm] = slot
                    continue
                except Exception as exc:  # the registry went away mid-load: retry at the next poll
                    self._registry = None
                    self._registry_error = f"model registry unreachable: {type(exc).__name__}: {_short(exc)}"
                    log.error("loading %s v%s failed: %s", self.model_name, version, exc)
                    new[arm] = slot
                    continue
                self._refused.pop(arm, None)
                new[arm] = fresh
                changed[arm] = fresh.version
                log.info("%s now serves %s v%s", arm, fresh.name, fresh.version)
                if self.on_model_event:
                    self.on_model_event("loaded", arm, fresh.version)
            self._slots = Slots(champion=new["champion"], challenger=new["challenger"])  # the atomic swap
            return {
                "changed": changed,
                "refused": dict(self._refused),
                "serving": {a: (s.version if s else None) for a, s in (
                    ("champion", self._slots.champion), ("challenger", self._slots.challenger))},
                "error": None,
            }

    def _check_service(self, slot: ModelSlot) -> None:
        """The model's feature service must exist and provide every feature the model takes."""
        if self._store is None:
            return  # checked when the store comes back (the first request or probe resolves it)
        try:
            with self._store_lock:
                provided = self._service(slot.feature_service).features
        except ServingError:
            return
        except Exception as exc:
            raise FlywheelError(
                f"model {slot.name} v{slot.version}: feature service {slot.feature_service!r} is not in the "
                f"Feast registry ({type(exc).__name__})"
            ) from exc
        lacking = sorted(set(slot.features) - set(provided))
        if lacking:
            raise FlywheelError(
                f"model {slot.name} v{slot.version}: feature service {slot.feature_service!r} lacks {lacking}"
            )

    def set_policy(self, policy: RoutingPolicy, actor: str) -> RoutingPolicy:
        """Persist, then switch (a restart keeps what was last set)."""
        self.log.save_policy(self.model_name, policy.model_dump(), actor)
        self._policy = policy
        log.info("routing policy set by %s: %s", actor, policy.model_dump())
        return policy

    # ------------------------------------------------------------------ health

    def health(self) -> tuple[bool, dict[str, Any]]:
        slots = self._slots
        reasons = []
        if slots.champion is None:
            why = self._refused.get("champion", {}).get("reason") or self._registry_error or "no champion alias"
            reasons.append(f"no model loaded for {self.model_name!r}: {why}")
        if self._store is None:
            reasons.append(self._store_error or "feature store not loaded")
        elif self._store_error:
            reasons.append(self._store_error)
        if self._registry_error:
            reasons.append(self._registry_error)
        detail = {
            "status": "ready" if not reasons else "unready",
            "reasons": reasons,
            "model": self.model_name,
            "models": {a: (s.describe() if s else None) for a, s in (
                ("champion", slots.champion), ("challenger", slots.challenger))},
            "refused": dict(self._refused),
            "notes": dict(self._notes),
            "routing": self._policy.model_dump(),
            "last_registry_poll": self.last_reload.isoformat() if self.last_reload else None,
            "prediction_log": {"written": self.log.written, "dropped": self.log.dropped,
                               "last_error": self.log.last_error, "writer_pid": self.log.writer_pid,
                               "writer_restarts": self.log.restarts},
        }
        return not reasons, detail

    # ------------------------------------------------------------------ predict

    def _route(self, slots: Slots, policy: RoutingPolicy, key: str) -> tuple[Arm, bool]:
        """(answering arm, also score in shadow)."""
        if slots.challenger is None or policy.mode == "single":
            return "champion", False
        if policy.mode == "blue_green":
            return policy.active, False
        if policy.mode == "canary":
            return ("challenger" if bucket(key) < policy.share else "champion"), False
        return "champion", bucket(key) < policy.share  # shadow

    def predict(
        self, entities: list[Any] | None, rows: list[dict[str, Any]] | None, explain: bool = False
    ) -> PredictOutcome:
        t0 = time.perf_counter()
        slots, policy = self._slots, self._policy  # one reference for the whole request
        n = len(entities) if entities is not None else len(rows or [])
        if n > self.cfg.max_batch:
            raise BatchTooLarge(f"batch of {n} rows exceeds serve.max_batch={self.cfg.max_batch}")
        if slots.champion is None:
            raise Unavailable("no model loaded: " + "; ".join(self.health()[1]["reasons"]))
        if self._registry_error and self.cfg.on_registry_outage == "refuse":
            raise Unavailable(f"{self._registry_error}; predictions are refused until it is back "
                              "(serve.on_registry_outage=refuse)")
        if entities is not None:
            problems = [f"entities[{i}]: {m}" for i, e in enumerate(entities) if (m := _check_entity(e, self.dataset))]
            if problems:
                raise InvalidInput("invalid entity ids: " + "; ".join(problems), problems)
            ids: list[Any] = list(entities)
            raw: list[dict[str, Any] | None] = [None] * n
        else:
            assert rows is not None
            problems = check_rows(rows, self.dataset)
            if problems:
                raise InvalidInput("invalid rows: " + "; ".join(problems[:20]), problems)
            ids = [r.get(self.dataset.entity) for r in rows]
            raw = list(rows)

        routes = [self._route(slots, policy, routing_key(ids[i], raw[i])) for i in range(n)]
        groups: dict[Arm, list[int]] = {}
        for i, (arm, _) in enumerate(routes):
            groups.setdefault(arm, []).append(i)
        values: dict[Arm, list[dict[str, Any]]] = {}
        # the feature snapshot each row was scored on: the online store's, or the one a raw row names
        row_times: list[datetime | None] = [None] * n
        if rows is not None and entities is None:
            row_times = [snapshot_time(r.get(self.dataset.timestamp)) for r in rows]
        if entities is not None:
            unknown: list[Any] = []
            for arm, idx in groups.items():
                slot = slots.get(arm)
                assert slot is not None
                got, times = self.fetch_timed(slot.feature_service, [ids[i] for i in idx])
                values[arm] = got
                for i, t in zip(idx, times, strict=True):
                    row_times[i] = t
                unknown += [
                    ids[i] for i, v in zip(idx, got, strict=True) if all(v.get(f) is None for f in slot.features)
                ]
            if unknown:
                raise UnknownEntities(sorted(set(unknown), key=unknown.index), self.dataset.entity)
        else:
            values = {arm: [raw[i] for i in idx] for arm, idx in groups.items()}  # type: ignore[misc]

        request_id = uuid.uuid4().hex
        row_values: list[dict[str, Any]] = [{}] * n
        for arm, idx in groups.items():
            for k, i in enumerate(idx):
                row_values[i] = values[arm][k]
        scored = np.full(n, np.nan)
        answered: dict[Arm, list[int]] = {}
        failures: list[dict[str, Any]] = []
        takeover: list[int] = []  # rows of a failed challenger, answered by the champion instead
        for arm, idx in groups.items():
            slot = slots.get(arm)
            try:
                scored[idx] = _score(slot, [row_values[i] for i in idx])
                answered.setdefault(arm, []).extend(idx)
            except Exception as exc:
                self._model_failed(slot, [ids[i] for i in idx], request_id, exc, failures)
                takeover += idx
        if takeover:
            # the logged failures feed the rollout's error-rate guard, which rolls the challenger back
            champion, challenger = slots.champion, slots.challenger
            assert challenger is not None
            if entities is not None and champion.feature_service != challenger.feature_service:
                got, times = self.fetch_timed(champion.feature_service, [ids[i] for i in takeover])
                for i, v, t in zip(takeover, got, times, strict=True):
                    row_values[i], row_times[i] = v, t
            try:
                scored[takeover] = _score(champion, [row_values[i] for i in takeover])
            except Exception as exc:
                self._model_failed(champion, [ids[i] for i in takeover], request_id, exc, failures)
            answered.setdefault("champion", []).extend(takeover)
        results: list[RowResult | None] = [None] * n
        for arm, idx in answered.items():
            slot = slots.get(arm)
            assert slot is not None
            vals = [row_values[i] for i in idx]
            proba = scored[idx]
            explanations = explainer_for(slot).explain(vals, proba) if explain else [None] * len(idx)
            for k, i in enumerate(idx):
                p = float(proba[k])
                results[i] = RowResult(
                    entity=ids[i], prediction=p >= 0.5, probability=p, model=slot.name, version=slot.version,
                    arm=arm, imputed=[f for f in slot.features if _missing(vals[k].get(f))],
                    explanation=explanations[k],
                )
        latency = (time.perf_counter() - t0) * 1000
        now = self.clock.now()
        final = [r for r in results if r is not None]
        self.log.append_many(
            [_record(r, row_values[i], slots.get(r.arm), request_id, now, latency, shadow=False,
                     feature_time=row_times[i]) for i, r in enumerate(final)] + failures
        )
        if self.on_prediction:
            for r in final:
                self.on_prediction(r, latency, False)
        shadow_idx = [i for i, (_, s) in enumerate(routes) if s]
        if shadow_idx and slots.challenger is not None:
            self._submit_shadow(
                slots, [ids[i] for i in shadow_idx], [row_values[i] for i in shadow_idx], entities is not None,
                request_id, [row_times[i] for i in shadow_idx],
            )
        return PredictOutcome(request_id=request_id, results=final, latency_ms=latency)

    def _model_failed(self, slot: ModelSlot | None, entities: list[Any], request_id: str, exc: Exception,
                      failures: list[dict[str, Any]]) -> None:
        """Count a model's failure on valid rows and add them to `failures`. A failed challenger's rows go
        to the champion; a failed champion ends the request with 500 (the failures are logged first)."""
        assert slot is not None
        failures += [_failure(slot, e, request_id, exc, self.clock.now()) for e in entities]
        if self.on_model_event:
            self.on_model_event("failed", slot.arm, slot.version)
        if slot.arm == "champion":
            self.log.append_many(failures)
            raise ModelFailure(f"model {slot.name} v{slot.version} failed to score: {type(exc).__name__}: "
                               f"{_short(exc)}") from exc
        log.error("challenger %s v%s failed on %d row(s) (%s); the champion answers them", slot.name, slot.version,
                  len(entities), _short(exc))

    # ------------------------------------------------------------------ shadow

    def _submit_shadow(
        self, slots: Slots, ids: list[Any], rows: list[dict[str, Any]], by_entity: bool, request_id: str,
        times: list[datetime | None],
    ) -> None:
        with self._shadow_lock:
            if self._shadow_pending >= SHADOW_MAX_PENDING:
                self.shadow_skipped += 1
                return
            self._shadow_pending += 1
        try:
            self._shadow.submit(self._score_shadow, slots, ids, rows, by_entity, request_id, times)
        except RuntimeError:  # shutting down
            with self._shadow_lock:
                self._shadow_pending -= 1

    def _score_shadow(
        self, slots: Slots, ids: list[Any], rows: list[dict[str, Any]], by_entity: bool, request_id: str,
        times: list[datetime | None],
    ) -> None:
        try:
            slot = slots.challenger
            champion = slots.champion
            assert slot is not None and champion is not None
            t0 = time.perf_counter()
            if by_entity and slot.feature_service != champion.feature_service:
                rows, times = self.fetch_timed(slot.feature_service, ids)
            proba = slot.probabilities(rows)
            latency = (time.perf_counter() - t0) * 1000
            now = self.clock.now()
            records = []
            for k, entity in enumerate(ids):
                p = float(proba[k])
                r = RowResult(entity=entity, prediction=p >= 0.5, probability=p, model=slot.name,
                              version=slot.version, arm="challenger",
                              imputed=[f for f in slot.features if _missing(rows[k].get(f))])
                records.append(_record(r, rows[k], slot, request_id, now, latency, shadow=True,
                                       feature_time=times[k]))
                if self.on_prediction:
                    self.on_prediction(r, latency, True)
            self.log.append_many(records)
        except Exception as exc:
            log.exception("shadow scoring failed")
            if slots.challenger is not None:  # counted by the shadow rollout's error-rate guard
                at = self.clock.now()
                failed = [_failure(slots.challenger, e, request_id, exc, at) for e in ids]
                self.log.append_many([{**f, "shadow": True} for f in failed])
                if self.on_model_event:
                    self.on_model_event("failed", "challenger", slots.challenger.version)
        finally:
            with self._shadow_lock:
                self._shadow_pending -= 1


# ------------------------------------------------------------------------------------------ helpers


def _record(
    r: RowResult, vals: dict[str, Any], slot: ModelSlot | None, request_id: str, at: datetime, latency: float,
    shadow: bool, feature_time: datetime | None = None,
) -> dict[str, Any]:
    """One prediction-log record; `feature_time` is the event time of the feature snapshot scored (the
    online store's, or the one a raw row named; else None), which joins the prediction to its outcome later."""
    features = {f: (None if _missing(vals.get(f)) else vals.get(f)) for f in (slot.features if slot else vals)}
    return {
        "at": at, "request_id": request_id, "entity": r.entity, "model": r.model, "version": r.version,
        "arm": r.arm, "prediction": r.prediction, "probability": r.probability, "latency_ms": latency,
        "features": features, "imputed": r.imputed, "explanation": r.explanation, "shadow": shadow,
        "feature_time": feature_time,
    }


def _score(slot: ModelSlot | None, rows: list[dict[str, Any]]) -> np.ndarray:
    """Probabilities of the positive class; a model returning anything but finite values in [0, 1] fails."""
    assert slot is not None
    proba = np.asarray(slot.probabilities(rows), dtype=float)
    if proba.shape != (len(rows),) or not np.all((proba >= 0) & (proba <= 1)):
        raise FlywheelError(f"returned {proba.shape[0] if proba.ndim else 0} probabilities for {len(rows)} rows, "
                            "or values outside [0, 1] / NaN")
    return proba


def _failure(slot: ModelSlot, entity: Any, request_id: str, exc: Exception, at: datetime) -> dict[str, Any]:
    """A prediction-log error record (the log keeps them in their own table), at the project's time `at`."""
    return {"at": at, "request_id": request_id, "entity": entity, "model": slot.name,
            "version": slot.version, "arm": slot.arm, "error": f"{type(exc).__name__}: {_short(exc)}",
            "shadow": False}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _probe_id(dataset: DatasetDefinition) -> Any:
    return -1 if dataset.entity_type == "int" else "__flywheel_probe__"


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()  # wall: status and error reports of the process
