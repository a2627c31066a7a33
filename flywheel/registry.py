"""Model registration in the MLflow registry: skops artifacts, digests, safe loading, audited aliases.

Why not `mlflow.sklearn.load_model`: it trusts the skops type list written inside the artifact, so
whoever can write the artifact store decides what gets instantiated. Here every file is checked
against sha256 digests recorded at registration, and the skops file is loaded with the project's own
allow-list (`ALLOWED_TYPES`), never the artifact's.

MLflow 3 notes (measured on 3.17): `mlflow.sklearn.log_model(..., name=...)` creates a LoggedModel and
returns `models:/m-<id>`; its files live under `<experiment artifact location>/models/m-<id>/artifacts`,
not in the run's artifacts (`runs:/<run>/model` only resolves through a fallback lookup). The
registered version's `source` is that `models:/m-<id>` URI and `get_model_version_download_uri` gives
the physical location, which is what digests are computed over.

mlflow and skops are imported inside functions (import cost); nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.audit import AuditEntry, AuditLog
from flywheel.errors import ModelIntegrityError, RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

# Non-default skops types of the supported pipelines (ColumnTransformer + Simple/KNN imputers +
# OneHotEncoder + StandardScaler + LogisticRegression / HistGradientBoostingClassifier /
# RandomForestClassifier / DummyClassifier), found with `skops.io.get_untrusted_types` on fitted
# pipelines (tests/integration/test_registry.py re-derives them). Add a type only after review:
# anything listed here may be instantiated from an artifact.
ALLOWED_TYPES: frozenset[str] = frozenset(
    {
        "numpy.dtype",  # every family: dtypes of fitted arrays (imputer statistics, encoder categories)
        "sklearn.tree._tree.Tree",  # random_forest
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",  # hist_gradient_boosting
    }
)

# Packages pinned in the logged model's requirements (saves MLflow's seconds-long inference).
PINNED_PACKAGES = ("mlflow", "scikit-learn", "skops", "pandas", "numpy", "scipy")

# Tag values above this go to an artifact instead: MLflow's run-tag limit is 8000 characters and
# older registry schemas hold 5000 in a model-version tag or description.
TAG_MAX_CHARS = 5000

TAG_DIGESTS = "flywheel.digests"
TAG_DIGESTS_ARTIFACT = "flywheel.digests_artifact"
TAG_DIGESTS_SHA256 = "flywheel.digests_sha256"
TAG_STATUS = "flywheel.status"
TAG_REJECTION_REASON = "flywheel.rejection_reason"
TAG_GATE_REPORT = "flywheel.gate_report"  # only a version without a run keeps its report in a tag
TAG_GATE_REPORT_ARTIFACT = "flywheel.gate_report_artifact"
GATE_REPORT_PATH = "gates/gate_report.md"  # the one stored copy of a version's gate report, in its run
TAG_MODEL_CARD_ARTIFACT = "flywheel.model_card_artifact"
TAG_GATED_AGAINST = "flywheel.gated_against"  # the champion version the gates compared it with ("none")
TAG_TRIGGER = "flywheel.trigger"  # why its training ran (drift_detected, retrain_requested...): its rollout plan
TAG_QUEUED_REASON = "flywheel.queued_reason"  # why it waits for the challenger alias (or why it left the queue)

CHAMPION = "champion"
CHALLENGER = "challenger"
STATUS_REGISTERED = "registered"
STATUS_ARCHIVED = "archived"
STATUS_SUPERSEDED = "superseded"
STATUS_REJECTED = "rejected"
STATUS_QUEUED = "queued"  # passed its gates; waits for the challenger alias (a rollout in flight, loop paused)
STATUS_STALE = "stale"  # passed gates against a champion that has since been replaced: not rolled out
NO_CHAMPION = "none"  # TAG_GATED_AGAINST of a version gated without a champion (absolute gates only)
# The audit log's pseudo-alias for the challenger queue: a version entering it is a move None -> version,
# one leaving it (released to challenger, superseded, stale) a move version -> None, each with its reason.
QUEUE = "queued"


class LoadedModel(BaseModel):
    """A model version loaded after its digests and types were verified."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    pipeline: Any
    name: str
    version: str
    run_id: str | None
    source: str
    digests: dict[str, str]
    trusted_types: list[str]
    tags: dict[str, str]


# ----------------------------------------------------------------------------- types and pins


