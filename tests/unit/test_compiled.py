"""Pipelines compiled to ONNX Runtime: the pipeline's probabilities within ONNX_TOLERANCE, the caller's pipeline
untouched, unsupported steps refused with CompileError."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flywheel import compiled
from flywheel.compiled import ONNX_TOLERANCE, CompileError, OnnxModel, compile_onnx
from flywheel.errors import FlywheelError
from flywheel.predictor import probe_rows
from flywheel.settings import ImputationConfig
from flywheel.training import MISSING, build_baseline, build_pipeline, fit
from tests.conftest import PROJECT

FAMILIES = {
    "logistic_regression": {},
    "hist_gradient_boosting": {"max_iter": 20},
    "random_forest": {"n_estimators": 100},  # full-depth trees: their 50/100 votes are exact 0.5 ties
}
IMPUTATIONS = [(n, c) for n in ("median", "mean") for c in ("most_frequent", "missing_category")]


@pytest.fixture(scope="module")
def churn() -> Any:
    from flywheel.schemas import load_dataset

    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


@pytest.fixture(scope="module")
def train(small_batches: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(small_batches[:4], ignore_index=True)
    frame.loc[frame.index[:40], "monthly_charges"] = np.nan
    frame.loc[frame.index[40:80], "contract_type"] = None
    frame.loc[frame.index[80:120], "region"] = np.nan
    return frame


@pytest.fixture(scope="module")
def rows(churn: Any, small_batches: list[pd.DataFrame]) -> list[dict[str, Any]]:
    """probe_rows (missing values, every category, unseen ones, range edges), odd categorical values
    (the MISSING marker, "", NaN, a non-string) and 600 real rows, some with missing values."""
    features = churn.feature_names
    odd: list[dict[str, Any]] = []
    for k, value in enumerate([MISSING, "", np.nan, 7, None, "__never_seen__"]):
        base = dict(small_batches[5][features].iloc[k])
        odd.append({**base, **dict.fromkeys(churn.categorical_features, value), "tenure_months": None})
    real = pd.concat(small_batches[10:12], ignore_index=True)[features].astype(object)
    real = real.where(real.notna(), None)
    real.loc[real.index[::17], "payment_method"] = None
    real.loc[real.index[::23], "avg_session_minutes"] = None
    return [*probe_rows(churn, features), *odd, *real.to_dict("records")]


def columns(rows: list[dict[str, Any]], dataset: Any) -> dict[str, np.ndarray]:
    """The raw columns, as the service builds them (numeric float64 with NaN, categorical object)."""
    out: dict[str, np.ndarray] = {}
    for f in dataset.feature_names:
        values = [r.get(f) for r in rows]
        if f in dataset.numeric_features:
            out[f] = np.array([np.nan if v is None else float(v) for v in values], dtype="float64")
        else:
            out[f] = np.array(values, dtype=object)
    return out


def expected(pipeline: Any, cols: dict[str, np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown categories are encoded as zeros
        return pipeline.predict_proba(pd.DataFrame(cols))


@pytest.fixture(scope="module")
def fitted(churn: Any, train: pd.DataFrame) -> dict[tuple[str, str, str], Any]:
    out = {}
    for family, params in FAMILIES.items():
        for numeric, categorical in IMPUTATIONS:
            imputation = ImputationConfig(numeric=numeric, categorical=categorical)
            out[family, numeric, categorical] = fit(build_pipeline(family, params, churn, imputation, 7), train, churn)
    return out


def compile_for(pipeline: Any, dataset: Any) -> OnnxModel:
    return compile_onnx(pipeline, dataset.feature_names, dataset.numeric_features)


@dataclass
class Compiled:
    model: OnnxModel
    state_before: bytes  # the pipeline pickled just before its first compile
    proba_before: np.ndarray  # its predictions on the first 80 rows then


@pytest.fixture(scope="module")
def compiled_for(fitted, churn, rows) -> Callable[..., Compiled]:
    """Each pipeline is compiled once per module (a 100-tree forest takes about a second)."""
    cache: dict[tuple[str, str, str], Compiled] = {}

    def get(family: str, numeric: str = "median", categorical: str = "most_frequent") -> Compiled:
        key = (family, numeric, categorical)
        if key not in cache:
            pipeline = fitted[key]
            state, before = pickle.dumps(pipeline), expected(pipeline, columns(rows[:80], churn))
            cache[key] = Compiled(compile_for(pipeline, churn), state, before)
        return cache[key]

    return get


@pytest.mark.parametrize("numeric,categorical", IMPUTATIONS, ids=[f"{n}-{c}" for n, c in IMPUTATIONS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_model_matches_the_pipeline(family, numeric, categorical, fitted, compiled_for, churn, rows) -> None:
    pipeline = fitted[family, numeric, categorical]
    model = compiled_for(family, numeric, categorical).model
    cols = columns(rows, churn)
    want, got = expected(pipeline, cols), model.predict_proba(cols)
    assert got.shape == want.shape == (len(rows), 2) and got.dtype == np.float64
    delta = float(np.max(np.abs(got - want)))
    print(
        f"\n{family} {numeric}/{categorical}: max |Δp| {delta:.3g} over {len(rows)} rows, {model.precision}, "
        f"conversion {model.conversion_ms:.0f} ms, {int((want[:, 1] == 0.5).sum())} exact 0.5 ties"
    )
    assert delta <= ONNX_TOLERANCE
    assert model.check_max_delta <= ONNX_TOLERANCE
    # the service's label is p >= 0.5: the same for every row, ties included (float64 sums in the forest)
    assert ((got[:, 1] >= 0.5) == (want[:, 1] >= 0.5)).all()
    assert model.kind == "onnx" and model.conversion_ms > 0
    assert model.precision == ("float32 inputs, float64 trees" if family == "random_forest" else "float64")


def test_the_forest_ties_are_exact(fitted, compiled_for, churn, rows) -> None:
    """A 100-tree forest's 50/100 votes: scikit-learn says 0.5 exactly; so does the compiled model (summed
    in float32, they came out 0.49999979 and the label flipped)."""
    key = ("random_forest", "mean", "missing_category")
    cols = columns(rows, churn)
    want = expected(fitted[key], cols)[:, 1]
    ties = want == 0.5
    assert ties.any(), "no exact tie in the test rows: the check below is empty"
    assert (compiled_for(*key).model.predict_proba(cols)[:, 1][ties] == 0.5).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiling_leaves_the_pipeline_unchanged(family, fitted, compiled_for, churn, rows) -> None:
    pipeline = fitted[family, "median", "most_frequent"]
    done = compiled_for(family)
    assert pickle.dumps(pipeline) == done.state_before
    assert np.array_equal(expected(pipeline, columns(rows[:80], churn)), done.proba_before)
    chain = pipeline.named_steps["features"].named_transformers_["categorical"]
    assert [n for n, _ in chain.steps] == ["nan", "none", "impute", "onehot"]
    assert chain.named_steps["impute"].missing_values == MISSING


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_row_and_a_hundred(family, fitted, compiled_for, churn, rows) -> None:
    pipeline = fitted[family, "mean", "missing_category"]
    model = compiled_for(family, "mean", "missing_category").model
    for sample in ([rows[0]], [rows[45]], [{}], rows[100:200]):
        cols = columns(sample, churn)
        got = model.predict_proba(cols)
        assert got.shape == (len(sample), 2)
        assert np.max(np.abs(got - expected(pipeline, cols))) <= ONNX_TOLERANCE
    assert model.predict_proba(columns([], churn)).shape == (0, 2)


def test_knn_imputer_is_refused_naming_the_step(churn, train) -> None:
    pipeline = fit(build_pipeline("logistic_regression", {}, churn, ImputationConfig(numeric="knn"), 7), train, churn)
    with pytest.raises(CompileError, match=r"'features/numeric/impute'.*KNNImputer"):
        compile_for(pipeline, churn)


def test_other_layouts_are_refused(churn, train) -> None:
    with pytest.raises(CompileError, match="DummyClassifier is not supported"):
        compile_for(fit(build_baseline(churn), train, churn), churn)
    # "" as a real category collides with the marker the ONNX string imputer needs
    blank = train.assign(contract_type=train["contract_type"].where(train.index % 5 != 0, ""))
    pipeline = fit(build_pipeline("logistic_regression", {}, churn, ImputationConfig(), 7), blank, churn)
    with pytest.raises(CompileError, match="'' is a fitted category"):
        compile_for(pipeline, churn)
    # with missing_category there is no string imputer in the graph: "" is a category like any other
    pipeline = fit(
        build_pipeline("logistic_regression", {}, churn, ImputationConfig(categorical="missing_category"), 7),
        blank,
        churn,
    )
    cols = columns([{"contract_type": ""}, {"contract_type": None}, {}], churn)
    assert np.max(np.abs(compile_for(pipeline, churn).predict_proba(cols) - expected(pipeline, cols))) <= ONNX_TOLERANCE


@pytest.mark.parametrize("family", ["logistic_regression", "hist_gradient_boosting"])
def test_float32_fallback_stays_within_tolerance(family, fitted, churn, rows, monkeypatch) -> None:
    """When the float64 rewrite is refused, the plain float32 conversion serves (and is still checked)."""

    def refuse(*_: Any, **__: Any) -> None:
        raise CompileError("refused for the test")

    monkeypatch.setattr(compiled, "_impute_in_double", refuse)
    pipeline = fitted[family, "median", "most_frequent"]
    model = compile_for(pipeline, churn)
    assert model.precision == "float32"
    cols = columns(rows, churn)
    assert np.max(np.abs(model.predict_proba(cols) - expected(pipeline, cols))) <= ONNX_TOLERANCE


def test_input_errors_name_the_columns(compiled_for, churn) -> None:
    model = compiled_for("logistic_regression").model
    cols = columns([{}, {}], churn)
    with pytest.raises(FlywheelError, match="region"):
        model.predict_proba({k: v for k, v in cols.items() if k != "region"})
    with pytest.raises(FlywheelError, match="differ in length"):
        model.predict_proba({**cols, "region": np.array(["north"], dtype=object)})


def test_importing_the_module_loads_no_onnx_library() -> None:
    code = (
        "import sys, flywheel.compiled; "
        "print(sorted(m for m in ('onnxruntime', 'skl2onnx', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT)
    assert out.stdout.strip() == "[]"
