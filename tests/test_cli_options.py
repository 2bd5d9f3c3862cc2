"""Options shared by several commands behave the same in each (device, norm, config values)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.features.extract import resolve_device


def test_resolve_device_accepts_cuda_n_like_train_and_predict(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CUDA") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        resolve_device("cuda:0")


def _tag(stderr: str) -> str:
    m = re.search(r"-> (\S*features/\S+) on", stderr)
    assert m, stderr
    return m.group(1)


def test_extract_takes_cuda_n_and_a_shared_top_level_norm(cli, tmp_path):
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
    r = cli("extract", "--slides", "s.csv", "--device", "cuda:0", cwd=tmp_path)
    assert "Invalid value" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "no CUDA device is visible" in r.stderr
    # a config shared with train: top-level norm: frozen-bn is extract's bn (same features)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("slides: s.csv\nnorm: frozen-bn\ndevice: cpu\ntrain:\n  mode: e2e\n")
    # an (unreadable) store: extract gets to the slide, which fails (exit 1)
    (tmp_path / "work" / "patches" / "a.zarr").mkdir(parents=True)
    shared = cli("extract", "--config", "c.yaml", cwd=tmp_path)
    assert shared.returncode == 1, shared.stderr  # gets to the slide: no patch store (tile first)
    plain = cli("extract", "--slides", "s.csv", "--device", "cpu", "--norm", "bn", cwd=tmp_path)
    assert _tag(shared.stderr) == _tag(plain.stderr)


def test_bad_config_value_names_the_file_and_the_section_to_use(cli, tmp_path):
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
    (tmp_path / "c.yaml").write_text("slides: s.csv\nscheduler: linear\n")
    r = cli("train", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "c.yaml: top-level key 'scheduler'" in r.stderr and "'linear'" in r.stderr
    assert "section" in r.stderr
    (tmp_path / "c.yaml").write_text("slides: s.csv\ntrain:\n  epochs: many\n")
    r = cli("train", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "c.yaml: 'train:' section key 'epochs'" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "body,msg",
    [
        ("tile:\n  patch-size: 1.5\n", "'patch-size': Invalid value: 1.5 is not a whole number"),
        ("level: true\n", "top-level key 'level': Invalid value: True is a boolean, not a number"),
        ("tile:\n  min-tissue: yes\n", "'min-tissue': Invalid value: True is a boolean"),
        ("tile: 5\n", "'tile:' must be a section of option names and values, got 5"),
    ],
)
def test_yaml_values_the_command_line_would_refuse_are_refused(cli, tmp_path, body, msg):
    """click would turn 1.5 into 1 and true into 1 for integer options; a section that is
    not a mapping was ignored."""
    (tmp_path / "c.yaml").write_text(body)
    r = cli("tile", "a.tiff", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert msg in r.stderr, r.stderr


def test_whole_numbers_and_a_run_path_stay_valid_in_yaml(cli, tmp_path):
    (tmp_path / "c.yaml").write_text("run: out/r\ntile:\n  patch-size: 64.0\n")
    r = cli("tile", "missing.tiff", "--config", "c.yaml", "-w", "W", cwd=tmp_path)
    assert r.returncode == 1 and "file not found" in r.stderr, r.stderr  # got to the slide


def _junk_files(folder):
    folder.mkdir(exist_ok=True)
    (folder / "text.pt").write_text("hi\n")
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, folder / "good.pt")
    good = (folder / "good.pt").read_bytes()
    (folder / "cut.pt").write_bytes(good[: len(good) // 2])
    return {"text.pt": "text file", "empty.pt": "empty", "cut.pt": "truncated"}


def test_unreadable_weights_file_says_it_is_not_a_pytorch_file(cli, tmp_path):
    cases = _junk_files(tmp_path / "j")
    (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
    for name, why in cases.items():
        r = cli("extract", "--slides", "s.csv", "--weights", f"j/{name}", cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert (
            f"--weights j/{name} cannot be loaded: it is not a PyTorch weights file" in r.stderr
        ), r.stderr
        assert why in r.stderr and "torch.save(model.state_dict(), path)" in r.stderr
        assert "weights_only" not in r.stderr


def test_unreadable_checkpoint_says_it_is_not_a_pytorch_checkpoint(tmp_path):
    from wsi_mil.errors import StoreError
    from wsi_mil.train.loop import load_checkpoint_file

    for name, why in _junk_files(tmp_path).items():
        with pytest.raises(StoreError) as e:
            load_checkpoint_file(tmp_path / name)
        msg = str(e.value)
        assert f"{tmp_path / name} is not a PyTorch checkpoint" in msg and why in msg, msg
        assert "--checkpoint best, last" in msg


def test_timm_install_hint_is_the_editable_install_of_the_clone(cli, tmp_path):
    r = cli("extract", "--help")
    text = " ".join(r.stdout.split())
    assert "pip install -e '.[timm]'" in text and "wsi-mil[timm]" not in text, text
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        (tmp_path / "s.csv").write_text("slide_id,path\na,a.tiff\n")
        r = cli("extract", "--slides", "s.csv", "--encoder", "timm:resnet18", cwd=tmp_path)
        assert r.returncode == 2 and "needs timm" in r.stderr, r.stderr
        assert "pip install -e '.[timm]'" in r.stderr and "wsi-mil[timm]" not in r.stderr


@pytest.mark.parametrize(
    "command, config_classes",
    [
        ("synth", ["SynthConfig"]),
        ("tile", ["TileConfig"]),
        ("extract", ["ExtractConfig"]),
        ("train", ["TrainConfig", "ModelConfig"]),
        ("predict", ["PredictConfig"]),
        ("heatmap", ["HeatmapConfig"]),
    ],
)
def test_cli_defaults_are_the_config_defaults(command, config_classes):
    """A flag left out and a key left out of a config file mean the same value: every option
    default equals the dataclass field of the same name (None = "the library decides")."""
    import dataclasses

    import wsi_mil.config as config
    from wsi_mil.cli import cli

    fields = {}
    for name in config_classes:
        for f in dataclasses.fields(getattr(config, name)):
            if f.default is not dataclasses.MISSING:
                fields[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = f.default_factory()
    from wsi_mil.workflow import _CLICK_UNSET

    checked = 0
    for p in cli.commands[command].params:
        got = p.default() if callable(p.default) else p.default
        if got is _CLICK_UNSET:  # click >= 8.2: no default given; a flag is then off
            got = False if getattr(p, "is_flag", False) else None
        if p.name not in fields or (got is None and p.required):
            continue
        want = fields[p.name]
        if got is None:  # the CLI hands None to the config: it must mean the same there
            assert want is None, f"{command} --{p.name}: CLI default None, config {want!r}"
            checked += 1
            continue
        if p.name == "backend" and (got, want) == ("auto", None):  # the CLI spells None "auto"
            want = "auto"
        if isinstance(want, tuple | list) and isinstance(got, tuple | list):
            want, got = list(want), list(got)
        if isinstance(want, Path):
            got = Path(got)
        assert got == want, f"{command} --{p.name}: CLI default {got!r}, config {want!r}"
        checked += 1
    assert checked >= 3, (command, checked)


@pytest.mark.parametrize(
    ("opt", "value", "msg"),
    [
        ("--lr", "-1", "--lr -1.0 must be >= 0"),
        ("--weight-decay", "-1", "--weight-decay -1.0 must be >= 0"),
        ("--beta1", "1.5", r"--beta1 1.5 is outside \[0, 1\)"),
        ("--beta2", "-0.1", r"--beta2 -0.1 is outside \[0, 1\)"),
        ("--folds", "1", "--folds 1: k-fold cross-validation needs at least 2 folds"),
        ("--patience", "-1", "--patience -1 must be >= 0"),
        ("--min-delta", "-0.5", "--min-delta -0.5 must be >= 0"),
    ],
)
def test_out_of_range_optimiser_values_are_usage_errors(cli, tmp_path, opt, value, msg):
    """Were 'internal error: ValueError' from AdamW, exit 1 (= some slides failed)."""
    import re

    (tmp_path / "s.csv").write_text("slide_id,path,label\na,a.tiff,1\n")
    r = cli("train", "--slides", "s.csv", "--run", "r", opt, value, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert re.search(msg, r.stderr) and "Traceback" not in r.stderr, r.stderr


def test_no_resume_on_the_command_line_beats_resume_in_a_config(cli, tmp_path):
    """'resume: true' in a config could not be turned off by a flag (no --no-resume)."""
    import h5py

    (tmp_path / "s.csv").write_text("slide_id,path,label\na,a.tiff,1\nb,b.tiff,0\n")
    (tmp_path / "F").mkdir()
    for sid in "ab":
        with h5py.File(tmp_path / "F" / f"{sid}.h5", "w") as f:
            f["features"] = np.ones((5, 128), np.float32)
            f["coords"] = np.arange(10).reshape(5, 2) * 224
    (tmp_path / "c.yaml").write_text("train:\n  resume: true\n")
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.pt").write_text("not a checkpoint")
    args = ("train", "--config", "c.yaml", "--slides", "s.csv", "--run", "r", "--features", "F")
    resumed = cli(*args, cwd=tmp_path)  # tries to resume the broken last.pt
    assert resumed.returncode == 2 and "not a PyTorch checkpoint" in resumed.stderr
    assert "--overwrite" in resumed.stderr and "--checkpoint" not in resumed.stderr
    fresh = cli(*args, "--no-resume", cwd=tmp_path)  # a fresh start: the run is in the way
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr, fresh.stderr
