"""Generated slides shared by the slide tests (written once per session, a few hundred KB)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from slide_factory import (
    make_image,
    make_ome_zarr,
    make_pyramidal_tiff,
    pyramid_levels,
    test_image,
)

# level-0 size divisible by 4, so all three levels have exact 2x/4x downsamples
H, W = 600, 840
N_LEVELS = 3
MPP = 0.5


@dataclass(frozen=True)
class SlideCase:
    """A generated slide and what a reader must return for it."""

    name: str
    path: Path
    backend: str  # the backend forced in the conformance suite
    levels: list[np.ndarray]  # expected pixels per level
    mpp: float | None
    tile_px: int | None  # expected native tile size (None: untiled)


@pytest.fixture(scope="session")
def source_image() -> np.ndarray:
    return test_image(H, W, seed=7)


@pytest.fixture(scope="session")
def slide_cases(tmp_path_factory, source_image) -> dict[str, SlideCase]:
    """One lossless slide per backend (plus format variants), all of the same image."""
    d = tmp_path_factory.mktemp("slides")
    levels = pyramid_levels(source_image, N_LEVELS)
    cases = {
        "openslide": SlideCase(
            "openslide",
            make_pyramidal_tiff(d / "generic.tif", source_image, N_LEVELS, 256, MPP, "zlib"),
            "openslide",
            levels,
            MPP,
            256,
        ),
        "tiff-ome-subifd": SlideCase(
            "tiff-ome-subifd",
            make_pyramidal_tiff(
                d / "sub.ome.tif", source_image, N_LEVELS, 128, MPP, "zlib", ome=True
            ),
            "tiff",
            levels,
            MPP,
            128,
        ),
        "tiff-generic": SlideCase(
            "tiff-generic",
            make_pyramidal_tiff(d / "generic2.tif", source_image, N_LEVELS, 256, MPP, "zlib"),
            "tiff",
            levels,
            MPP,
            256,
        ),
        "zarr-0.4": SlideCase(
            "zarr-0.4",
            make_ome_zarr(d / "v04.ome.zarr", source_image, N_LEVELS, 128, MPP, "0.4"),
            "zarr",
            levels,
            MPP,
            128,
        ),
        "zarr-0.5": SlideCase(
            "zarr-0.5",
            make_ome_zarr(d / "v05.ome.zarr", source_image, N_LEVELS, 256, MPP, "0.5"),
            "zarr",
            levels,
            MPP,
            256,
        ),
        "image-png": SlideCase(
            "image-png", make_image(d / "plain.png", source_image), "image", levels[:1], None, None
        ),
    }
    return cases
