"""Pure patch-grid maths: which pyramid level to read, patch sizes and positions.

Units are in the names: ``*_level0`` = level-0 px, ``*_level`` = px at the level that is
read, ``*_out`` / ``patch_px`` = px of the stored (output) patch. ``downsample`` is always
level-0 px per output px. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_mil.errors import ConfigError


@dataclass(frozen=True)
class LevelChoice:
    """Where and how patches are read.

    ``level``: pyramid level read; ``patch_px``: output patch side; ``patch_px_level``:
    side read at ``level`` (== ``patch_px`` unless resized); ``stride_level``: grid step at
    ``level``; ``level_downsample``: level-0 px per ``level`` px; ``downsample``: level-0 px
    per output px; ``resized``: whether patches are resampled from ``patch_px_level``.
    """

    level: int
    patch_px: int
    patch_px_level: int
    stride_level: int
    level_downsample: float
    downsample: float

    @property
    def resized(self) -> bool:
        return self.patch_px_level != self.patch_px

    @property
    def patch_px_level0(self) -> float:
        return self.patch_px_level * self.level_downsample


def choose_level(
    level_downsamples: Sequence[float],
    patch_px: int,
    stride_px: int | None = None,
    level: int | None = None,
    target_mpp: float | None = None,
    slide_mpp: float | None = None,
    mpp_tolerance: float = 0.1,
) -> LevelChoice:
    """Pick the level to read for ``level`` or ``target_mpp`` (exclusive; neither = level 0).

    For ``target_mpp`` a level whose mpp is within ``mpp_tolerance`` (relative) of the
    target is read as is; otherwise the nearest finer level is read with a larger patch
    (``patch_px_level``) that is resized to ``patch_px``. ``stride_px`` (output px,
    default ``patch_px``) is scaled the same way.
    """
    if patch_px < 1:
        raise ConfigError(f"--patch-size must be >= 1, got {patch_px}")
    stride_px = patch_px if stride_px is None else int(stride_px)
    if stride_px < 1:
        raise ConfigError(f"--stride must be >= 1, got {stride_px}")
    ds = [float(d) for d in level_downsamples]
    if level is not None and target_mpp is not None:
        raise ConfigError("--level and --mpp are exclusive", "give one of them")
    if target_mpp is None:
        lv = 0 if level is None else int(level)
        if not 0 <= lv < len(ds):
            raise ConfigError(
                f"--level {lv} does not exist (the slide has {len(ds)} "
                f"level{'s' if len(ds) != 1 else ''})",
                f"use a level in 0..{len(ds) - 1}",
            )
        return LevelChoice(lv, patch_px, patch_px, stride_px, ds[lv], ds[lv])
    if target_mpp <= 0:
        raise ConfigError(f"--mpp must be > 0, got {target_mpp}")
    if slide_mpp is None or slide_mpp <= 0:
        raise ConfigError(
            "--mpp needs the slide's microns per pixel, which the file does not record",
            "pass --slide-mpp (level-0 microns per pixel) or use --level",
        )
    target_ds = target_mpp / slide_mpp
    # a level close enough to the target is read without resampling
    rel = [abs(d / target_ds - 1.0) for d in ds]
    best = int(np.argmin(rel))
    if rel[best] <= mpp_tolerance:
        return LevelChoice(best, patch_px, patch_px, stride_px, ds[best], ds[best])
    finer = [i for i, d in enumerate(ds) if d <= target_ds]
    lv = max(finer, key=lambda i: ds[i]) if finer else 0  # finer than level 0: upsample level 0
    scale = target_ds / ds[lv]
    patch_px_level = max(1, int(round(patch_px * scale)))
    stride_level = max(1, int(round(stride_px * scale)))
    return LevelChoice(
        lv, patch_px, patch_px_level, stride_level, ds[lv], ds[lv] * patch_px_level / patch_px
    )


def grid_level_xy(level_w: int, level_h: int, stride_level: int) -> np.ndarray:
    """(N, 2) int64 top-left (x, y) in level px of every grid patch, row-major.

    Every start position inside the level is kept, so the right and bottom strips are
    covered by edge patches that run past the image (read as white padding).
    """
    xs = np.arange(0, max(int(level_w), 0), int(stride_level), dtype=np.int64)
    ys = np.arange(0, max(int(level_h), 0), int(stride_level), dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def level_to_level0_xy(level_xy: np.ndarray, level_downsample: float) -> np.ndarray:
    """(N, 2) int64 level-0 px of level-px positions (``round(level_xy * level_downsample)``).

    ``Slide.read_region`` maps a level-0 corner back with ``round(x / level_downsample)``,
    which recovers ``level_xy`` exactly for downsamples >= 1.
    """
    xy = np.asarray(level_xy, np.float64).reshape(-1, 2) * float(level_downsample)
    return np.floor(xy + 0.5).astype(np.int64)


def level0_to_level_xy(level0_xy: np.ndarray, level_downsample: float) -> np.ndarray:
    """(N, 2) int64 level px of level-0 positions, rounded as ``Slide.read_region`` does."""
    xy = np.asarray(level0_xy, np.float64).reshape(-1, 2) / float(level_downsample)
    return np.rint(xy).astype(np.int64)


def normalised_xy(level0_xy: np.ndarray, level0_w: int, level0_h: int) -> np.ndarray:
    """(N, 2) float32 level-0 positions divided by the level-0 width/height, in [0, 1)."""
    xy = np.asarray(level0_xy, np.float64).reshape(-1, 2)
    return (xy / np.array([level0_w, level0_h], np.float64)).astype(np.float32)
