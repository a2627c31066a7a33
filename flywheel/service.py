"""The online prediction service (`flywheel serve`): FastAPI over flywheel.serving.

Endpoints
- POST /predict         {"entities": [1, 2]} or {"rows": [{feature: value, ...}]}, optional "explain": true
- GET  /health          200 when a model and the feature store are loaded, else 503 with reasons
- GET  /metrics         Prometheus text: requests, latency histograms per model version and arm
- GET  /routing         the routing policy and the versions in each slot
- POST /admin/routing   set the routing policy (bearer token)        } 403 when no token is configured,
- POST /admin/reload    re-read the registry aliases now (bearer token) } 401 on a wrong token
- POST /admin/flush-log store every queued prediction-log row now and wait for the writer's ack (bearer
                        token): 200 once stored, 504 when the writer does not ack in time, 503 when the
                        database refused the rows
- GET  /docs            OpenAPI in Swagger UI, served from the package (works offline); `/` redirects here

Run it as `flywheel serve ...` or `python -m flywheel.service --config-dir configs --profile ci --port 8080`.
"""

from __future__ import annotations

import gc
import os

# Single-threaded inference: set before numpy/scikit-learn load their OpenMP/BLAS runtimes (on 2 cores,
# competing OpenMP threads multiply the p99 of a one-row predict).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `import feast` points PROMETHEUS_MULTIPROC_DIR at a temp folder that the importing process deletes at
# exit, and child processes inherit it: a service started by such a process (`flywheel up`, a test)
# would keep its metric values in files there and warn on every scrape. Its metrics live in memory.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.pop("prometheus_multiproc_dir", None)

import argparse
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from flywheel.apidocs import offline_docs_app
from flywheel.monitoring.exporter import MonitoringCollector, Watched
from flywheel.serving import RoutingPolicy, RowResult, ServingError, ServingState, UnknownEntities

if TYPE_CHECKING:
    from flywheel.schemas import DatasetDefinition
    from flywheel.settings import Settings

log = logging.getLogger("flywheel.service")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
KNOWN_PATHS = frozenset({"/predict", "/health", "/metrics", "/routing", "/admin/routing", "/admin/reload",
                         "/admin/flush-log"})


# ------------------------------------------------------------------------------------------ models


