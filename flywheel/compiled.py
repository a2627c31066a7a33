"""Fitted pipelines compiled to ONNX Runtime for online inference: same probabilities, microseconds per row.

`compile_onnx(pipeline, features, numeric)` converts the in-memory fitted pipeline with skl2onnx when the
model loads (nothing is stored as a second artifact) and returns an `OnnxModel` whose `predict_proba`
takes raw columns and matches `pipeline.predict_proba` within `ONNX_TOLERANCE`. What it compiles is the
layout `flywheel.training.build_pipeline` fits:

    ColumnTransformer(numeric: SimpleImputer [-> StandardScaler],
                      categorical: NaN->MISSING, None->MISSING [-> SimpleImputer(MISSING)] -> OneHotEncoder(ignore))
    -> LogisticRegression | HistGradientBoostingClassifier | RandomForestClassifier

Anything else (KNNImputer, other steps or options, another model) raises `CompileError` naming the step; the
caller serves through another path. The caller's pipeline is never modified: a deep copy is rewritten.

How the graph differs from the pipeline, and why the results still agree:
- skl2onnx converts a string SimpleImputer only when its missing marker is "". The copy drops the two
  NaN/None -> MISSING imputers (`predict_proba` does that mapping in Python) and a MISSING -> most_frequent
  imputer becomes "" -> most_frequent with its fitted statistics. Missing values (None, NaN, the MISSING
  marker itself) are then fed as "", and a raw "" (an unseen category for the pipeline) as `UNSEEN`.
  Without that imputer (missing_category), missing values are fed as MISSING, a category like any other.
- Categories are compared as strings: a categorical value that is not a str (nor missing) cannot equal a
  fitted (string) category, so it is fed as `UNSEEN`, as the pipeline's one-hot encoder would treat it.
- Numbers are computed as scikit-learn computes them: in float64, except a random forest's input, which
  scikit-learn itself casts to float32. skl2onnx emits float64 scaler and linear operators; two node
  kinds it emits have only float32 kernels in ONNX Runtime and are rewritten. The numeric `Imputer`
  becomes IsNaN + Where over the imputer's float64 statistics. The tree ensemble's thresholds, leaf
  weights and base values are re-emitted as float64 tensors (ai.onnx.ml opset 3; values built by
  skl2onnx's own tree helpers, checked entry by entry against the float32 ones it emitted), so ONNX
  Runtime compares and sums in float64. A forest's inputs are fed as float32 and cast to float64 before
  its trees: float64(float32(x)) <= threshold, scikit-learn's own comparison. Left over: a tree
  ensemble's output tensor is float32 (the kernel's only output type), ~3e-8 on a probability (~1e-7
  for gradient boosting, whose logistic is computed in float32); logistic regression ~1e-16. Summed in
  float32, a 100-tree forest's 50/100 votes came out 0.49999979 and flipped the label at 0.5; summed in
  float64 and rounded once they are 0.5, as in scikit-learn.
- When that rewrite is refused the graph is converted plainly in float32 (numeric inputs as float32;
  `OnnxModel.precision` says which): |Δp| up to ~4e-7 in our checks, and a forest's exact ties can flip.
- The compiled model is checked against the pipeline once, on rows built from the fitted statistics and
  categories (every category, missing values, the MISSING marker, "", an unseen value); a difference
  above `ONNX_TOLERANCE` raises `CompileError`.

skl2onnx and onnxruntime are imported only when a pipeline is compiled: importing this module is cheap.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.errors import FlywheelError

ONNX_TOLERANCE = 1e-6  # max |Δp| between OnnxModel.predict_proba and pipeline.predict_proba
UNSEEN = "__flywheel_unseen__"  # fed for categorical values the pipeline cannot have seen at fit time
MODELS = ("LogisticRegression", "HistGradientBoostingClassifier", "RandomForestClassifier")
log = logging.getLogger("flywheel.compiled")


class CompileError(FlywheelError):
    """The pipeline cannot be compiled to ONNX exactly; the message says which step and why."""


@dataclass(frozen=True)
class _Text:
    """How one categorical column is fed to the graph."""

    missing: str  # what None, NaN and the MISSING marker become
    blank: str | None  # what a raw "" becomes when "" is the graph's missing marker (None: kept as is)
    marker: str  # flywheel.training.MISSING


class OnnxModel:
    """A pipeline compiled to an ONNX Runtime session (single-threaded); see the module docstring."""

    kind: str = "onnx"

    def __init__(
        self,
        session: Any,
        numeric: tuple[str, ...],
        text: dict[str, _Text],
        dtype: type[np.floating[Any]],
        n_classes: int,
        output: str,
        conversion_ms: float,
    ) -> None:
        self._session = session
        self._numeric = numeric
        self._text = text
        self._dtype = dtype
        self._n_classes = n_classes
        self._output = [output]
        self.conversion_ms = conversion_ms
        # "float64"; "float32 inputs, float64 trees" (a random forest); "float32" (the fallback)
        self.precision = np.dtype(dtype).name
        self.check_max_delta = math.nan  # max |Δp| of the compile-time check against the pipeline

    @property
    def inputs(self) -> tuple[str, ...]:
        """The raw columns the graph reads (every column the pipeline uses)."""
        return self._numeric + tuple(self._text)

    def predict_proba(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Probabilities (n, n_classes) in `pipeline.classes_` order, float64.

        `columns`: raw feature name -> 1-D array of n values; numeric ones float (NaN or None for missing),
        categorical ones str (None or NaN for missing; unseen categories allowed). Extra columns are ignored.
        """
        try:
            feeds: dict[str, np.ndarray] = {
                name: np.asarray(columns[name], dtype=self._dtype).reshape(-1, 1) for name in self._numeric
            }
            for name, text in self._text.items():
                feeds[name] = _strings(columns[name], text)
        except KeyError as exc:
            missing = [c for c in self.inputs if c not in columns]
            raise FlywheelError(f"predict_proba: missing input column(s) {missing}") from exc
        lengths = {len(v) for v in feeds.values()}
        if len(lengths) > 1:
            sizes = {k: len(v) for k, v in feeds.items()}
            raise FlywheelError(f"predict_proba: input columns differ in length: {sizes}")
        if lengths == {0}:
            return np.zeros((0, self._n_classes))
        (proba,) = self._session.run(self._output, feeds)
        return np.asarray(proba, dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"OnnxModel({len(self.inputs)} inputs, {self.precision}, "
            f"conversion {self.conversion_ms:.1f} ms, check |Δp| {self.check_max_delta:.2g})"
        )


