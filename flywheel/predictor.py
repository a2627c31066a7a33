"""The served predictor: one object per model version, built by one function, used everywhere.

The online service, batch scoring, the skew check and every gate score a model through the same
`Predictor`, so what is judged is what serves. A predictor takes raw feature rows (dicts, as a request
carries them) or a frame, and answers P(positive). Underneath it runs one of three inference paths,
tried in this order (fastest first, measured in `make bench-inference`):

- `onnx`: the fitted pipeline converted at load to ONNX Runtime (`flywheel.compiled`); never stored as
  a second artifact. Float32 kernels: exact to `ONNX_TOLERANCE`.
- `replay`: a numpy replay of the fitted steps (imputers, scaler, one-hot) feeding the estimator;
  exact to `REPLAY_TOLERANCE`.
- `pipeline`: `pipeline.predict_proba` on a DataFrame; always applies, always exact.

A compiled path is used only after it matched `pipeline.predict_proba` within its tolerance on probe
rows (every category, unseen categories, missing values, range edges) and, when given, on a whole
holdout; otherwise the next path is tried and the reason is kept in `fallbacks`. The gate records the
chosen path on the model version (`TAG_INFERENCE`), and the service starts from that path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd

from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.schemas import DatasetDefinition

PathKind = Literal["onnx", "replay", "pipeline"]
PATHS: tuple[PathKind, ...] = ("onnx", "replay", "pipeline")
TAG_INFERENCE = "flywheel.inference"  # model version tag: the path the gates verified and timed
REPLAY_TOLERANCE = 1e-9  # float64 arithmetic in another order
Columns = Mapping[str, np.ndarray]
Step = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger("flywheel.predictor")


class InferencePath(Protocol):
    kind: str

    def predict_proba(self, columns: Columns) -> np.ndarray:
        """(n, n_classes) probabilities in the pipeline's class order."""


# ------------------------------------------------------------------------------------------ inputs


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def rows_to_columns(rows: Sequence[Mapping[str, Any]], features: Sequence[str], numeric: frozenset[str]) -> dict[
    str, np.ndarray
]:
    """Raw rows -> one array per feature: float64 with NaN for numeric features, object for the others."""
    out: dict[str, np.ndarray] = {}
    for col in features:
        if col in numeric:
            out[col] = np.array([_num(r.get(col)) for r in rows], dtype="float64")
        else:
            out[col] = np.array([r.get(col) for r in rows], dtype=object)
    return out


def frame_to_columns(frame: pd.DataFrame, features: Sequence[str], numeric: frozenset[str]) -> dict[str, np.ndarray]:
    """A frame's feature columns in the same form as `rows_to_columns` (pandas NA -> NaN / None)."""
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise FlywheelError(f"frame lacks feature column(s) the model takes: {missing}")
    out: dict[str, np.ndarray] = {}
    for col in features:
        s = frame[col]
        if col in numeric:
            out[col] = pd.to_numeric(s, errors="raise").astype("float64").to_numpy(na_value=np.nan)
        else:
            values = s.astype(object).to_numpy()
            out[col] = np.where(pd.isna(values), None, values).astype(object)
    return out


def columns_frame(columns: Columns, features: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: columns[c] for c in features}, copy=False)


# ------------------------------------------------------------------------------------------- paths


class PipelinePath:
    """`pipeline.predict_proba` on a DataFrame: the reference every other path is checked against."""

    kind = "pipeline"

    def __init__(self, pipeline: Any, features: Sequence[str]) -> None:
        self.pipeline = pipeline
        self.features = tuple(features)

    def predict_proba(self, columns: Columns) -> np.ndarray:
        return np.asarray(self.pipeline.predict_proba(columns_frame(columns, self.features)), dtype="float64")


