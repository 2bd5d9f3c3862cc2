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


def test_global_options_also_work_after_the_command(cli, tmp_path):
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
    (tmp_path / "junk.pt").write_text("hi\n")
    # an (unreadable) store: extract gets to the slide, which fails (exit 1)
    (tmp_path / "work" / "patches" / "a.zarr").mkdir(parents=True)
    base = ("extract", "--slides", "s.csv", "--device", "cpu")
    plain = cli(*base, cwd=tmp_path)
    assert plain.returncode == 1 and "INFO: extract: 1 slides" in plain.stderr, plain.stderr
    for args in (("-q", *base), (*base, "-q"), (*base, "--quiet")):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert "No such option" not in r.stderr and "INFO" not in r.stderr, (args, r.stderr)
    r = cli(*base, "-v", cwd=tmp_path)  # -v adds the logger name to each line
    assert "INFO wsi_mil.features.extract: extract: 1 slides" in r.stderr, r.stderr
    r = cli(*base, "--weights", "junk.pt", "--debug", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr
    r = cli(*base, "--weights", "junk.pt", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    # listed in every command's --help
    r = cli("tile", "-q", "--help")
    assert r.returncode == 0 and "-q, --quiet" in r.stdout


@pytest.mark.parametrize("text, says", [("slide_id,path\n", "has no rows"), ("", "is empty")])
def test_empty_slide_table_is_named(cli, tmp_path, text, says):
    (tmp_path / "e.csv").write_text(text)
    r = cli("tile", "--slides", "e.csv", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"slide table e.csv {says}" in r.stderr and "no slides given" not in r.stderr, r.stderr


def test_quiet_from_a_config_counts_once_under_run(cli, tmp_path):
    """A config's quiet: 1 means -q for the stage alone and under 'wsi-mil run' (which
    forwards its counts to each stage, which reads the same config again)."""
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
    warning = "WARNING: encoder resnet-patch-cnn has no --weights"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("slides: s.csv\ndevice: cpu\nquiet: 1\n")
    # an (unreadable) store: extract gets to the slide, which fails (exit 1)
    (tmp_path / "work" / "patches" / "a.zarr").mkdir(parents=True)
    alone = cli("extract", "--config", "c.yaml", cwd=tmp_path)
    under_run = cli("run", "--config", "c.yaml", "--stages", "extract", cwd=tmp_path)
    for r in (alone, under_run):
        assert r.returncode == 1, r.stderr
        assert warning in r.stderr and "INFO" not in r.stderr, r.stderr
    # a command-line -q plus the config's quiet: 1 is still one -q; -qq is quieter
    r = cli("-q", "run", "--config", "c.yaml", "--stages", "extract", cwd=tmp_path)
    assert warning in r.stderr, r.stderr
    r = cli("-qq", "run", "--config", "c.yaml", "--stages", "extract", cwd=tmp_path)
    assert warning not in r.stderr and "ERROR" in r.stderr, r.stderr
    # quiet in the run: section reaches the stages too
    cfg.write_text("slides: s.csv\ndevice: cpu\nrun:\n  quiet: 2\n")
    r = cli("run", "--config", "c.yaml", "--stages", "extract", cwd=tmp_path)
    assert r.returncode == 1 and warning not in r.stderr and "ERROR" in r.stderr, r.stderr