def _strings(values: Any, text: _Text) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        if isinstance(v, str):
            if v == text.marker:
                v = text.missing
            elif text.blank is not None and v == "":
                v = text.blank
        elif v is None or (isinstance(v, float) and math.isnan(v)):
            v = text.missing
        else:  # not a string: never equal to a fitted (string) category
            v = UNSEEN
        out[i, 0] = v
    return out


# ---------------------------------------------------------------------------------------- compiling


@dataclass
class _Plan:
    """The rewritten copy of the pipeline and how its inputs are fed."""

    pipeline: Any
    numeric: list[str]  # numeric input columns, in the pipeline's order
    text: dict[str, _Text]  # categorical input columns
    imputers: list[Any]  # numeric SimpleImputers, in conversion order (their Imputer nodes)


def compile_onnx(pipeline: Any, features: Sequence[str], numeric: Collection[str]) -> OnnxModel:
    """Compile a fitted Flywheel pipeline (see the module docstring) to ONNX Runtime.

    `features`: every raw column the pipeline takes; `numeric`: those that are numeric (the rest are
    categorical). Raises `CompileError` when a step is not supported or the compiled model disagrees with
    the pipeline beyond `ONNX_TOLERANCE`. `pipeline` is not modified.
    """
    import onnxruntime  # noqa: F401  (imported once per process, ~1-2 s: not part of conversion_ms)
    import skl2onnx  # noqa: F401

    start = time.perf_counter()
    plan = _plan(pipeline, list(features), set(numeric))
    forest = type(plan.pipeline.steps[-1][1]).__name__ == "RandomForestClassifier"
    # a forest compares float32 values (scikit-learn casts its input): float32 inputs, float64 trees
    dtype: type[np.floating[Any]] = np.float32 if forest else np.float64
    precision = "float32 inputs, float64 trees" if forest else "float64"
    try:
        session = _session(plan, dtype, float64_trees=True)
    except CompileError as exc:
        log.warning("no float64 ONNX graph (%s); compiling in float32", exc)
        dtype, precision = np.float32, "float32"
        session = _session(plan, dtype, float64_trees=False)
    names = {i.name for i in session.get_inputs()}
    expected = set(plan.numeric) | set(plan.text)
    if names != expected:
        raise CompileError(f"the ONNX graph's inputs {sorted(names)} are not the pipeline's columns {sorted(expected)}")
    outputs = [o.name for o in session.get_outputs()]
    if "probabilities" not in outputs:
        raise CompileError(f"the ONNX graph has no 'probabilities' output (outputs: {outputs})")
    compiled = OnnxModel(
        session=session,
        numeric=tuple(plan.numeric),
        text=plan.text,
        dtype=dtype,
        n_classes=len(pipeline.classes_),
        output="probabilities",
        conversion_ms=(time.perf_counter() - start) * 1000,
    )
    compiled.precision = precision
    compiled.check_max_delta = _check(pipeline, plan, compiled, list(features))
    return compiled


