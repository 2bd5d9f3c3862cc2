"""Options shared by several commands behave the same in each (device, norm, config values)."""

from __future__ import annotations

import re

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
