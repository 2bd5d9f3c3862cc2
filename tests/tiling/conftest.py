"""Tiny generated slides for the tiling tests (lossless, so pixels can be compared exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slide_factory import make_image, make_ome_zarr, make_pyramidal_tiff, test_image
from tiling.tiling_images import MPP, H, W, blank_image, tissue_slide_image


@pytest.fixture(scope="session")
def tiling_image() -> np.ndarray:
    return test_image(H, W, seed=3)


@pytest.fixture(scope="session")
def backend_slides(tmp_path_factory, tiling_image) -> dict[str, tuple[Path, str]]:
    """One lossless slide per backend, all of the same image: name -> (path, backend)."""
    d = tmp_path_factory.mktemp("tiling_slides")
    img = tiling_image
    return {
        "openslide": (make_pyramidal_tiff(d / "g.tif", img, 3, 128, MPP, "zlib"), "openslide"),
        "tiff-ome": (
            make_pyramidal_tiff(d / "s.ome.tif", img, 3, 128, MPP, "zlib", ome=True),
            "tiff",
        ),
        "zarr-0.4": (make_ome_zarr(d / "a.ome.zarr", img, 3, 96, MPP, "0.4"), "zarr"),
        "zarr-0.5": (make_ome_zarr(d / "b.ome.zarr", img, 3, 160, MPP, "0.5"), "zarr"),
        "image-png": (make_image(d / "p.png", img), "image"),
    }


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory):
    """Factory: ``make_slide(name, kind, h, w, tile_px=128)`` -> path of a lossless pyramidal TIFF.

    ``kind``: "tissue" (glass + two tissue blobs), "blank" (glass only), "test" (test_image).
    """
    d = tmp_path_factory.mktemp("made_slides")

    def make(name: str, kind: str, h: int, w: int, tile_px: int = 128, levels: int = 3) -> Path:
        img = {"tissue": tissue_slide_image, "blank": blank_image, "test": test_image}[kind](h, w)
        return make_pyramidal_tiff(d / f"{name}.tif", img, levels, tile_px, MPP, "zlib")

    return make
