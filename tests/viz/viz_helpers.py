"""Helpers for the viz tests: attention files in the agreed layout and tiny real slides."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from slide_factory import make_pyramidal_tiff


def write_attention_file(
    path: Path,
    coords: np.ndarray,
    attention: np.ndarray,
    slide_path: str | Path = "",
    patch_size_level0: int = 64,
    level0_size: tuple[int, int] = (0, 0),
    label: int = -1,
    prob: float = 0.5,
    split: str = "",
) -> Path:
    """``R/attention/<id>.h5`` exactly as interfaces.md specifies it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.create_dataset("attention", data=np.asarray(attention, np.float32))
        f.attrs["slide_id"] = path.stem
        f.attrs["slide_path"] = str(slide_path)
        f.attrs["patch_size_level0"] = int(patch_size_level0)
        f.attrs["level0_width"] = int(level0_size[0])
        f.attrs["level0_height"] = int(level0_size[1])
        f.attrs["prob"] = float(prob)
        f.attrs["label"] = int(label)
        f.attrs["split"] = split
    return path


def grid_coords(width: int, height: int, patch: int) -> np.ndarray:
    """(N, 2) int64 top-left level-0 xy of a gap-free patch grid, row by row."""
    xs, ys = np.meshgrid(np.arange(0, width, patch), np.arange(0, height, patch))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def white_slide(path: Path, width: int, height: int, n_levels: int = 3) -> Path:
    """A lossless pyramidal TIFF that is white everywhere."""
    img = np.full((height, width, 3), 255, np.uint8)
    return make_pyramidal_tiff(path, img, n_levels=n_levels, tile_px=128, compression="zlib")


def blueness(rgb: np.ndarray) -> np.ndarray:
    """How blue a pixel over a white background is: 0 (white) .. 255 (pure blue)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return 255.0 - (rgb[..., 0] + rgb[..., 1]) / 2.0