def untrusted_types_of(pipeline: Any) -> list[str]:
    """The non-default types skops would need trusted to load `pipeline`."""
    import skops.io as sio

    return sorted(sio.get_untrusted_types(data=sio.dumps(pipeline)))


def trusted_types_for(pipeline: Any) -> list[str]:
    """The skops trusted-type list for a fitted pipeline; refuses types outside ALLOWED_TYPES."""
    types = untrusted_types_of(pipeline)
    outside = sorted(set(types) - ALLOWED_TYPES)
    if outside:
        raise ModelIntegrityError(
            f"pipeline holds types outside the skops allow-list: {outside}; "
            "review them before adding to flywheel.registry.ALLOWED_TYPES"
        )
    return types


def pip_requirements() -> list[str]:
    """Exact pins of the packages a logged model needs, read from the installed distributions."""
    pins = []
    for pkg in PINNED_PACKAGES:
        try:
            pins.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. only mlflow-skinny installed: pin what exists
    return pins


def _signature_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as float: a nullable int feature must accept NaN at serving time (MLflow's
    schema enforcement rejects NaN in a column the signature calls long)."""
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_integer_dtype(out[col]) and not pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].astype("float64")
    return out


def log_model(pipeline: Any, input_example: pd.DataFrame, name: str = "model") -> str:
    """Log `pipeline` (skops format) inside the active MLflow run; returns the `models:/m-…` URI."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    if mlflow.active_run() is None:
        raise RegistryError("log_model needs an active MLflow run (mlflow.start_run(run_id=...))")
    if input_example.empty:
        raise RegistryError("log_model needs a non-empty input example to infer the signature")
    example = _signature_frame(input_example)
    signature = infer_signature(example, pipeline.predict_proba(example))
    info = mlflow.sklearn.log_model(
        pipeline,
        name=name,
        serialization_format="skops",
        skops_trusted_types=trusted_types_for(pipeline),
        signature=signature,
        input_example=example.head(5),
        pip_requirements=pip_requirements(),
        # served models answer probabilities, matching the signature above
        pyfunc_predict_fn="predict_proba",
    )
    return info.model_uri


