"""The Ray cluster-launcher configs under cluster/launcher/ pass Ray's own checks (``ray up`` runs the same two:
defaults filled in from the provider, then Ray's launcher schema, ray/autoscaler/ray-schema.json)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "cluster/launcher").glob("*.yaml"))


def test_there_is_a_launcher_config():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path: Path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    gpu = [t for t in config["available_node_types"].values() if "worker_image" in t.get("docker", {})]
    assert gpu and all(t["docker"]["worker_image"].endswith("-cuda") for t in gpu)


def test_a_misspelt_field_fails_rays_schema():
    config = yaml.safe_load(CONFIGS[0].read_text())
    broken = copy.deepcopy(config)
    broken["idle_timeout_minute"] = broken.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(broken))
