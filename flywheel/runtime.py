"""The start step of every entry point: settings loaded once, the environment applied, paths resolved."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from flywheel.schemas import DatasetDefinition, GatesConfig, load_dataset, load_gates
from flywheel.settings import Settings, TrainConfig, apply_runtime_environment, load_settings

if TYPE_CHECKING:
    from flywheel.clock import Clock
    from flywheel.validation import ValidationOutcome


@dataclass(frozen=True)
class RunContext:
    settings: Settings
    dataset: DatasetDefinition
    dataset_path: Path
    gates: GatesConfig
    train: TrainConfig

    @property
    def source(self) -> Path:
        return self.settings.resolve(self.dataset.source)

    @property
    def offline_dir(self) -> Path:
        return self.settings.resolve(self.settings.paths.offline_dir)

    @property
    def quarantine_dir(self) -> Path:
        return self.settings.resolve(self.settings.paths.quarantine_dir)

    @property
    def feature_repo(self) -> Path:
        return self.settings.resolve(self.settings.stores.feast_repo)

    @property
    def tracking_uri(self) -> str:
        return self.settings.mlflow_tracking_uri

    @property
    def artifact_location(self) -> str:
        return self.settings.mlflow_artifact_location

    @property
    def audit_db_url(self) -> str:
        return self.settings.audit_db_url

    @cached_property
    def clock(self) -> Clock:
        """The project clock of this run, built once (a simulated one without an anchor anchors here)."""
        from flywheel.clock import build_clock

        return build_clock(self.settings.clock)

    @property
    def model_name(self) -> str:
        return self.settings.register_.model_name or self.dataset.name

    def actor(self) -> str:
        """Who moves aliases: the Prefect flow run when there is one, else the local user."""
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if run_id:
            return f"prefect-flow-run:{run_id}"
        import getpass

        return f"user:{getpass.getuser()}"

    def config_digest(self, feature_service: str, code: str, shuffle_labels: bool = False) -> str:
        """sha256 of everything but the data that decides which model a training registers and its verdict: the
        code, the dataset definition, the feature service, the training config (seed included), the gates and
        the fault-injection switch. Same data digest + same config digest = the same version (version_claims)."""
        blob = json.dumps({
            "git_sha": code,
            "dataset_definition_sha256": hashlib.sha256(self.dataset_path.read_bytes()).hexdigest(),
            "feature_service": feature_service,
            "train": self.train.model_dump(mode="json"),
            "gates": self.gates.model_dump(mode="json"),
            "shuffle_labels": shuffle_labels,
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def lineage(
        self, feature_service: str, frame: pd.DataFrame, as_of: datetime,
        quality: list[ValidationOutcome] | None = None, shuffle_labels: bool = False,
    ) -> dict[str, str]:
        """Everything needed to rebuild this training run: code, data, features, config, seed, time; and
        the data-quality alerts of the batches it ingested, with the features imputed because of them."""
        from flywheel.lineage import frame_hash, git_sha

        alerts = [{"batch": o.batch, **a} for o in quality or [] for a in o.alerts]
        imputed = sorted({f for o in quality or [] for f in o.imputed})
        code = git_sha()
        return {
            "flywheel.git_sha": code,
            "flywheel.config_digest": self.config_digest(feature_service, code, shuffle_labels),
            "flywheel.data_hash": frame_hash(frame),
            "flywheel.feature_service": feature_service,
            "flywheel.dataset": self.dataset.name,
            "flywheel.as_of": as_of.isoformat(),
            "flywheel.dataset_path": str(self.dataset_path),
            "flywheel.dataset_definition_sha256": hashlib.sha256(self.dataset_path.read_bytes()).hexdigest(),
            "flywheel.train_config": json.dumps(self.train.model_dump(mode="json"), sort_keys=True),
            "flywheel.seed": str(self.train.seed),
            "flywheel.training_rows": str(len(frame)),
            "flywheel.profile": self.settings.profile,
            "flywheel.dq_alerts": json.dumps(alerts, default=str)[:4000],
            "flywheel.imputed_features": ",".join(imputed) or "-",
        }


def start_run_context(
    profile: str | None = None,
    config_dir: str | Path | None = None,
    dataset: str | Path | None = None,
    seed: int | None = None,
) -> RunContext:
    from flywheel.credentials import require_credentials

    settings = load_settings(profile=profile, config_dir=config_dir)
    require_credentials(settings, "flows")
    apply_runtime_environment(settings)
    # a --dataset given on the command line is relative to the working directory, config paths to home
    given = Path(dataset) if dataset else None
    dataset_path = (given if given and given.is_file() else settings.resolve(given or settings.dataset)).resolve()
    train = settings.train if seed is None else settings.train.model_copy(update={"seed": seed})
    return RunContext(
        settings=settings,
        dataset=load_dataset(dataset_path),
        dataset_path=dataset_path,
        gates=load_gates(settings.resolve(settings.evaluate.gates_file), settings.evaluate.gate_overrides),
        train=train,
    )
