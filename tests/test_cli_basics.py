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


def test_config_keys_map_to_options(tmp_path):
    import click

    from wsi_mil.cli.common import config_option, slide_inputs

    seen = {}

    @click.command("tile")
    @config_option
    @slide_inputs
    @click.option("--patch-size", type=int, default=224)
    @click.option("--pixels/--no-pixels", default=True)
    def cmd(slides_csv, slide_paths, patch_size, pixels):
        seen.update(slides_csv=slides_csv, patch_size=patch_size, pixels=pixels)

    cfg = tmp_path / "c.yaml"
    cfg.write_text("slides: s.csv\nepochs: 3\ntile:\n  patch-size: 96\n  pixels: false\n")
    cmd.main(["--config", str(cfg)], standalone_mode=False)
    assert seen == {"slides_csv": "s.csv", "patch_size": 96, "pixels": False}
    cmd.main(["--config", str(cfg), "--patch-size", "64"], standalone_mode=False)
    assert seen["patch_size"] == 64  # flags win
    cfg.write_text("tile:\n  patch-sise: 96\n")
    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match="patch_sise"):
        cmd.main(["--config", str(cfg)], standalone_mode=False)
