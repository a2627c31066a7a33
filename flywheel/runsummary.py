"""What a finished flow run did, in words and links: the run name, the `outcome:<name>` tag, the summary
artifact and the MLflow run description. Pure functions; tasks/summary.py publishes them.

Prefect and MLflow point at each other through these: the summary links the MLflow run and model version,
the MLflow run's description (`mlflow.note.content`) links the Prefect flow run.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from pydantic import BaseModel

OUTCOME_TAG_PREFIX = "outcome:"


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes: what Prefect artifact keys accept; readable in run names and tags."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def outcome_tag(outcome: str) -> str:
    """`outcome:rejected`, `outcome:rolled-back`: the tag a person filters flow runs by in the Prefect UI."""
    return OUTCOME_TAG_PREFIX + slug(outcome)


def run_name(model: str, version: str | None, outcome: str) -> str:
    """`churn-v3-rejected`: what the run did, readable in every list of runs."""
    return "-".join(p for p in (slug(model), f"v{version}" if version else "", slug(outcome)) if p)


def mlflow_run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_version_url(ui_url: str, model: str, version: str) -> str:
    return f"{ui_url}/#/models/{quote(model, safe='')}/versions/{version}"


class RunSummary(BaseModel):
    """One flow run's outcome, the versions it concerns and where to look next."""

    flow: str  # "training", "rollout"
    model: str
    version: str | None
    outcome: str  # champion, challenger, queued, stale, rejected; promoted, rolled_back, held, ...
    verdict: str  # one line: why this outcome
    champion: str | None = None  # the champion it was compared with / rolled out against
    mlflow_run_url: str | None = None
    mlflow_version_url: str | None = None
    prefect_run_url: str | None = None
    details: list[str] = []  # extra bullet lines (failed rules, plan, batches)

    @property
    def name(self) -> str:
        return run_name(self.model, self.version, self.outcome)

    @property
    def tag(self) -> str:
        return outcome_tag(self.outcome)

    @property
    def title(self) -> str:
        against = f" vs champion v{self.champion}" if self.champion else ""
        return f"{self.model} v{self.version or '?'}{against}: {self.outcome.replace('_', ' ')}"

    def markdown(self) -> str:
        lines = [f"# {self.flow.capitalize()}: {self.title}", "", f"**{self.verdict}**", ""]
        lines += [f"- {d}" for d in self.details]
        links = [("MLflow run", self.mlflow_run_url), ("MLflow model version", self.mlflow_version_url),
                 ("Prefect flow run", self.prefect_run_url)]
        lines += [f"- {label}: [{url}]({url})" for label, url in links if url]
        lines += [f"- tag `{self.tag}` (filter the runs page by it)"]
        return "\n".join(lines) + "\n"

    def mlflow_note(self) -> str:
        """The MLflow run's description: the verdict and the link back to Prefect."""
        lines = [f"**{self.title}** — {self.verdict}", ""]
        lines += [f"- {d}" for d in self.details]
        if self.mlflow_version_url:
            lines.append(f"- model version: {self.mlflow_version_url}")
        if self.prefect_run_url:
            lines.append(f"- Prefect flow run: {self.prefect_run_url}")
        return "\n".join(lines) + "\n"
