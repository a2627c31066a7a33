"""Where reference profiles live: the training run of a model version (MLflow), or a file.

The training flow logs the profile into the training run as `monitoring/reference_profile.json` with the
run tag `flywheel.reference_profile_sha256`; a version finds it through its run. The digest is checked on
every read, so an altered profile is refused rather than silently judging against other numbers.
mlflow is imported inside the functions (import cost); nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.monitoring.profile import PROFILE_ARTIFACT, MonitoringError, ReferenceProfile

if TYPE_CHECKING:
    from flywheel.registry import Registry

TAG_PROFILE_SHA256 = "flywheel.reference_profile_sha256"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def log_profile(client: Any, run_id: str, profile: ReferenceProfile) -> str:
    """Store `profile` in the MLflow run `run_id` (artifact + digest tag); the artifact path."""
    text = profile.to_json()
    client.log_text(run_id, text, PROFILE_ARTIFACT)
    client.set_tag(run_id, TAG_PROFILE_SHA256, sha256_text(text))
    return PROFILE_ARTIFACT


def resolve_version(registry: Registry, model: str, reference: str) -> str:
    """A version number from an alias (`champion`, `challenger`, ...) or a version (`3`, `v3`)."""
    from flywheel.errors import RegistryError

    ref = reference.removeprefix("v") if reference[1:].isdigit() else reference
    if ref.isdigit():
        registry.model_version(model, ref)  # RegistryError when it does not exist
        return ref
    version = registry.alias_version(model, reference)
    if version is None:
        raise RegistryError(f"model {model!r} has no alias {reference!r} (and no such profile file)")
    return version


def load_version_profile(registry: Registry, model: str, version: str) -> ReferenceProfile:
    """The profile stored with the training run of `model` v`version` (its digest checked)."""
    from mlflow.exceptions import MlflowException

    mv = registry.model_version(model, version)
    what = f"model {model} v{version}"
    if not mv.run_id:
        raise MonitoringError(f"{what} has no training run, so no reference profile")
    client = registry.client
    try:
        with tempfile.TemporaryDirectory(prefix="flywheel-profile-") as tmp:
            text = Path(client.download_artifacts(mv.run_id, PROFILE_ARTIFACT, dst_path=tmp)).read_text()
    except (MlflowException, OSError) as exc:
        raise MonitoringError(
            f"{what} has no reference profile ({PROFILE_ARTIFACT} in run {mv.run_id}): was it trained before "
            "monitoring existed? Profile data with --reference-data FILE instead"
        ) from exc
    expected = client.get_run(mv.run_id).data.tags.get(TAG_PROFILE_SHA256)
    if expected is None or expected != sha256_text(text):
        raise MonitoringError(f"{what}: {PROFILE_ARTIFACT} does not match its recorded digest; refusing to use it")
    return ReferenceProfile.from_json(text, f"{what} {PROFILE_ARTIFACT}")


def load_profile_file(path: Path) -> ReferenceProfile:
    """A profile saved as JSON (e.g. downloaded from a training run)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MonitoringError(f"cannot read reference profile {path}: {exc}") from None
    return ReferenceProfile.from_json(text, str(path))


def file_key(prefix: str, path: Path) -> str:
    """The series key of a reference given as a file: `<prefix>:<first 12 hex digits of its sha256>`."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"{prefix}:{h.hexdigest()[:12]}"