def _plan(pipeline: Any, features: list[str], numeric: set[str]) -> _Plan:
    """Check the layout step by step and rewrite a deep copy into what skl2onnx converts exactly."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from flywheel.training import MISSING

    steps = getattr(pipeline, "steps", None)
    if not isinstance(pipeline, Pipeline) or not steps or len(steps) != 2:
        raise CompileError(
            f"expected a fitted Pipeline([features, model]), got {type(pipeline).__name__}"
            + (f" with {len(steps)} steps" if steps else "")
        )
    (pre_name, pre), (model_name, model) = steps
    if not isinstance(pre, ColumnTransformer) or not hasattr(pre, "transformers_"):
        raise CompileError(f"step {pre_name!r}: expected a fitted ColumnTransformer, got {type(pre).__name__}")
    if type(model).__name__ not in MODELS or not hasattr(model, "classes_"):
        raise CompileError(f"step {model_name!r}: {type(model).__name__} is not supported (supported: {list(MODELS)})")
    if getattr(model, "is_categorical_", None) is not None and np.any(model.is_categorical_):
        raise CompileError(f"step {model_name!r}: native categorical features are not supported")
    if len(set(features)) != len(features):
        raise CompileError(f"duplicate feature names in {features}")

    copied = copy.deepcopy(pipeline)
    ct = copied.steps[0][1]
    plan = _Plan(pipeline=copied, numeric=[], text={}, imputers=[])
    for name, trans, cols in ct.transformers_:
        where = f"{pre_name}/{name}"
        if isinstance(trans, str) and trans == "drop":
            continue
        if (
            isinstance(trans, str)
            or not isinstance(cols, list | tuple | np.ndarray)
            or not all(isinstance(c, str) and c in features for c in cols)
        ):
            raise CompileError(
                f"step {where!r}: expected a transformer on named feature columns, got {trans!r} on {cols!r}"
            )
        cols = list(cols)
        chain = list(trans.steps) if isinstance(trans, Pipeline) else [(name, trans)]
        if all(c in numeric for c in cols):
            for step_name, step in chain:
                here = f"{where}/{step_name}"
                if isinstance(step, SimpleImputer):
                    _check_numeric_imputer(step, here)
                    plan.imputers.append(step)
                elif not isinstance(step, StandardScaler):
                    raise CompileError(
                        f"step {here!r}: {type(step).__name__} is not supported for numeric "
                        "features (supported: SimpleImputer, StandardScaler)"
                    )
            plan.numeric += cols
        elif not any(c in numeric for c in cols):
            text = _rewrite_categorical(trans, chain, where, MISSING, SimpleImputer, OneHotEncoder)
            plan.text.update(dict.fromkeys(cols, text))
        else:
            raise CompileError(f"step {where!r} mixes numeric and categorical columns {cols}")
    if not plan.numeric and not plan.text:
        raise CompileError(f"step {pre_name!r} uses no input column")
    return plan


def _check_numeric_imputer(step: Any, where: str) -> None:
    marker = step.missing_values
    if not (isinstance(marker, float) and math.isnan(marker)):
        raise CompileError(f"step {where!r}: SimpleImputer(missing_values={marker!r}); only NaN is supported")
    if step.add_indicator:
        raise CompileError(f"step {where!r}: SimpleImputer(add_indicator=True) is not supported")
    stats = np.asarray(step.statistics_, dtype=np.float64)
    if not np.isfinite(stats).all():
        raise CompileError(f"step {where!r}: a column was empty at fit time (statistic {stats.tolist()})")


def _rewrite_categorical(
    trans: Any, chain: list[tuple[str, Any]], where: str, marker: str, simple_imputer: type, one_hot: type
) -> _Text:
    """[NaN->MISSING, None->MISSING, optional MISSING->statistic, OneHotEncoder] becomes
    [optional ""->statistic, OneHotEncoder] (in place, on the copy); returns how to feed its columns."""

    def to_marker(step: Any) -> str | None:
        if (
            isinstance(step, simple_imputer)
            and step.strategy == "constant"
            and step.fill_value == marker
            and not step.add_indicator
        ):
            mv = step.missing_values
            if mv is None:
                return "none"
            if isinstance(mv, float) and math.isnan(mv):
                return "nan"
        return None

    head = [to_marker(s) for _, s in chain[:2]]
    if sorted(h for h in head if h) != ["nan", "none"]:
        raise CompileError(
            f"step {where!r}: a categorical chain must start by mapping NaN and None to "
            f"{marker!r} (got {[type(s).__name__ for _, s in chain[:2]]})"
        )
    rest = chain[2:]
    if not rest or not isinstance(rest[-1][1], one_hot):
        raise CompileError(f"step {where!r}: a categorical chain must end with a OneHotEncoder")
    enc_name, enc = rest[-1]
    if enc.handle_unknown != "ignore" or enc.drop_idx_ is not None or getattr(enc, "_infrequent_enabled", False):
        raise CompileError(
            f"step {where}/{enc_name!r}: OneHotEncoder options not supported "
            "(need handle_unknown='ignore', no drop, no infrequent categories)"
        )
    categories = [list(c) for c in enc.categories_]
    if not all(isinstance(v, str) for c in categories for v in c):
        raise CompileError(f"step {where}/{enc_name!r}: categories that are not strings are not supported")
    if any(UNSEEN in c for c in categories):
        raise CompileError(f"step {where}/{enc_name!r}: {UNSEEN!r} is a fitted category")
    text = _Text(missing=marker, blank=None, marker=marker)
    if len(rest) == 2:
        imp_name, imp = rest[0]
        here = f"{where}/{imp_name}"
        if not isinstance(imp, simple_imputer) or imp.missing_values != marker or imp.add_indicator:
            raise CompileError(
                f"step {here!r}: expected SimpleImputer(missing_values={marker!r}), "
                f"got {type(imp).__name__} (KNN or other imputers are not supported)"
            )
        stats = list(imp.statistics_)
        if not all(isinstance(s, str) and s not in ("", marker) for s in stats):
            raise CompileError(f"step {here!r}: unusable statistics {stats} (a column empty at fit time?)")
        if any("" in c for c in categories):
            raise CompileError(f"step {here!r}: '' is a fitted category, but it is the ONNX imputer's missing marker")
        imp.missing_values = ""  # the only string marker skl2onnx converts; statistics_ are kept
        text = _Text(missing="", blank=UNSEEN, marker=marker)
    elif len(rest) > 2:
        raise CompileError(f"step {where!r}: unexpected steps {[n for n, _ in rest[:-1]]} before the OneHotEncoder")
    trans.steps = rest
    return text


def _session(plan: _Plan, dtype: type[np.floating[Any]], float64_trees: bool) -> Any:
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, StringTensorType

    num_type = DoubleTensorType if dtype is np.float64 else FloatTensorType
    initial = [(c, num_type([None, 1])) for c in plan.numeric] + [(c, StringTensorType([None, 1])) for c in plan.text]
    model = plan.pipeline.steps[-1][1]
    try:
        with warnings.catch_warnings():
            # onnx's helper warns on every boolean attribute under protobuf 6 (an error under protobuf 7)
            warnings.filterwarnings("ignore", message=".*Expected an int, got a boolean", category=DeprecationWarning)
            onx = convert_sklearn(plan.pipeline, initial_types=initial, options={id(model): {"zipmap": False}})
    except Exception as exc:
        raise CompileError(f"skl2onnx could not convert the pipeline: {type(exc).__name__}: {exc}") from exc
    if dtype is np.float64:
        _impute_in_double(onx, plan.imputers)
    if float64_trees:
        _trees_in_double(onx, model, cast_input=dtype is not np.float64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(onx.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompileError(f"onnxruntime refused the converted graph: {type(exc).__name__}: {exc}") from exc


def _impute_in_double(onx: Any, imputers: list[Any]) -> None:
    """Replace each numeric `Imputer` node (float32-only in ONNX Runtime) by IsNaN + Where over the
    imputer's float64 statistics, so the graph stays float64 end to end."""
    from onnx import helper, numpy_helper

    graph = onx.graph
    nodes = [n for n in graph.node if n.op_type == "Imputer"]
    if len(nodes) != len(imputers):
        raise CompileError(f"{len(nodes)} Imputer node(s) for {len(imputers)} numeric imputer(s)")
    for node, imp in zip(nodes, imputers, strict=True):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        stats = np.asarray(imp.statistics_, dtype=np.float64)
        floats = np.asarray(attrs.get("imputed_value_floats", []), dtype=np.float32)
        if (
            floats.shape != stats.shape
            or not np.array_equal(floats, stats.astype(np.float32))
            or not math.isnan(attrs.get("replaced_value_float", 0.0))
        ):
            raise CompileError(f"Imputer node {node.name!r} does not match its SimpleImputer")
        values = numpy_helper.from_array(stats, name=f"{node.name}_statistics")
        graph.initializer.append(values)
        name, source, target = node.name, node.input[0], node.output[0]
        mask = f"{name}_isnan"
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, helper.make_node("Where", [mask, values.name, source], [target], name=f"{name}_where"))
        graph.node.insert(at, helper.make_node("IsNaN", [source], [mask], name=f"{name}_isnan"))