class ReplayPath:
    """A numpy replay of a fitted `ColumnTransformer(imputers, scaler, one-hot) -> estimator` pipeline.

    Why: for one row, scikit-learn's per-call input validation in the ColumnTransformer and its
    imputers costs several ms; the arithmetic itself costs microseconds. Only the steps below are
    replayed, with their fitted statistics; anything else (or an option changing their behaviour)
    raises, and the caller uses another path."""

    kind = "replay"

    def __init__(self, pipeline: Any, features: Sequence[str]) -> None:
        from sklearn.compose import ColumnTransformer
        from sklearn.pipeline import Pipeline

        steps = getattr(pipeline, "steps", None)
        if not steps or len(steps) != 2 or not isinstance(steps[0][1], ColumnTransformer):
            raise FlywheelError("not a ColumnTransformer -> estimator pipeline")
        pre, self.model = steps[0][1], steps[1][1]
        known = set(features)
        blocks: list[tuple[int, list[str], list[Step]]] = []
        for name, trans, cols in pre.transformers_:
            sl = pre.output_indices_.get(name)
            if trans == "drop" or sl is None or sl.stop == sl.start:
                continue
            if isinstance(cols, str) or not all(isinstance(c, str) and c in known for c in cols):
                raise FlywheelError(f"transformer {name!r} selects columns other than named raw features")
            chain = trans.steps if isinstance(trans, Pipeline) else [("only", trans)]
            blocks.append((sl.start, list(cols), [_compile_step(step) for _, step in chain]))
        blocks.sort(key=lambda b: b[0])
        self.blocks = [(cols, funcs) for _, cols, funcs in blocks]

    def transform(self, columns: Columns) -> np.ndarray:
        out = []
        for cols, steps in self.blocks:
            x = np.column_stack([columns[c] for c in cols])  # float64, or object when any column is
            for step in steps:
                x = step(x)
            out.append(np.asarray(x, dtype="float64"))
        return np.hstack(out) if len(out) > 1 else out[0]

    def predict_proba(self, columns: Columns) -> np.ndarray:
        return np.asarray(self.model.predict_proba(self.transform(columns)), dtype="float64")


def _compile_step(step: Any) -> Step:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if step == "passthrough":
        return lambda x: x
    if isinstance(step, SimpleImputer):
        if step.add_indicator:
            raise FlywheelError("SimpleImputer(add_indicator=True) is not replayed")
        stats = step.statistics_
        if stats.dtype.kind == "f" and np.isnan(stats).any():
            raise FlywheelError("a column empty at fit time is dropped by scikit-learn: not replayed")
        marker = step.missing_values
        nan_marker = isinstance(marker, float) and math.isnan(marker)

        def impute(x: np.ndarray) -> np.ndarray:
            if x.dtype == object:
                if marker is None:
                    mask = np.equal(x, None)
                elif nan_marker:
                    mask = np.array([[isinstance(v, float) and math.isnan(v) for v in r] for r in x], dtype=bool)
                else:
                    mask = x == marker
            else:
                mask = np.isnan(x) if nan_marker else x == marker
            if mask.any():
                x = x.copy()
                x[mask] = np.broadcast_to(stats, x.shape)[mask]
            return x

        return impute
    if isinstance(step, StandardScaler):
        mean = step.mean_ if step.with_mean else 0.0
        scale = step.scale_ if step.with_std else 1.0
        return lambda x: (x.astype("float64") - mean) / scale
    if isinstance(step, OneHotEncoder):
        if step.drop_idx_ is not None or step.handle_unknown != "ignore" or getattr(step, "_infrequent_enabled", False):
            raise FlywheelError("OneHotEncoder with drop / infrequent categories / handle_unknown!='ignore'")
        lookups = [{v: k for k, v in enumerate(cats)} for cats in step.categories_]
        offsets = np.cumsum([0] + [len(c) for c in step.categories_])

        def one_hot(x: np.ndarray) -> np.ndarray:
            out = np.zeros((x.shape[0], offsets[-1]))
            for j, lookup in enumerate(lookups):
                for i in range(x.shape[0]):
                    k = lookup.get(x[i, j])
                    if k is not None:
                        out[i, offsets[j] + k] = 1.0
            return out

        return one_hot
    raise FlywheelError(f"step {type(step).__name__} is not replayed")


