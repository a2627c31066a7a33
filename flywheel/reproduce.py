"""Re-train a registered version from its recorded lineage and say whether it matches.

The lineage tags written at registration name the dataset definition (and its digest), the feature
service, the `as_of` time of the training set, the training config, the family, params and seed, the
data hash and the git sha. Rebuilding the training set through the same feature service at the same
`as_of` must give the same data hash; refitting with the same params and seed must give the same
holdout metrics. A version trained on served features (`flywheel.training_source`) is rebuilt from the prediction
log joined with the outcomes known at its `as_of`, as its training run did.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flywheel.errors import RegistryError
from flywheel.lineage import TAG_TRAINING_SOURCE
from flywheel.settings import Settings, TrainConfig

COMPARED = ("roc_auc", "average_precision", "log_loss", "brier")


class ReproduceReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    version: str
    feature_service: str
    data_hash_recorded: str
    data_hash_now: str
    git_sha_recorded: str
    git_sha_now: str
    dataset_definition_changed: bool
    recorded: dict[str, float]
    reproduced: dict[str, float]
    tolerance: float = 1e-9

    @property
    def data_matches(self) -> bool:
        return self.data_hash_recorded == self.data_hash_now

    @property
    def metrics_match(self) -> bool:
        return all(
            k in self.reproduced and math.isclose(v, self.reproduced[k], rel_tol=0, abs_tol=self.tolerance)
            for k, v in self.recorded.items()
        )

    @property
    def matches(self) -> bool:
        return self.data_matches and self.metrics_match

    def summary(self) -> str:
        lines = [
            f"{self.model} v{self.version}: {'REPRODUCED' if self.matches else 'DOES NOT MATCH'}",
            f"  feature service  {self.feature_service}",
            f"  data hash        {'same' if self.data_matches else 'DIFFERENT'} ({self.data_hash_now[:12]})",
            f"  code             recorded {self.git_sha_recorded[:12]}, now {self.git_sha_now[:12]}",
        ]
        if self.dataset_definition_changed:
            lines.append("  dataset definition file changed since training")
        for k, v in self.recorded.items():
            now = self.reproduced.get(k, float("nan"))
            lines.append(f"  holdout {k:<18} recorded {v:.6f}  reproduced {now:.6f}  diff {now - v:+.2e}")
        return "\n".join(lines)


def reproduce_version(settings: Settings, model: str, version: str) -> ReproduceReport:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flywheel import featurestore, training
    from flywheel.lineage import frame_hash, git_sha
    from flywheel.schemas import load_dataset

    uri = settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = client.get_model_version(model, version)
    except MlflowException as exc:
        raise RegistryError(f"no registered version {model} v{version}: {exc.message}") from None
    # the lineage is on the version's run (a version carries a few short tags); older versions had it there too
    tags = {**(mv.tags or {}), **(client.get_run(mv.run_id).data.tags if mv.run_id else {})}
    missing = [k for k in LINEAGE_KEYS if f"flywheel.{k}" not in tags]
    if missing:
        raise RegistryError(f"{model} v{version} has no recorded lineage for: {', '.join(missing)}")
    lin = {k: tags[f"flywheel.{k}"] for k in LINEAGE_KEYS}
    recorded_metrics = client.get_run(mv.run_id).data.metrics

    dataset_path = Path(lin["dataset_path"])
    if not dataset_path.is_file():
        raise RegistryError(f"{model} v{version} was trained on {dataset_path}, which no longer exists")
    changed = hashlib.sha256(dataset_path.read_bytes()).hexdigest() != lin["dataset_definition_sha256"]
    dataset = load_dataset(dataset_path)
    train_cfg = TrainConfig.model_validate_json(lin["train_config"])
    params = json.loads(lin["params"])

    as_of = datetime.fromisoformat(lin["as_of"])
    if tags.get(TAG_TRAINING_SOURCE) == "served_features":  # what the service used, with the outcomes known at as_of
        from flywheel.outcomes import load_served_training_set

        frame, _ = load_served_training_set(settings.store_url(settings.serve.prediction_log_url),
                                            settings.audit_db_url, dataset, model, as_of)
    else:
        repo = featurestore.render_repo(settings.stores, settings.paths.home)
        store = featurestore.open_store(repo)
        frame, _ = featurestore.build_training_set(
            store, dataset, lin["feature_service"], settings.features, settings.resolve(settings.paths.offline_dir),
            as_of,
        )
    split = training.split_by_time(frame, dataset)
    pipeline = training.fit_final(split, dataset, lin["family"], params, train_cfg.imputation, int(lin["seed"]))
    reproduced = training.overall_metrics(pipeline, split.holdout, dataset)
    recorded = {k: recorded_metrics[f"holdout.{k}"] for k in COMPARED if f"holdout.{k}" in recorded_metrics}
    return ReproduceReport(
        model=model,
        version=version,
        feature_service=lin["feature_service"],
        data_hash_recorded=lin["data_hash"],
        data_hash_now=frame_hash(frame),
        git_sha_recorded=lin["git_sha"],
        git_sha_now=git_sha(),
        dataset_definition_changed=changed,
        recorded=recorded,
        reproduced={k: v for k, v in reproduced.items() if k in recorded},
    )


LINEAGE_KEYS = (
    "git_sha", "data_hash", "feature_service", "dataset_path", "dataset_definition_sha256",
    "train_config", "seed", "as_of", "family", "params",
)