def _tree_attributes(model: Any) -> dict[str, list[Any]]:
    """The tree ensemble's attributes in float64, built by skl2onnx's own helpers with the arguments its
    converter passes (skl2onnx/operator_converters/random_forest.py), except that thresholds are left as
    scikit-learn stores them: the graph compares float64 values with them, as scikit-learn does."""
    from skl2onnx.common.tree_ensemble import (
        add_tree_to_attribute_pairs,
        add_tree_to_attribute_pairs_hist_gradient_boosting,
        get_default_tree_classifier_attribute_pairs,
    )

    attrs = get_default_tree_classifier_attribute_pairs()
    if hasattr(model, "estimators_"):  # random forest: mean of the trees' class fractions
        weight = 1.0 / len(model.estimators_)
        for tree_id, est in enumerate(model.estimators_):
            add_tree_to_attribute_pairs(attrs, True, est.tree_, tree_id, weight, 0, True, False, dtype=np.float64)
    else:  # histogram gradient boosting: sum of leaf values + baseline, then the loss's link
        per_iteration = model.n_trees_per_iteration_
        for it, predictors in enumerate(model._predictors):
            for cl, tree in enumerate(predictors):
                tree_id = it if len(predictors) == 1 else it * per_iteration + cl
                bias = 0 if len(predictors) == 1 else cl
                add_tree_to_attribute_pairs_hist_gradient_boosting(
                    attrs, True, tree, tree_id, 1.0, bias, False, False, dtype=np.float64
                )
        attrs["base_values"] = list(np.ravel(model._baseline_prediction))
    return attrs


