"""Feast objects of the configured dataset, for the `feast` CLI (`feast plan`, `feast apply`).

Nothing is hand-written here: source -> entity -> feature view -> feature service all come from the
dataset definition (configs/datasets/*.yaml) through flywheel.featurestore.build_definitions, the same
code Flywheel's Python API applies. Settings are found like every entry point does: FLYWHEEL_PROFILE,
FLYWHEEL_CONFIG_DIR, or the nearest `configs/` folder above this file.

`feast apply` deletes registered objects that the repo does not declare. Feature services are
immutable, versioned by name, and older models still read theirs, so the versions already in the
registry are re-declared below, unchanged, next to the current one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flywheel.featurestore import TAG_DATASET, build_definitions
from flywheel.schemas import load_dataset
from flywheel.settings import load_settings


def _config_dir() -> Path:
    if os.environ.get("FLYWHEEL_CONFIG_DIR"):
        return Path(os.environ["FLYWHEEL_CONFIG_DIR"])
    for folder in Path(__file__).resolve().parents:
        if (folder / "configs" / "base.yaml").is_file():
            return folder / "configs"
    raise RuntimeError(f"no configs/base.yaml above {__file__}; set FLYWHEEL_CONFIG_DIR")


def _registered(dataset_name: str, current: set[str], shared_source: Any) -> dict[str, Any]:
    """Views and services of this dataset already in the registry (other versions than the current)."""
    from feast import FeatureStore, FeatureView

    here = Path(__file__).resolve().parent
    yaml_file = Path(os.environ.get("FEAST_FS_YAML_FILE_PATH", here / "feature_store.yaml"))
    if not yaml_file.is_file():
        return {}
    try:
        store = FeatureStore(repo_path=str(here), fs_yaml_file=yaml_file)
        found = [*store.list_feature_views(tags={TAG_DATASET: dataset_name}),
                 *store.list_feature_services(tags={TAG_DATASET: dataset_name})]
    except Exception:  # no registry yet: nothing to keep
        return {}
    kept = [o for o in found if o.name not in current]
    for obj in kept:
        if isinstance(obj, FeatureView):
            # every version reads the dataset's one source; Feast refuses two source objects of one name
            obj.batch_source = shared_source
    return {f"_kept_{type(o).__name__}_{o.name}": o for o in kept}


_settings = load_settings(config_dir=_config_dir())
_dataset = load_dataset(_settings.resolve(_settings.dataset))
_defs = build_definitions(_dataset, _settings.features.ttl_days, _settings.resolve(_settings.paths.offline_dir))

source = _defs.source
entity = _defs.entity
feature_view = _defs.view
feature_service = _defs.service

# Feast collects module attributes by type, so the kept versions become module globals.
globals().update(_registered(_dataset.name, {feature_view.name, feature_service.name}, source))
