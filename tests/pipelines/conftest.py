"""Tiny synthetic slides + a YAML config for the pipeline tests (made once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pipeline_helpers import N_SLIDES, SLIDE_PX, write_config


@pytest.fixture(scope="session")
def tiny_slides(tmp_path_factory) -> Path:
    """``slides/slides.csv`` of N_SLIDES labelled 768^2 tissue TIFFs (split train/val)."""
    from wsi_mil.config import SynthConfig
    from wsi_mil.synth import generate

    out = tmp_path_factory.mktemp("pipeline_slides") / "slides"
    generate(
        SynthConfig(
            out=out,
            n_slides=N_SLIDES,
            width_px=SLIDE_PX,
            height_px=SLIDE_PX,
            format="tiff",
            markers_min=1,
            markers_max=2,
            splits="train=0.5,val=0.5",
            seed=3,
            workers=1,
        )
    )
    return out / "slides.csv"


@pytest.fixture
def workdir(tmp_path, tiny_slides) -> Path:
    """A fresh folder with a copy of the slides and a config that points at them."""
    shutil.copytree(tiny_slides.parent, tmp_path / "slides")
    write_config(tmp_path, Path("slides/slides.csv"))
    return tmp_path