# ------------------------------------------------------------------------------------ digests


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by POSIX path relative to it."""
    out: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out


def compare_digests(expected: dict[str, str], actual: dict[str, str], what: str) -> None:
    """Raise ModelIntegrityError naming every missing, extra or changed file."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(f for f in set(expected) & set(actual) if expected[f] != actual[f])
    problems = []
    if missing:
        problems.append(f"missing files {missing}")
    if extra:
        problems.append(f"unexpected files {extra}")
    if changed:
        problems.append(f"changed files {changed}")
    if problems:
        raise ModelIntegrityError(f"{what} does not match its registered digests: " + "; ".join(problems))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------- registry


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class Registry:
    """The MLflow model registry at `tracking_uri`, with alias moves recorded in `audit`."""

    def __init__(self, tracking_uri: str, audit: AuditLog) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.audit = audit
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # ------------------------------------------------------------------ registration

    def _resolve_model_uri(self, model_uri: str, run_id: str | None) -> tuple[str, str | None]:
        """(source, model_id) for create_model_version; `runs:/<run>/<name>` is mapped to its LoggedModel."""
        if model_uri.startswith("models:/m-"):
            return model_uri, model_uri.removeprefix("models:/").split("/")[0]
        if model_uri.startswith("runs:/"):
            rid, _, artifact = model_uri.removeprefix("runs:/").partition("/")
            run = self.client.get_run(rid)
            found = self.client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{rid}' AND name = '{artifact or 'model'}'",
            )
            if not found:
                raise RegistryError(f"no logged model named {artifact!r} in run {rid} ({model_uri})")
            return f"models:/{found[0].model_id}", found[0].model_id
        return model_uri, None

    def register(self, model_uri: str, name: str, run_id: str | None, tags: dict[str, str]) -> str:
        """Create a version of `name` from `model_uri`, tag lineage and file digests; returns the version."""
        from mlflow.exceptions import MlflowException

        source, model_id = self._resolve_model_uri(model_uri, run_id)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        all_tags = {k: str(v) for k, v in tags.items()}
        all_tags[TAG_STATUS] = STATUS_REGISTERED
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=all_tags, model_id=model_id)
        version = str(mv.version)
        try:
            self.finish_registration(name, version, run_id, source, model_id)
        except Exception:
            # a version without its digests can never be loaded: take it back rather than leave it half-written
            # (when the store is down this fails too; a retry of the same run finishes it: finish_registration)
            with contextlib.suppress(Exception):
                self.client.delete_model_version(name, version)
            raise
        return version

    def finish_registration(self, name: str, version: str, run_id: str | None, source: str | None = None,
                            model_id: str | None = None) -> None:
        """What makes a created version loadable: its file digests (and the UI's link from its logged model)."""
        from mlflow.exceptions import MlflowException

        source = source or self.model_version(name, version).source
        if model_id:
            # the UI links a logged model to its versions through this tag (as mlflow.register_model does)
            with contextlib.suppress(MlflowException, ValueError):  # cosmetic only
                existing = self.client.get_logged_model(model_id).tags.get("mlflow.modelVersions")
                links = [*json.loads(existing or "[]"), {"name": name, "version": version}]
                self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(links)})
        with tempfile.TemporaryDirectory(prefix="flywheel-register-") as tmp:
            digests = file_digests(self._download(name, version, Path(tmp)))
        if not digests:
            raise ModelIntegrityError(f"model {name} v{version}: no files found at {source}")
        self._store_digests(name, version, run_id, digests)

    def _store_digests(self, name: str, version: str, run_id: str | None, digests: dict[str, str]) -> None:
        text = json.dumps(digests, sort_keys=True)
        # the digests (~700 characters for a model's seven files) would bury the version's few short tags in the
        # UI: they go to the run as an artifact, guarded by a short sha256 tag; a tag only without a run
        if not run_id and len(text) <= TAG_MAX_CHARS:
            self.client.set_model_version_tag(name, version, TAG_DIGESTS, text)
            return
        if not run_id:
            raise RegistryError(
                f"model {name} v{version}: digests ({len(text)} chars) exceed the tag limit and no run "
                "is linked to store them as an artifact"
            )
        path = f"flywheel/digests/v{version}.json"
        self.client.log_text(run_id, text, path)
        self.client.set_model_version_tag(name, version, TAG_DIGESTS_ARTIFACT, path)
        self.client.set_model_version_tag(name, version, TAG_DIGESTS_SHA256, _sha256_text(text))

    def _expected_digests(self, mv: ModelVersion) -> dict[str, str]:
        tags = mv.tags or {}
        what = f"model {mv.name} v{mv.version}"
        if TAG_DIGESTS in tags:
            return json.loads(tags[TAG_DIGESTS])
        if TAG_DIGESTS_ARTIFACT in tags and mv.run_id:
            text = self._read_run_text(mv.run_id, tags[TAG_DIGESTS_ARTIFACT])
            if _sha256_text(text) != tags.get(TAG_DIGESTS_SHA256):
                raise ModelIntegrityError(f"{what}: digests artifact {tags[TAG_DIGESTS_ARTIFACT]} was altered")
            return json.loads(text)
        raise ModelIntegrityError(f"{what} has no recorded digests (tag {TAG_DIGESTS}); refusing to load it")

    def _download(self, name: str, version: str, dst: Path) -> Path:
        import mlflow.artifacts

        uri = self.client.get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri)
        return Path(local)

    def _read_run_text(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory(prefix="flywheel-artifact-") as tmp:
            local = self.client.download_artifacts(run_id, path, dst_path=tmp)
            return Path(local).read_text()

    def _log_run_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    # ----------------------------------------------------------------------------- loading

    def model_version(self, name: str, version: str) -> ModelVersion:
        """The MLflow ModelVersion (tags included); RegistryError when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if _is_not_found(exc):
                raise RegistryError(f"model {name!r} has no version {version!r}") from exc
            raise

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.model_version(name, version).tags or {})

    def load(self, name: str, version: str | None = None, alias: str | None = None) -> LoadedModel:
        """Download a version (or the one an alias points to), verify digests and types, load it."""
        import skops.io as sio
        import yaml

        if (version is None) == (alias is None):
            raise RegistryError(f"load({name!r}): give exactly one of version or alias")
        if alias is not None:
            version = self.alias_version(name, alias)
            if version is None:
                raise RegistryError(f"model {name!r} has no alias {alias!r}")
        assert version is not None
        mv = self.model_version(name, version)
        what = f"model {name} v{version}"
        expected = self._expected_digests(mv)
        with tempfile.TemporaryDirectory(prefix="flywheel-load-") as tmp:
            root = self._download(name, str(version), Path(tmp))
            compare_digests(expected, file_digests(root), what)
            # the MLmodel file is covered by the digests, so its flavor config can be believed
            meta = yaml.safe_load((root / "MLmodel").read_text()) if (root / "MLmodel").is_file() else {}
            flavor = (meta or {}).get("flavors", {}).get("sklearn", {})
            if flavor.get("serialization_format") != "skops":
                raise ModelIntegrityError(
                    f"{what}: serialization format {flavor.get('serialization_format')!r} is not skops; "
                    "only skops artifacts are loaded"
                )
            skops_file = root / flavor.get("pickled_model", "model.skops")
            if not skops_file.is_file():
                raise ModelIntegrityError(f"{what}: skops file {skops_file.name} not found")
            found = sorted(sio.get_untrusted_types(file=skops_file))
            outside = sorted(set(found) - ALLOWED_TYPES)
            if outside:
                raise ModelIntegrityError(
                    f"{what}: {skops_file.name} holds types outside the allow-list: {outside}; refusing to load"
                )
            pipeline = sio.load(skops_file, trusted=found)
        return LoadedModel(
            pipeline=pipeline,
            name=name,
            version=str(version),
            run_id=mv.run_id,
            source=mv.source,
            digests=expected,
            trusted_types=found,
            tags=dict(mv.tags or {}),
        )

    # ------------------------------------------------------------------------------- aliases

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` points to, or None (no alias, or no such model yet)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if _is_not_found(exc):
                return None
            raise

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for every alias of `name` (empty if the model does not exist)."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(name)
        except MlflowException as exc:
            if _is_not_found(exc):
                return {}
            raise
        return {a: str(v) for a, v in (rm.aliases or {}).items()}

    def move_alias(
        self,
        name: str,
        alias: str,
        version: str,
        reason: str,
        actor: str,
        evidence: dict[str, Any] | None = None,
        *,
        allow_rejected: bool = False,
    ) -> AuditEntry:
        """Point `alias` at `version`, keep status tags coherent, and append the move to the audit log."""
        version = str(version)
        tags = self.version_tags(name, version)  # RegistryError if the version does not exist
        if tags.get(TAG_STATUS) == STATUS_REJECTED and not allow_rejected:
            raise RegistryError(
                f"model {name} v{version} was rejected by its gates ({tags.get(TAG_REJECTION_REASON, '')}); "
                "refusing to give it an alias without allow_rejected=True"
            )
        current = self.aliases(name)
        previous = current.get(alias)
        if alias == CHALLENGER and current.get(CHAMPION) == version:
            raise RegistryError(f"model {name} v{version} is the champion; it cannot also be the challenger")
        if alias == CHAMPION and current.get(CHALLENGER) == version:
            # promotion: the version stops being the challenger, and that move is audited too
            self.client.delete_registered_model_alias(name, CHALLENGER)
            self.audit.append(name, CHALLENGER, version, None, f"promoted to champion: {reason}", actor, evidence)
        self.client.set_registered_model_alias(name, alias, version)
        self.client.set_model_version_tag(name, version, TAG_STATUS, alias)
        if previous and previous != version:
            left = {a for a, v in self.aliases(name).items() if v == previous}
            if not left:
                status = STATUS_ARCHIVED if alias == CHAMPION else STATUS_SUPERSEDED
                self.client.set_model_version_tag(name, previous, TAG_STATUS, status)
        return self.audit.append(name, alias, previous, version, reason, actor, evidence)

    def remove_alias(
        self, name: str, alias: str, reason: str, actor: str, evidence: dict[str, Any] | None = None
    ) -> AuditEntry | None:
        """Unset `alias` (audited); None when it was not set."""
        previous = self.alias_version(name, alias)
        if previous is None:
            return None
        self.client.delete_registered_model_alias(name, alias)
        return self.audit.append(name, alias, previous, None, reason, actor, evidence)

    # ------------------------------------------------------------------------ status, queue tags

    def set_status(self, name: str, version: str, status: str, tags: dict[str, str] | None = None) -> None:
        """Tag `version` with `status` (and any extra `tags`); no alias moves."""
        for key, value in {**(tags or {}), TAG_STATUS: status}.items():
            self.client.set_model_version_tag(name, str(version), key, str(value)[:TAG_MAX_CHARS])

    def versions_with_status(self, name: str, status: str) -> list[ModelVersion]:
        """The versions of `name` tagged `status`, newest first (empty when the model does not exist)."""
        found = self.client.search_model_versions(f"name = '{name}' and tags.`{TAG_STATUS}` = '{status}'")
        return sorted(found, key=lambda mv: int(mv.version), reverse=True)

    def enqueue(self, name: str, version: str, gated_against: str | None, reason: str, actor: str,
                evidence: dict[str, Any] | None = None) -> AuditEntry:
        """Tag `version` queued (with the champion it was gated against) and audit it entering the queue."""
        self.set_status(name, version, STATUS_QUEUED,
                        {TAG_QUEUED_REASON: reason, TAG_GATED_AGAINST: gated_against or NO_CHAMPION})
        return self.audit.append(name, QUEUE, None, str(version), reason, actor, evidence)

    def dequeue(self, name: str, version: str, status: str | None, reason: str, actor: str,
                evidence: dict[str, Any] | None = None) -> AuditEntry:
        """Audit `version` leaving the queue; tag it `status` (superseded, stale) unless None (it got an alias,
        whose move set its status)."""
        if status is not None:
            self.set_status(name, version, status, {TAG_QUEUED_REASON: reason})
        return self.audit.append(name, QUEUE, str(version), None, reason, actor, evidence)

    # ------------------------------------------------------------------------ rejection, card

    def store_gate_report(self, run_id: str, markdown: str, report_json: str | None = None) -> str:
        """The gate report as the run's `gates/gate_report.md` (and `.json`): its one stored copy."""
        self._log_run_text(run_id, markdown, GATE_REPORT_PATH)
        if report_json is not None:
            self._log_run_text(run_id, report_json, GATE_REPORT_PATH.removesuffix(".md") + ".json")
        return GATE_REPORT_PATH

    def mark_rejected(
        self, name: str, version: str, reason: str, report_markdown: str, actor: str = "flywheel"
    ) -> None:
        """Tag a version rejected with its reason and a pointer to its gate report; it never holds an alias."""
        version = str(version)
        mv = self.model_version(name, version)
        for alias, v in self.aliases(name).items():
            if v == version:
                self.remove_alias(name, alias, f"version rejected: {reason}", actor)
        self.client.set_model_version_tag(name, version, TAG_STATUS, STATUS_REJECTED)
        self.client.set_model_version_tag(name, version, TAG_REJECTION_REASON, reason[:TAG_MAX_CHARS])
        if mv.run_id:
            path = self.store_gate_report(mv.run_id, report_markdown)
            self.client.set_model_version_tag(name, version, TAG_GATE_REPORT_ARTIFACT, path)
        elif len(report_markdown) <= TAG_MAX_CHARS:
            self.client.set_model_version_tag(name, version, TAG_GATE_REPORT, report_markdown)
        else:
            raise RegistryError(f"model {name} v{version}: gate report too long for a tag and no run to store it in")

    def set_model_card(self, name: str, version: str, markdown: str) -> None:
        """Store the card as `model_card/v<version>.md` in the version's run and as its description."""
        version = str(version)
        mv = self.model_version(name, version)
        if mv.run_id:
            path = f"model_card/v{version}.md"
            self._log_run_text(mv.run_id, markdown, path)
            self.client.set_model_version_tag(name, version, TAG_MODEL_CARD_ARTIFACT, path)
            description = markdown
            if len(markdown) > TAG_MAX_CHARS:
                description = markdown[: TAG_MAX_CHARS - 200] + f"\n\n… (truncated; full card: run artifact {path})"
        elif len(markdown) > TAG_MAX_CHARS:
            raise RegistryError(f"model {name} v{version}: card too long for a description and no run")
        else:
            description = markdown
        self.client.update_model_version(name, version, description=description)

    def get_model_card(self, name: str, version: str) -> str:
        """The card stored by set_model_card (the run artifact when there is one)."""
        mv = self.model_version(name, str(version))
        path = (mv.tags or {}).get(TAG_MODEL_CARD_ARTIFACT)
        if path and mv.run_id:
            return self._read_run_text(mv.run_id, path)
        if mv.description:
            return mv.description
        raise RegistryError(f"model {name} v{version} has no model card")