def _trees_in_double(onx: Any, model: Any, cast_input: bool) -> None:
    """Re-emit the TreeEnsembleClassifier's thresholds, leaf weights and base values as float64 tensors
    (ai.onnx.ml opset 3): ONNX Runtime then compares and sums in float64 (its output stays float32).

    `cast_input`: the node's input is float32 (a random forest's): cast it to float64 first, so the node
    compares float64(float32(x)) with scikit-learn's float64 threshold, which is what scikit-learn does."""
    from onnx import TensorProto, helper, numpy_helper

    graph = onx.graph
    nodes = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
    if not nodes:
        return
    if len(nodes) > 1:
        raise CompileError(f"{len(nodes)} TreeEnsembleClassifier nodes, expected one")
    node = nodes[0]
    emitted = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    wanted = _tree_attributes(model)
    for key in (
        "nodes_treeids",
        "nodes_nodeids",
        "nodes_featureids",
        "nodes_modes",
        "class_treeids",
        "class_nodeids",
        "class_ids",
    ):
        if list(emitted.get(key, [])) != [v.encode() if isinstance(v, str) else int(v) for v in wanted[key]]:
            raise CompileError(f"tree attribute {key} differs from the converter's; not rewritten")
    for key in ("nodes_values", "class_weights", "base_values"):
        if key not in emitted:
            continue
        values = np.asarray(wanted[key], dtype=np.float64)
        old = np.asarray(emitted[key], dtype=np.float64)
        # the converter's float32 values: rounded, or (forest thresholds) moved down by one float32 step
        close = np.abs(old - values) <= 2 * np.spacing(np.abs(values).astype(np.float32)).astype(np.float64)
        if old.shape != values.shape or not close.all():
            raise CompileError(f"tree attribute {key} differs from the converter's; not rewritten")
        for attr in [a for a in node.attribute if a.name == key]:
            node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute(f"{key}_as_tensor", numpy_helper.from_array(values, name="")))
    for opset in onx.opset_import:
        if opset.domain == "ai.onnx.ml":
            opset.version = max(opset.version, 3)
    at = list(graph.node).index(node)
    if cast_input:
        cast = f"{node.input[0]}_float64"
        graph.node.insert(
            at,
            helper.make_node("Cast", [node.input[0]], [cast], to=TensorProto.DOUBLE, name=f"{node.name}_input_float64"),
        )
        node.input[0] = cast
        at += 1
    declared = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    proba = node.output[1]
    if declared.get(proba) == TensorProto.DOUBLE:  # the kernel writes float32: cast to what the graph declares
        node.output[1] = f"{proba}_float32"
        graph.node.insert(
            at + 1,
            helper.make_node(
                "Cast", [node.output[1]], [proba], to=TensorProto.DOUBLE, name=f"{node.name}_output_float64"
            ),
        )


