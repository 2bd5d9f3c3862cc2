"""YAML config merging: top-level keys + a section per command; flags win."""

from __future__ import annotations

import pytest

from wsi_mil.config import SynthConfig, TileConfig, from_dict, load_config_file
from wsi_mil.errors import ConfigError


def test_sections_and_normalised_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "work: W\npatch-size: 128\ntile:\n  min-tissue: 0.3\n  patch_size: 96\ntrain:\n  epochs: 3\n"
    )
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


def test_top_level_scalar_named_like_a_command_is_an_option(tmp_path):
    # "run" is both a command (its section) and the --run option of train/predict/heatmap
    p = tmp_path / "c.yaml"
    p.write_text("work: W\nrun: out/run\ntrain:\n  epochs: 2\n")
    assert load_config_file(p, "train") == {"work": "W", "run": "out/run", "epochs": 2}
    assert load_config_file(p, "predict") == {"work": "W", "run": "out/run"}
    assert load_config_file(p, "run") == {"work": "W", "run": "out/run"}
    # a section of the command still wins over the top-level value
    p.write_text("run: out/run\nheatmap:\n  run: out/other\n")
    assert load_config_file(p, "heatmap") == {"run": "out/other"}
    assert load_config_file(p, "predict") == {"run": "out/run"}


def test_command_named_key_holding_a_mapping_is_a_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("work: W\nrun:\n  stages: train,predict\ntrain:\n  run: R\nsynth:\n")
    assert load_config_file(p, "run") == {"work": "W", "stages": "train,predict"}
    assert load_config_file(p, "train") == {"work": "W", "run": "R"}
    assert load_config_file(p, "predict") == {"work": "W"}  # no section key leaks as an option
    assert load_config_file(p, "synth") == {"work": "W"}  # an empty section is a section


def test_shipped_configs_still_load(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        train = load_config_file(c, "train")
        assert isinstance(train.get("run"), str), c  # each sets train's run folder
        assert "train" not in train and "tile" not in train and "synth" not in train


def test_cli_top_level_run_sets_the_run_folder(tmp_path, cli):
    (tmp_path / "slides.csv").write_text("slide_id,path\na,\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("work: W\nrun: R/top\nslides: slides.csv\n")
    r = cli("run", "--config", str(cfg), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for stage in ("train", "predict", "heatmap"):
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"[run] {stage} ")]
        assert "R/top/" in line and "runs/default" not in line, line
    # the real commands read it too: they look for their run in R/top
    for cmd in ("predict", "heatmap"):
        r = cli(cmd, "--config", str(cfg), cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "R/top" in r.stderr and "runs/default" not in r.stderr, r.stderr


def test_cli_typo_in_top_level_key_or_section_is_refused(tmp_path, cli):
    (tmp_path / "s.csv").write_text("slide_id,path\n")
    for text, bad, guess in (
        ("slides: s.csv\nwrok: W\n", "wrok", "work"),
        ("slides: s.csv\ntrian:\n  epochs: 3\n", "trian", "train"),
        ("slides: s.csv\npatch-sise: 64\n", "patch-sise", "patch-size"),
    ):
        (tmp_path / "c.yaml").write_text(text)
        r = cli("tile", "--config", "c.yaml", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert f"unknown top-level key(s): {bad} (did you mean '{guess}'?)" in r.stderr
        assert not (tmp_path / "work").exists()  # refused before doing anything


def test_top_level_keys_of_any_command_or_section_are_accepted(tmp_path):
    from wsi_mil.cli import cli as group
    from wsi_mil.cli.common import _check_top_level_keys

    # epochs (train), patch-size (tile), n-slides (synth), style (heatmap), stages (run),
    # a workflow: section (the Snakefile) and every command's section
    p = tmp_path / "c.yaml"
    p.write_text(
        "epochs: 2\npatch-size: 64\nn_slides: 3\nstyle: smooth\nstages: train\n"
        "workflow:\n  threads: {tile: 2}\nsynth:\ntile:\n  level: 1\nrun: R\n"
    )
    for cmd in group.commands.values():
        _check_top_level_keys(str(p), cmd)
    p.write_text("epocs: 2\n")
    with pytest.raises(ConfigError, match="epocs .did you mean 'epochs'"):
        _check_top_level_keys(str(p), group.commands["tile"])


def test_shipped_configs_pass_the_unknown_key_check():
    from pathlib import Path

    import click

    from wsi_mil.cli import cli as group
    from wsi_mil.cli.common import _load_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        for name, cmd in group.commands.items():
            ctx = click.Context(cmd)
            _load_config(ctx, None, str(c))  # raises ConfigError on any unknown key
            assert ctx.default_map is not None, (c, name)


def test_shipped_config_comments_match_the_tool():
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs"
    for c in sorted(configs.glob("*.yaml")):
        for line in c.read_text().splitlines():
            if line.startswith("#") and "torchrun" in line and " -m " in line:
                # without '--' torchrun takes --run for its own --run-path and stops
                assert "-m -- wsi_mil" in line and "--standalone" in line, (c.name, line)
    small = load_config_file(configs / "e2e-small.yaml", "synth")
    demo = (configs / "demo.yaml").read_text()
    if "test=" in small["splits"]:
        assert "without a test split" not in demo
        assert small["splits"].split(",")[-1].split("=")[1] in demo  # its test share is named
