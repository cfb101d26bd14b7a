"""ray_cluster.yaml passes Ray's own cluster-launcher schema validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_config_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "no GPU worker node type"
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "dvc pull" in setup


def test_schema_rejects_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    cfg["setup_commands"] = [{"not": "a string"}]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))
