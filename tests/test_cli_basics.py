"""The CLI surface: help on every command, version, exit codes, config merging."""

from __future__ import annotations

import pytest

COMMANDS = ["synth", "info", "tile", "extract", "train", "predict", "heatmap", "run"]


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and "wsi-mil" in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_every_command(cli, cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout


def test_unknown_option_is_usage_error(cli):
    r = cli("info", "--no-such-flag")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_missing_config_file(cli, tmp_path):
    r = cli("info", "--config", str(tmp_path / "nope.yaml"), "x.svs")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
