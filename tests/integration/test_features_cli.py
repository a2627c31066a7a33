"""`feast apply` (the CLI) in a rendered repo: the template's definitions module works, and keeps old versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flywheel import featurestore as fs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_feast_cli_apply_in_a_rendered_repo_keeps_registered_versions(settings, dataset):
    offline = settings.resolve(settings.paths.offline_dir)
    store = fs.open_store(fs.render_repo(settings.stores, settings.paths.home))
    assert (Path(store.repo_path) / "definitions.py").is_file(), "render_repo copies the template's definitions"
    old = fs.apply_definitions(store, dataset, 30, offline)  # an older version, applied by Flywheel
    env = {"FLYWHEEL_PROFILE": "ci", "FEAST_USAGE": "False", "PATH": "/usr/bin:/bin"}
    feast = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "feast"
    run = subprocess.run([str(feast), "apply"], cwd=store.repo_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    current = fs.build_definitions(dataset, settings.features.ttl_days, offline).service_name
    fresh = fs.open_store(Path(store.repo_path))
    assert {old, current} <= {s.name for s in fresh.list_feature_services()}, "feast apply deleted a version"