def _onnx_path(pipeline: Any, features: Sequence[str], numeric: frozenset[str]) -> InferencePath:
    from flywheel.compiled import compile_onnx

    return compile_onnx(pipeline, features, numeric)


_BUILDERS: dict[str, Callable[[Any, Sequence[str], frozenset[str]], InferencePath]] = {
    "onnx": _onnx_path,
    "replay": lambda pipeline, features, numeric: ReplayPath(pipeline, features),
    "pipeline": lambda pipeline, features, numeric: PipelinePath(pipeline, features),
}


def tolerance(kind: str) -> float:
    if kind == "onnx":
        from flywheel.compiled import ONNX_TOLERANCE

        return ONNX_TOLERANCE
    return REPLAY_TOLERANCE if kind == "replay" else 0.0


# --------------------------------------------------------------------------------------- predictor


@dataclass(frozen=True, eq=False)
class Predictor:
    """One model version as it serves: raw rows in, P(positive) out, through a verified path."""

    pipeline: Any
    features: tuple[str, ...]  # raw input columns, in the pipeline's order
    numeric: frozenset[str]
    positive_index: int
    path: InferencePath = field(repr=False)
    max_abs_diff: float  # vs pipeline.predict_proba on the verification rows
    verified_rows: int
    build_ms: float
    fallbacks: tuple[str, ...] = ()  # why faster paths were not used

    @property
    def kind(self) -> str:
        return self.path.kind

    def columns(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        return rows_to_columns(rows, self.features, self.numeric)

    def frame(self, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """The pipeline's own input frame for raw rows (explanations work on the pipeline)."""
        return columns_frame(self.columns(rows), self.features)

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """P(positive) per raw row: exactly what a request executes."""
        return self.path.predict_proba(self.columns(rows))[:, self.positive_index]

    def predict_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """P(positive) per frame row, through the same path."""
        return self.path.predict_proba(frame_to_columns(frame, self.features, self.numeric))[:, self.positive_index]

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.kind,
            "max_abs_diff_vs_pipeline": self.max_abs_diff,
            "tolerance": tolerance(self.kind),
            "verified_rows": self.verified_rows,
            "build_ms": round(self.build_ms, 1),
            "fallbacks": list(self.fallbacks),
        }

    def summary(self) -> str:
        why = f"; not used: {'; '.join(self.fallbacks)}" if self.fallbacks else ""
        return (f"{self.kind} (max |dp| {self.max_abs_diff:.1e} vs predict_proba on {self.verified_rows} rows, "
                f"tolerance {tolerance(self.kind):g}){why}")


def positive_index(pipeline: Any, dataset: DatasetDefinition) -> int:
    """Column of predict_proba for the positive class (models are fitted on 0/1, or on raw labels)."""
    classes = list(getattr(pipeline, "classes_", []))
    for wanted in (1, dataset.positive_label):
        if wanted in classes:
            return classes.index(wanted)
    return 1


def model_features(pipeline: Any, dataset: DatasetDefinition) -> tuple[str, ...]:
    """The raw columns a fitted model takes: what it was fitted on when it says so, else the dataset's."""
    names = getattr(pipeline, "feature_names_in_", None)
    return tuple(str(c) for c in names) if names is not None else tuple(dataset.feature_names)


def build_predictor(
    pipeline: Any,
    dataset: DatasetDefinition,
    verify: pd.DataFrame | None = None,
    start_at: str | None = None,
    paths: Sequence[str] = PATHS,
) -> Predictor:
    """The served predictor for a fitted pipeline: the fastest path of `paths` that matches
    `pipeline.predict_proba` within its tolerance on probe rows plus every row of `verify`.

    `start_at` (a model version's `TAG_INFERENCE`) skips the paths before it: the service serves
    through the path the gates verified on the holdout and timed, never a faster one unverified."""
    t0 = time.perf_counter()
    features = model_features(pipeline, dataset)
    unknown = sorted(set(features) - set(dataset.feature_names))
    if unknown:
        raise FlywheelError(f"model takes features {unknown} unknown to dataset {dataset.name!r}")
    numeric = frozenset(f for f in features if f in set(dataset.numeric_features))
    order = list(paths)
    if start_at in order:
        order = order[order.index(start_at):]
    columns = rows_to_columns(probe_rows(dataset, features), features, numeric)
    if verify is not None and len(verify):
        extra = frame_to_columns(verify, features, numeric)
        columns = {c: np.concatenate([columns[c], extra[c]]) for c in features}
    n = len(next(iter(columns.values())))
    fallbacks: list[str] = []
    reference = PipelinePath(pipeline, features)
    try:
        want = reference.predict_proba(columns)
    except Exception as exc:
        # nothing to verify a compiled path against: serve the pipeline itself, whose failures on
        # such rows surface per request (the service's failure handling, the gates' scoring)
        why = f"pipeline.predict_proba raised on the verification rows ({type(exc).__name__}: {str(exc)[:200]})"
        return Predictor(
            pipeline=pipeline, features=features, numeric=numeric, positive_index=positive_index(pipeline, dataset),
            path=reference, max_abs_diff=0.0, verified_rows=0, build_ms=(time.perf_counter() - t0) * 1000,
            fallbacks=(f"no compiled path: {why}",),
        )
    for kind in order:
        try:
            path = _BUILDERS[kind](pipeline, features, numeric)
            got = path.predict_proba(columns)
        except Exception as exc:  # an unsupported layout is a reason to fall back, never an error
            fallbacks.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else math.inf
        if not diff <= tolerance(kind):  # NaN fails too
            fallbacks.append(f"{kind}: max |dp| {diff:.1e} > {tolerance(kind):g}")
            continue
        predictor = Predictor(
            pipeline=pipeline, features=features, numeric=numeric, positive_index=positive_index(pipeline, dataset),
            path=path, max_abs_diff=diff, verified_rows=n, build_ms=(time.perf_counter() - t0) * 1000,
            fallbacks=tuple(fallbacks),
        )
        if fallbacks:
            log.info("inference path %s; %s", kind, "; ".join(fallbacks))
        return predictor
    raise FlywheelError(f"no inference path applies: {'; '.join(fallbacks)}")


def served_predictor(loaded: Any, dataset: DatasetDefinition) -> Predictor:
    """The predictor of a registry-loaded model version (`.pipeline`, `.tags`), starting at the path its
    gates verified and timed: the service, batch scoring and the skew check all build it this way."""
    return build_predictor(loaded.pipeline, dataset, start_at=loaded.tags.get(TAG_INFERENCE))


def probe_rows(dataset: DatasetDefinition, features: Sequence[str]) -> list[dict[str, Any]]:
    """Rows exercising every category, an unseen one, missing values and the numeric ranges."""
    specs = {f.name: f for f in dataset.features}
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for k in range(40):
        row: dict[str, Any] = {}
        for j, name in enumerate(features):
            spec = specs[name]
            if (k + j) % 7 == 0:
                row[name] = None
            elif spec.type == "category":
                allowed = [*(spec.allowed or []), "__never_seen__"]
                row[name] = allowed[(k + j) % len(allowed)]
            elif spec.type == "bool":
                row[name] = bool((k + j) % 2)
            else:
                lo = spec.min if spec.min is not None else -100.0
                hi = spec.max if spec.max is not None else 100.0
                edge = (lo, hi)[k % 2] if k % 5 == 4 else None  # the range's ends, exactly
                v = float(edge if edge is not None else rng.uniform(lo, min(hi, lo + 500)))
                row[name] = round(v) if spec.type == "int" else v
        rows.append(row)
    return rows