# ------------------------------------------------------------------------------------------ checking


def _check_columns(plan: _Plan, features: list[str]) -> dict[str, np.ndarray]:
    """Rows from the fitted state: each category, None, NaN, the MISSING marker, "", an unseen value; numeric
    values missing, at the imputation value and spread around it (by the scaler's scale where there is one)."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    centre: dict[str, float] = {}
    spread: dict[str, float] = {}
    domain: dict[str, list[Any]] = {}
    for _, trans, cols in plan.pipeline.steps[0][1].transformers_:
        if isinstance(trans, str):
            continue
        for _, step in trans.steps if isinstance(trans, Pipeline) else [("", trans)]:
            if isinstance(step, SimpleImputer) and step.statistics_.dtype.kind == "f":
                centre.update(zip(cols, step.statistics_.tolist(), strict=True))
            elif isinstance(step, StandardScaler) and step.scale_ is not None:
                spread.update(zip(cols, step.scale_.tolist(), strict=True))
            elif isinstance(step, OneHotEncoder):
                domain.update(zip(cols, [list(c) for c in step.categories_], strict=True))
    marker = next(iter(plan.text.values())).marker if plan.text else ""
    extra = [None, math.nan, marker, "", "__never_seen__", 7]
    n = max([12] + [len(c) + len(extra) for c in domain.values()])
    steps = [math.nan, 0.0, 0.618, -0.618, 1.414, -1.414, 2.718, -2.718, 0.1234, 5.55, -0.37, 1.0]
    columns: dict[str, np.ndarray] = {}
    for j, col in enumerate(features):
        if col in plan.text:
            values = [*domain.get(col, []), *extra]
            columns[col] = np.array([values[(i + j) % len(values)] for i in range(n)], dtype=object)
        elif col in plan.numeric:
            c = centre.get(col, 0.0)
            s = spread.get(col, max(1.0, abs(c)) / 2)
            columns[col] = np.array([c + s * steps[(i + j) % len(steps)] for i in range(n)], dtype=np.float64)
    return columns


def _check(pipeline: Any, plan: _Plan, compiled: OnnxModel, features: list[str]) -> float:
    import pandas as pd

    columns = _check_columns(plan, features)
    frame = pd.DataFrame({c: columns[c] for c in features if c in columns}, copy=False)
    frame = frame.reindex(columns=list(getattr(pipeline, "feature_names_in_", frame.columns)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "unknown categories ... encoded as all zeros"
        want = pipeline.predict_proba(frame)
    got = compiled.predict_proba(columns)
    if got.shape != want.shape:
        raise CompileError(f"the ONNX model returns shape {got.shape}, the pipeline {want.shape}")
    delta = float(np.max(np.abs(got - want)))
    if not delta <= ONNX_TOLERANCE:
        raise CompileError(
            f"the ONNX model differs from the pipeline by {delta:.3g} > {ONNX_TOLERANCE:g} on check rows; not compiled"
        )
    return delta
