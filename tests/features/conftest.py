"""Helpers for feature tests: tiny patch stores written with PatchStoreWriter."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wsi_mil.tiling.patch_store import PatchStoreWriter


def grid_coords(nx: int, ny: int, step: int, offset: int = 0) -> np.ndarray:
    """(nx * ny, 2) int64 level-0 (x, y) of a regular grid, row-major."""
    xs, ys = np.meshgrid(np.arange(nx) * step + offset, np.arange(ny) * step + offset)
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def store_attrs(
    patch_px: int,
    level0_wh: tuple[int, int],
    level: int = 0,
    downsample: float = 1.0,
    slide_path: str = "",
) -> dict:
    return {
        "level": level,
        "downsample": downsample,
        "patch_size": patch_px,
        "patch_size_level": patch_px,
        "stride": patch_px,
        "level0_width": level0_wh[0],
        "level0_height": level0_wh[1],
        "mpp": 0.5,
        "slide_path": slide_path,
    }


def write_random_store(
    path: Path, n: int, patch_px: int = 32, seed: int = 0, chunk_patches: int = 64
) -> Path:
    """A pixel store of ``n`` random-noise patches on a square-ish grid."""
    side = int(np.ceil(np.sqrt(max(n, 1))))
    coords = grid_coords(side, side, patch_px)[:n]
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (n, patch_px, patch_px, 3), dtype=np.uint8)
    attrs = store_attrs(patch_px, (side * patch_px, side * patch_px))
    with PatchStoreWriter(path, coords, attrs, chunk_patches=chunk_patches) as w:
        if n:
            w.write_pixels(0, pix)
        w.commit()
    return path


@pytest.fixture
def fx() -> SimpleNamespace:
    """The helpers above, for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(
        grid_coords=grid_coords, store_attrs=store_attrs, write_random_store=write_random_store
    )
