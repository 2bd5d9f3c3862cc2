"""YAML config merging: top-level keys + a section per command; flags win."""

from __future__ import annotations

import pytest

from wsi_mil.config import SynthConfig, TileConfig, from_dict, load_config_file
from wsi_mil.errors import ConfigError


def test_sections_and_normalised_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("work: W\npatch-size: 128\ntile:\n  min-tissue: 0.3\n  patch_size: 96\ntrain:\n  epochs: 3\n")
    assert load_config_file(p, "tile") == {"work": "W", "patch_size": 96, "min_tissue": 0.3}
    assert load_config_file(p, "train") == {"work": "W", "patch_size": 128, "epochs": 3}


def test_bad_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(p, "tile")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(p, "tile")


def test_from_dict_rejects_unknown_keys():
    assert from_dict(TileConfig, {"patch_size": 64}).patch_size == 64
    with pytest.raises(ConfigError, match="patch_sise"):
        from_dict(TileConfig, {"patch_sise": 64})
    assert SynthConfig().seed == 0
