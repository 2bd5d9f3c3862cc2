"""The one slide interface every backend implements.

Coordinates: ``read_region`` takes the top-left corner in *level-0* pixels and a
size in pixels *at the requested level* (OpenSlide's convention). Regions that run
past the slide edge are padded white, never an error.
"""

from __future__ import annotations

import abc
import collections
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.batch import pool_workers
from wsi_mil.errors import SlideError

PAD_VALUE = 255  # white, like glass


@dataclass(frozen=True)
class TileGrid:
    """Native storage tiling of one level: tiles of ``tile_w`` x ``tile_h`` px at that level."""

    tile_w: int
    tile_h: int


def thumbnail_size(level0_size: tuple[int, int], max_size_px: int) -> tuple[int, int]:
    """(width, height) of :meth:`Slide.thumbnail` ``(max_size_px)`` of a slide of ``level0_size``
    (width, height) px: longest side <= ``max_size_px``, aspect kept, never upscaled."""
    w0, h0 = (max(1, int(v)) for v in level0_size)
    scale = max(1.0, max(w0, h0) / max(1, int(max_size_px)))
    return max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))


class Slide(abc.ABC):
    """A multi-resolution image. Subclasses fill the abstract members; the rest is shared."""

    backend: str = "?"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise SlideError(
                f"{self.path}: slide mpp override {mpp} is not a positive finite number",
                "give the level-0 microns per pixel, e.g. --slide-mpp 0.25",
            )
        self._mpp_override = mpp
        #: integer samples keep their top this-many bits when mapped to uint8; None: the
        #: file's own (OME SignificantBits), else the stored width (see set_significant_bits)
        self.significant_bits: int | None = None

    def set_significant_bits(self, bits: int) -> None:
        """Treat integer samples wider than 8 bits as holding ``bits`` significant bits (e.g.
        12-bit camera data stored in uint16 without saying so): their top ``bits`` bits map
        to uint8, instead of the top 8 stored bits, which leave such data nearly black.
        Backends of 8-bit data ignore it."""
        if not 8 <= int(bits) <= 32:
            raise SlideError(
                f"significant bits {bits} is outside 8..32", "e.g. 12 for 12-bit camera data"
            )
        self.significant_bits = int(bits)

    # -- required -------------------------------------------------------
    @property
    @abc.abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) in px of every level, level 0 first."""

    @abc.abstractmethod
    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the window at *level* px (lx, ly); always fully inside the level."""

    @property
    def native_mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or None when unknown."""
        return None

    # -- shared ---------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel; the caller's override wins over the file's value."""
        return self._mpp_override if self._mpp_override is not None else self.native_mpp

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in px."""
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample of each level relative to level 0 (mean of x and y ratios)."""
        w0, h0 = self.dimensions
        return [((w0 / w) + (h0 / h)) / 2.0 for (w, h) in self.level_dimensions]

    def tile_grid(self, level: int) -> TileGrid | None:
        """Native tile size at ``level``, or None for strip/untiled/in-memory images."""
        return None

    def windows_exact(self, level: int) -> bool:
        """Whether any window of ``level`` has the same pixels however it is read: a patch
        cut from tile-aligned windows equals a window read at the patch itself. False where
        the backend resamples windows at sub-pixel offsets (OpenSlide levels whose
        downsample is not an integer); tiling then reads such a level patch by patch."""
        return True

    def read_tile(
        self, level: int, col: int, row: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 RGB of native tile (``col``, ``row``) of ``tile_grid(level)``.

        Pixels of an edge tile past the level's edge are unspecified. ``out``: an optional
        (tile_h, tile_w, 3) uint8 scratch array a backend may decode into and return (callers
        must not assume it does). Default: :meth:`read_level_region` of the tile's window.
        """
        grid = self.tile_grid(level)
        if grid is None:
            raise ValueError(f"level {level} of {self.path} has no tile grid")
        tw, th = grid.tile_w, grid.tile_h
        return self.read_level_region(level, col * tw, row * th, tw, th)

    def read_tiles(
        self, level: int, tiles: Iterable[tuple[int, int]], out: np.ndarray | None = None
    ) -> Iterator[np.ndarray]:
        """:meth:`read_tile` of each native tile ``(col, row)`` in ``tiles``, in order.

        A yielded array may be ``out``, overwritten by the next tile: use each before asking
        for the next. The tiff and OpenSlide backends read runs of JPEG tiles adjacent in the
        file with one read call (tiling asks for tiles in row-major order). A backend that
        overrides this and makes ``read_tile`` use it must call its own class's method (this
        default calls ``self.read_tile``).
        """
        for col, row in tiles:
            yield self.read_tile(level, col, row, out)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample is <= ``downsample`` (+0.1% tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region whose top-left is level-0 (x, y), w x h px at ``level``.

        The level-0 corner maps to level px ``round(x / downsample)``. Parts outside the
        image are white (:data:`PAD_VALUE`).
        """
        self._check_level(level)
        ds = self.level_downsamples[level]
        return self.read_level_region(level, int(round(x / ds)), int(round(y / ds)), w, h)

    def read_level_region(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the window at *level* px (lx, ly), w x h px; white past the edges.

        Same as :meth:`read_region` with level-pixel coordinates, which avoids any rounding
        when reading windows aligned to :meth:`tile_grid`.
        """
        self._check_level(level)
        w, h, lx, ly = int(w), int(h), int(lx), int(ly)
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), PAD_VALUE, np.uint8)
        lw, lh = self.level_dimensions[level]
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + w, lw), min(ly + h, lh)
        if ix0 == lx and iy0 == ly and ix1 == lx + w and iy1 == ly + h:
            return self._checked_read(level, lx, ly, w, h)
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            inner = self._checked_read(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
            out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx] = inner
        return out

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            from wsi_mil.errors import SlideError

            n = self.level_count
            raise SlideError(
                f"{self.path}: level {level} does not exist (the slide has {n} level{'s' if n != 1 else ''})",
                f"use a level in 0..{self.level_count - 1}",
            )

    def _checked_read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        from wsi_mil.errors import SlideError

        try:
            arr = self._read_level(level, lx, ly, w, h)
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad slide, not a bug
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SlideError(
                f"{self.path}: cannot read level {level} window ({lx}, {ly}, {w}x{h}): {msg}",
                "the file may be truncated or corrupt",
            ) from e
        if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
            raise AssertionError(
                f"{type(self).__name__} returned {arr.shape} {arr.dtype}, expected ({h}, {w}, 3) uint8"
            )
        return arr

    def thumbnail(self, max_size_px: int, pool: Executor | None = None) -> np.ndarray:
        """(h, w, 3) uint8 of the whole slide, longest side <= ``max_size_px`` (aspect kept).

        Reads the coarsest level that is still at least as large as needed, in bands of
        bounded size, box-reduces each band by an integer factor and resizes the result,
        so memory stays bounded even for a single-level gigapixel image. ``pool``: read and
        reduce bands in parallel (at most two bands per worker in flight).
        """
        from PIL import Image

        w0, h0 = self.dimensions
        scale = max(1.0, max(w0, h0) / max(1, int(max_size_px)))
        tw, th = thumbnail_size((w0, h0), max_size_px)
        level = self.get_best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        k = max(1, int(min(lw / tw, lh / th)))  # integer pre-reduction factor, keeps >= target size
        band_h = k * max(1, (1 << 24) // (3 * lw * k))  # ~16 MB of level pixels per band

        def band(y: int) -> np.ndarray:
            img = self.read_level_region(level, 0, y, lw, min(band_h, lh - y))
            return _box_reduce(img, k) if k > 1 else img

        ys = range(0, lh, band_h)
        if pool is None or len(ys) == 1:
            bands = [band(y) for y in ys]
        else:
            bands = list(_bounded_map(pool, band, ys, 2 * pool_workers(pool)))
        img = np.concatenate(bands, axis=0) if len(bands) > 1 else bands[0]
        if img.shape[:2] != (th, tw):
            # the last reduced row/column may be a partial block: map exactly lw/k x lh/k onto the output
            box = (0.0, 0.0, lw / k, lh / k)
            img = np.asarray(
                Image.fromarray(img).resize((tw, th), Image.Resampling.BILINEAR, box=box)
            )
        return img

    def properties(self) -> dict:
        """Summary used by ``wsi-mil info``."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "native_mpp": self.native_mpp,
            "tile_grid": [
                (None if (g := self.tile_grid(i)) is None else [g.tile_w, g.tile_h])
                for i in range(self.level_count)
            ],
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __reduce__(self) -> tuple:
        # Pickles as "reopen this file with this backend": DataLoader workers (spawn) and
        # multiprocessing pools get their own file handles instead of sharing one.
        return (type(self), (self.path, self._mpp_override))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_count}, dims={self.dimensions})"


def _bounded_map(pool: Executor, fn: Callable, items: Iterable, max_ahead: int) -> Iterator:
    """``pool.map(fn, items)`` in order, with at most ``max_ahead`` calls submitted ahead."""
    pending: collections.deque[Future] = collections.deque()
    try:
        for it in items:
            pending.append(pool.submit(fn, it))
            if len(pending) >= max_ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def _box_reduce(img: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks of an (h, w, 3) uint8 image; a partial last row/column block is
    averaged over the pixels it has (Pillow's ``Image.reduce``: C, fixed-point rounding)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(k))
