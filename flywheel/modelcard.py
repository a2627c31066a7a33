"""Model card rendering: one markdown page per registered version (data, features, metrics, gates,
lineage, limitations, intended use). Pure string building; the registry stores the result."""

from __future__ import annotations

import json
import math
from typing import Any

from flywheel.schemas import DatasetDefinition

# A card rendered before registration (the version is not known yet) carries this token;
# the register task replaces it with the version number.
VERSION_PLACEHOLDER = "{{flywheel.version}}"


def fill_version(markdown: str, version: str) -> str:
    return markdown.replace(VERSION_PLACEHOLDER, str(version))


def _cell(value: Any) -> str:
    """A table cell: numbers to 4 decimals, pipes escaped so a value cannot break the table."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, default=str)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _feature_rows(dataset: DatasetDefinition, importance: dict[str, float] | None) -> list[list[Any]]:
    rows = []
    for f in dataset.features:
        if f.allowed:
            domain = ", ".join(f.allowed)
        elif f.min is not None or f.max is not None:
            lo = "-inf" if f.min is None else f"{f.min:g}"
            hi = "inf" if f.max is None else f"{f.max:g}"
            domain = f"[{lo}, {hi}]"
        else:
            domain = ""
        row = [f.name, f.type, "yes" if f.nullable else "no", domain, f.description]
        if importance is not None:
            row.append(importance.get(f.name, float("nan")))
        rows.append(row)
    return rows


def render_model_card(
    name: str,
    version: str | None,
    dataset: DatasetDefinition,
    feature_service: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    slice_metrics: dict[str, dict[str, float]],
    gate_report_markdown: str,
    lineage: dict[str, str],
    limitations: list[str],
    feature_importance: dict[str, float] | None = None,
) -> str:
    """The model card as markdown. `version=None` leaves VERSION_PLACEHOLDER to fill in later."""
    v = VERSION_PLACEHOLDER if version is None else str(version)
    lines: list[str] = [f"# Model card: {name} v{v}", ""]

    lines += [
        "## Intended use",
        "",
        f"Scores `{dataset.entity}` rows of the `{dataset.name}` dataset with the probability that "
        f"`{dataset.label}` is `{dataset.positive_label}`"
        + (f" ({dataset.description.rstrip('.')})." if dataset.description else "."),
        "Intended for ranking and prioritising follow-up actions by the owning team "
        f"(`{dataset.owner}`), with a human in the loop. Not intended for decisions about individuals "
        "without review, nor for populations or feature ranges outside the training data described below.",
        "",
    ]

    lines += ["## Data", ""]
    lines += _table(
        ["Item", "Value"],
        [
            ["dataset", dataset.name],
            ["entity", dataset.entity],
            ["event timestamp", dataset.timestamp],
            ["label", f"{dataset.label} (positive: {dataset.positive_label})"],
            ["label timestamp", dataset.label_timestamp or "-"],
            ["slices", ", ".join(dataset.slices) or "-"],
            ["protected attribute", dataset.protected_attribute or "-"],
            [
                "split",
                f"time-based; last {dataset.split.holdout_days} days held out, "
                f"validation share {dataset.split.validation_share}",
            ],
        ],
    )
    lines += [""]

    lines += ["## Features", "", f"Served by feature service `{feature_service}`.", ""]
    header = ["Feature", "Type", "Nullable", "Domain", "Description"]
    if feature_importance is not None:
        header.append("Permutation importance (holdout)")
    lines += _table(header, _feature_rows(dataset, feature_importance))
    lines += [""]

    lines += ["## Training parameters", ""]
    lines += _table(["Parameter", "Value"], [[k, params[k]] for k in sorted(params)]) if params else ["(none)"]
    lines += [""]

    lines += ["## Metrics (holdout)", ""]
    lines += _table(["Metric", "Value"], [[k, metrics[k]] for k in sorted(metrics)]) if metrics else ["(none)"]
    lines += [""]

    lines += ["## Metrics per slice", ""]
    if slice_metrics:
        names = sorted({m for per in slice_metrics.values() for m in per})
        lines += _table(
            ["Slice", *names],
            [[s, *[slice_metrics[s].get(m, float("nan")) for m in names]] for s in sorted(slice_metrics)],
        )
    else:
        lines += ["(no slices)"]
    lines += [""]

    lines += ["## Gates", "", gate_report_markdown.strip() or "(no gate report)", ""]

    lines += ["## Lineage", ""]
    lines += _table(["Item", "Value"], [[k, lineage[k]] for k in sorted(lineage)]) if lineage else ["(none)"]
    lines += [""]

    lines += ["## Limitations", ""]
    lines += [f"- {item}" for item in limitations] or ["- none recorded"]
    lines += [""]
    return "\n".join(lines)