class PredictRequest(BaseModel):
    """Entity ids (features read from the online store) OR raw feature rows; not both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"entities": [17, 42]}, {"rows": [{"tenure_months": 3}], "explain": True}]},
    )

    entities: list[StrictInt | StrictStr] | None = Field(None, min_length=1, description="entity ids")
    rows: list[dict[str, Any]] | None = Field(
        None, min_length=1, description="raw feature values, one object per row; every feature, null for unknown; "
        "the entity id may be included (routing stickiness, logging), and the dataset's timestamp column, the "
        "feature snapshot the row is (ISO 8601 with offset): logged as its feature_time, so its outcome joins"
    )
    explain: StrictBool = Field(False, description="return (and log) per-feature contributions")

    @model_validator(mode="after")
    def _one_input(self) -> PredictRequest:
        if (self.entities is None) == (self.rows is None):
            raise ValueError("give exactly one of `entities` or `rows`")
        return self


class Contribution(BaseModel):
    feature: str
    value: Any
    contribution: float


class Explanation(BaseModel):
    method: str = Field(description="shap_linear | shap_tree | occlusion")
    unit: str = Field(description="log_odds (SHAP on the model's margin) or probability")
    base_value: float | None
    contributions: list[Contribution] = Field(description="raw input features, largest |contribution| first")


class Prediction(BaseModel):
    entity: int | str | None
    prediction: bool = Field(description="true: the positive class (probability >= 0.5)")
    probability: float = Field(ge=0.0, le=1.0)
    model: str
    version: str
    arm: Literal["champion", "challenger"]
    imputed: list[str] = Field(description="features missing from the input, filled by the pipeline's imputation")
    explanation: Explanation | None = None


class PredictResponse(BaseModel):
    request_id: str
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    detail: str
    problems: list[str] = []
    unknown_ids: list[int | str] | None = None


class RoutingState(BaseModel):
    policy: RoutingPolicy
    champion: str | None = Field(description="version in the champion slot")
    challenger: str | None = Field(description="version in the challenger slot")
    effective: str = Field(description="what the policy does with the slots loaded now")


class ReloadResponse(BaseModel):
    changed: dict[str, str | None]
    refused: dict[str, dict[str, str]]
    serving: dict[str, str | None] = {}
    error: str | None = None


class FlushLogRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, le=120, description="how long to wait for the log writer's acknowledgement")


class FlushLogResponse(BaseModel):
    written: int = Field(description="rows the log writer has stored since the service started")
    dropped: int = Field(description="rows dropped since the service started (writer backlog over max_pending)")
    waited_ms: float = Field(description="time until the writer acknowledged")


# ----------------------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_http_requests", "HTTP requests", ["path", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "flywheel_http_request_seconds", "HTTP request latency", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.predictions = Counter(
            "flywheel_predictions", "rows scored", ["model", "version", "arm", "shadow"], registry=r
        )
        self.predict_seconds = Histogram(
            "flywheel_predict_seconds", "scoring latency per request (features + model), per version and arm",
            ["model", "version", "arm"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter("flywheel_predict_errors", "refused predict requests", ["status"], registry=r)
        self.model_loaded = Gauge("flywheel_model_loaded", "1 for the version loaded in a slot",
                                  ["arm", "version"], registry=r)
        self.model_refused = Counter("flywheel_model_refused", "model versions refused at load (integrity)",
                                     ["arm", "version"], registry=r)
        self.model_failures = Counter("flywheel_model_failures", "requests a model failed to score (a failed "
                                      "challenger's rows are answered by the champion)", ["arm", "version"], registry=r)
        self.ready = Gauge("flywheel_ready", "1 when /health is ready", registry=r)
        self.shown_loaded: set[tuple[str, str]] = set()  # (arm, version) label sets of model_loaded

    def observe_rows(self, results: list[RowResult], latency_ms: float) -> None:
        seen: set[tuple[str, str, str]] = set()
        for r in results:
            key = (r.model, r.version, r.arm)
            self.predictions.labels(r.model, r.version, r.arm, "false").inc()
            if key not in seen:
                seen.add(key)
                self.predict_seconds.labels(*key).observe(latency_ms / 1000)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): counts and times every request for a few µs."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- app


def _effective(state: ServingState) -> str:
    p, slots = state.policy, state.slots
    if slots.champion is None:
        return "no model loaded"
    if p.mode == "single" or slots.challenger is None:
        return f"champion v{slots.champion.version} answers everything" + (
            "" if p.mode == "single" else f" (mode {p.mode} needs a challenger; none loaded)")
    if p.mode == "canary":
        return f"{p.share:.1%} of entities to challenger v{slots.challenger.version}, rest champion"
    if p.mode == "shadow":
        return f"champion answers; challenger v{slots.challenger.version} shadow-scores {p.share:.1%}"
    active = slots.get(p.active)
    return f"{p.active} v{active.version if active else '?'} answers everything"


def create_app(
    settings: Settings,
    dataset: DatasetDefinition | None = None,
    *,
    admin_token: str | None = None,
    poll: bool = True,
) -> FastAPI:
    """The service app. The admin token defaults to the variable named by `serve.admin_token_env`."""
    from threadpoolctl import threadpool_limits

    from flywheel.schemas import load_dataset

    threadpool_limits(limits=1)  # BLAS/OpenMP pools already loaded: one thread per inference call
    dataset = dataset or load_dataset(settings.resolve(settings.dataset))
    token = admin_token if admin_token is not None else os.environ.get(settings.serve.admin_token_env) or None
    state = ServingState(settings, dataset, admin_token=token)
    metrics = Metrics()
    # monitoring's outcome (drift, alarms, trigger decisions), read from the project database per scrape
    # and the loop's liveness seen from outside: ages of monitoring and outcomes against their limits
    from flywheel.clock import build_clock
    from flywheel.trigger_policy import load_policy as load_trigger_policy

    monitoring = MonitoringCollector(
        settings.audit_db_url, [Watched(state.model_name, dataset.name)],
        load_trigger_policy(settings.resolve(settings.triggers.policy_file)).liveness, build_clock(settings.clock))
    metrics.registry.register(monitoring)
    state.on_prediction = lambda r, _lat, shadow: (
        metrics.predictions.labels(r.model, r.version, r.arm, "true").inc() if shadow else None
    )

    def _on_model(event: str, arm: str, version: str) -> None:
        if event == "refused":
            metrics.model_refused.labels(arm, version).inc()
        elif event == "failed":
            metrics.model_failures.labels(arm, version).inc()

    state.on_model_event = _on_model

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.start, poll)
        # The imports leave ~300k long-lived objects; a full collection over them stalled requests for
        # ~300 ms (measured by the serving benchmark). Move them out of the collector's reach.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await run_in_threadpool(state.stop)
            monitoring.close()

    app = offline_docs_app(
        title="Flywheel prediction service",
        version="1",
        description=f"Online predictions for dataset {dataset.name!r} (model {state.model_name!r}).",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        metrics.errors.labels(str(exc.status)).inc()
        body: dict[str, Any] = {"detail": str(exc), "problems": exc.problems}
        if isinstance(exc, UnknownEntities):
            body["unknown_ids"] = exc.ids
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            if err.get("type") == "json_invalid":
                ctx = err.get("ctx", {}) or {}
                problems.append(f"malformed JSON at position {err['loc'][-1]}: {ctx.get('error', err['msg'])}")
            else:
                problems.append(f"{loc}: {err['msg']}")
        metrics.errors.labels("422").inc()
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems[:20]), "problems": problems},
                            status_code=422)

    def require_admin(authorization: str | None = Header(None)) -> str:
        if not state.admin_token:
            raise HTTPException(403, f"admin endpoints are disabled: set the environment variable "
                                     f"{settings.serve.admin_token_env} before starting the service")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), state.admin_token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return "admin"

    errors = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
              422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.post("/predict", response_model=PredictResponse, responses=errors)  # type: ignore[arg-type]
    def predict(req: PredictRequest) -> PredictResponse:
        """Score entities (features from the online store) or raw feature rows."""
        out = state.predict(req.entities, req.rows, req.explain)
        metrics.observe_rows(out.results, out.latency_ms)
        return PredictResponse(
            request_id=out.request_id,
            predictions=[
                Prediction(entity=r.entity, prediction=r.prediction, probability=r.probability, model=r.model,
                           version=r.version, arm=r.arm, imputed=r.imputed,
                           explanation=Explanation.model_validate(r.explanation) if r.explanation else None)
                for r in out.results
            ],
        )

    @app.get("/health")
    def health() -> JSONResponse:
        """Ready (200) when a model and the feature store are loaded; 503 with the reasons otherwise."""
        ok, detail = state.health()
        metrics.ready.set(1 if ok else 0)
        return JSONResponse(detail, status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        # read at scrape time: always the slots serving now (remove(), not clear(): once the store is
        # open, Feast has set PROMETHEUS_MULTIPROC_DIR in this process again and clear() warns on it)
        loaded = {(arm, slot.version) for arm, slot in (("champion", state.slots.champion),
                                                        ("challenger", state.slots.challenger)) if slot is not None}
        for stale in metrics.shown_loaded - loaded:
            metrics.model_loaded.remove(*stale)
        for labels in loaded:
            metrics.model_loaded.labels(*labels).set(1)
        metrics.shown_loaded = loaded
        metrics.ready.set(1 if state.health()[0] else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/routing", response_model=RoutingState)
    def routing() -> RoutingState:
        slots = state.slots
        return RoutingState(
            policy=state.policy,
            champion=slots.champion.version if slots.champion else None,
            challenger=slots.challenger.version if slots.challenger else None,
            effective=_effective(state),
        )

    @app.post("/admin/routing", response_model=RoutingState, responses={401: {}, 403: {}})
    def set_routing(policy: RoutingPolicy, actor: str = Depends(require_admin)) -> RoutingState:
        """Set (and persist) the routing policy."""
        state.set_policy(policy, actor)
        return routing()

    @app.post("/admin/reload", response_model=ReloadResponse, responses={401: {}, 403: {}})
    def reload(_: str = Depends(require_admin)) -> ReloadResponse:
        """Re-read the champion/challenger aliases now (also retries versions refused before)."""
        return ReloadResponse.model_validate(state.reload(force=True))

    @app.post("/admin/flush-log", response_model=FlushLogResponse,
              responses={401: {}, 403: {}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}})
    def flush_log(req: FlushLogRequest | None = None, _: str = Depends(require_admin)) -> FlushLogResponse:
        """Store every prediction-log row queued so far and wait for the writer's acknowledgement: once this
        answers 200, every prediction answered before the call is readable in the log (the rollout reads a
        step's rows right after)."""
        timeout = (req or FlushLogRequest()).timeout_s
        plog = state.log
        t0 = time.perf_counter()
        if not plog.flush(timeout):
            raise HTTPException(504, f"the prediction log writer (pid {plog.writer_pid}) did not acknowledge the "
                                     f"flush within {timeout:g} s (restarts: {plog.restarts}; last error: "
                                     f"{plog.last_error or 'none'})")
        waited_ms = (time.perf_counter() - t0) * 1000
        ack = plog.acked
        if ack.get("pending"):
            raise HTTPException(503, f"the prediction log database refused the write: {ack.get('last_error')}; "
                                     f"{ack['pending']} rows kept for the next flush")
        return FlushLogResponse(written=plog.written, dropped=plog.dropped, waited_ms=round(waited_ms, 3))

    return app


# ------------------------------------------------------------------------------------------- entry


def run(
    profile: str | None = None,
    config_dir: str | Path | None = None,
    port: int | None = None,
    host: str | None = None,
) -> None:
    """Load settings once and serve until stopped (SIGINT/SIGTERM flush the prediction log)."""
    import uvicorn

    from flywheel.credentials import require_credentials
    from flywheel.settings import apply_runtime_environment, load_settings

    settings = load_settings(profile=profile, config_dir=config_dir)
    require_credentials(settings, "service")
    apply_runtime_environment(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # no access log: a line per request is I/O on the request path
    uvicorn.run(app, host=host or settings.serve.host, port=port or settings.serve.port,
                access_log=False, log_level="info", timeout_graceful_shutdown=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flywheel.service", description="Flywheel prediction service")
    parser.add_argument("--profile", "-p", default=None)
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default=None)
    args = parser.parse_args(argv)
    run(args.profile, args.config_dir, args.port, args.host)


if __name__ == "__main__":
    main()
