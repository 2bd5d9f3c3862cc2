"""Vendor formats through OpenSlide: SVS, NDPI, MRXS, SCN, VMS, BIF, Philips TIFF, generic tiled TIFF.

``read_region`` returns OpenSlide's RGBA composited over white (transparent areas,
e.g. outside MRXS scan regions, become white like glass).

Fast native tiles: for Aperio SVS and generic tiled TIFFs, :meth:`OpenSlideSlide.read_tile`
decodes a level's 8-bit RGB/YCbCr JPEG tiles straight from the file with libjpeg-turbo
(the tiff backend's decoder), about 4x cheaper than ``read_region`` of the tile window
(cairo compositing + ARGB conversion). A level gets this path only if its TIFF page is
unambiguous, its tile origins map to level 0 and back exactly, and two of its tiles decode
bit-identically to OpenSlide's on first use; otherwise it reads through OpenSlide as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    is_tiff_file,
    lower_name,
    quiet_readers,
    read_segments,
    to_rgb,
    valid_mpp,
)
from wsi_mil.slides.base import Slide, TileGrid

log = logging.getLogger(__name__)

# Suffixes OpenSlide owns: even when it cannot open such a file we let it report why.
VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")

# OpenSlide vendors whose levels are plain tiled TIFF directories that OpenSlide paints tile
# for tile (other vendors stitch, overlap or crop tiles: no fast path for them).
FAST_TILE_VENDORS = ("aperio", "generic-tiff")
# IFDs scanned for level pages; vendor TIFFs hold a handful (levels, thumbnail, label, macro)
_MAX_PAGES = 64
# fully-inside tiles decoded both ways on a level's first use
_VERIFY_TILES = 2


@dataclass(frozen=True)
class _FastLevel:
    """Where one level's JPEG tiles lie in the file and how to decode them."""

    tile_w: int
    tile_h: int
    n_across: int
    n_down: int
    offsets: np.ndarray = field(repr=False)  # (n_down * n_across,) int64 byte offsets, row-major
    counts: np.ndarray = field(repr=False)  # (n_down * n_across,) int64 byte counts; 0 = missing
    codec: Any = field(repr=False)  # tiff_backend.JpegCodec


@register_backend("openslide", priority=20)
class OpenSlideSlide(Slide):
    """Wraps ``openslide.OpenSlide``; levels, downsamples and mpp are OpenSlide's own."""

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not (path.is_file() or path.is_dir()):
            return False  # OpenSlide's format sniffing blocks forever on a FIFO
        if lower_name(path).endswith(VENDOR_SUFFIXES):
            return True
        try:
            import openslide

            return openslide.OpenSlide.detect_format(str(path)) is not None
        except Exception:  # noqa: BLE001
            return False

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import openslide

        super().__init__(path, mpp)
        if not (self.path.is_file() or self.path.is_dir()):
            raise SlideError(f"{self.path}: not a regular file or folder", "give a slide's path")
        if self.path.is_file() and is_tiff_file(self.path):
            # OpenSlide opens truncated TIFFs lazily and fails only when a missing tile is read
            from wsi_mil.slides.backends.tiff_backend import check_tiff_extents

            check_tiff_extents(self.path)
        try:
            self._os = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            from wsi_mil.slides.backends.tiff_backend import FALLBACK_VENDORS, openslide_vendor

            vendor = openslide_vendor(self.path)
            if vendor is not None:  # e.g. an SVS whose label image is tiled like a level
                raise SlideError(
                    f"{self.path}: OpenSlide detects the {vendor!r} format but cannot open it",
                    "the file may be damaged or written by a converter OpenSlide does not "
                    "follow"
                    + (
                        " (--backend auto then also tries the tiff backend)"
                        if vendor in FALLBACK_VENDORS
                        else ""
                    ),
                ) from None
            raise SlideError(
                f"{self.path}: OpenSlide does not recognise this file as a slide",
                "it may be corrupt, not a slide, or have the wrong extension",
            ) from None
        except openslide.OpenSlideError as e:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open it: {e}",
                "the file may be truncated or corrupt",
            ) from None
        props = self._os.properties
        self.vendor = props.get("openslide.vendor", "")
        # inf, nan, 0, 1e300 ... (e.g. an Aperio "MPP = inf"): unknown
        self._native_mpp = valid_mpp(props.get("openslide.mpp-x"))
        self._dims = [(int(w), int(h)) for w, h in self._os.level_dimensions]
        self._ds = [float(d) for d in self._os.level_downsamples]
        # read once: after a read error OpenSlide's handle fails every later call, properties too
        self._grids = [_tile_grid(props, i) for i in range(len(self._dims))]
        # fast tile path, set up lazily: level -> verified _FastLevel or None (disabled)
        self._fast: dict[int, _FastLevel | None] = {}
        self._fast_candidates: dict[int, _FastLevel] | None = None
        self._fast_lock = threading.Lock()
        self._fd: int | None = None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    @property
    def level_downsamples(self) -> list[float]:
        return self._ds

    @property
    def native_mpp(self) -> float | None:
        return self._native_mpp

    def tile_grid(self, level: int) -> TileGrid | None:
        return self._grids[level]

    def windows_exact(self, level: int) -> bool:
        # _read_level asks OpenSlide for level-0 round(lx * ds), which OpenSlide maps back to
        # the fractional x0 / ds and resamples unless ds is an integer
        self._check_level(level)
        return float(self._ds[level]).is_integer()

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        ds = self._ds[level]
        x0, y0 = int(round(lx * ds)), int(round(ly * ds))
        rgba = np.asarray(self._os.read_region((x0, y0), level, (w, h)))
        # openslide-python returns un-premultiplied RGBA; transparent -> white
        return to_rgb(rgba, alpha="straight")

    def read_tile(
        self, level: int, col: int, row: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 native tile; JPEG tiles of verified levels decoded directly.

        The direct decode goes into ``out`` when it is a C-contiguous (tile_h, tile_w, 3) uint8
        array (else into a new one); missing tiles, levels without the fast path and tiles
        the decoder refuses go through :meth:`read_level_region` (OpenSlide).
        """
        # the class's read_tiles: a read_tiles wrapped on the instance sees tiling's reads only
        return next(OpenSlideSlide.read_tiles(self, level, [(col, row)], out))

    def read_tiles(
        self, level: int, tiles: Iterable[tuple[int, int]], out: np.ndarray | None = None
    ) -> Iterator[np.ndarray]:
        """:meth:`read_tile` of each tile in order; on the fast path, tiles adjacent in the
        file are read with one ``os.pread`` (:func:`read_segments`)."""
        self._check_level(level)
        fast = self._fast.get(level, ...)
        if fast is ...:
            fast = self._setup_fast_level(level)
        tiles = list(tiles)
        if fast is None or self._fd is None:
            for col, row in tiles:
                yield Slide.read_tile(self, level, col, row, out)
            return
        # tiles outside the grid read nothing (length 0) and go through OpenSlide
        segs = [
            row * fast.n_across + col if 0 <= col < fast.n_across and 0 <= row < fast.n_down else -1
            for col, row in tiles
        ]
        offsets = [int(fast.offsets[s]) if s >= 0 else 0 for s in segs]
        counts = [int(fast.counts[s]) if s >= 0 else 0 for s in segs]
        datas: Iterator[memoryview | None] = read_segments(self._fd, offsets, counts)
        for i, (col, row) in enumerate(tiles):
            try:
                data = next(datas)
            except OSError:  # through OpenSlide, which reads it or says why; retry the rest
                data = None
                datas = read_segments(self._fd, offsets[i + 1 :], counts[i + 1 :])
            tile = None
            if data is not None:
                try:
                    tile = self._decode_fast(fast, col, row, out, data)
                except Exception as e:  # noqa: BLE001 - a decoder failure is a bad slide
                    raise SlideError(
                        f"{self.path}: cannot decode level {level} tile ({col}, {row}): {e}",
                        "the file may be truncated or corrupt",
                    ) from None
            # missing tiles, short reads and tiles the decoder refuses: read_level_region
            # (OpenSlide; a SlideError on failure)
            yield tile if tile is not None else Slide.read_tile(self, level, col, row, out)

    def _decode_fast(
        self,
        fast: _FastLevel,
        col: int,
        row: int,
        out: np.ndarray | None,
        data: bytes | memoryview | None = None,
    ) -> np.ndarray | None:
        """The tile decoded from its file bytes ``data`` (default: read here), or None
        (missing, short read, decoder refused)."""
        from wsi_mil.slides.backends.tiff_backend import decode_jpeg_tile

        seg = row * fast.n_across + col
        offset, count = int(fast.offsets[seg]), int(fast.counts[seg])
        if data is None:
            if not offset or not count or self._fd is None:
                return None  # OpenSlide paints a missing tile transparent: white after compositing
            try:
                data = os.pread(self._fd, count, offset)
            except OSError:
                return None  # OpenSlide reads it or reports the error
        if len(data) < count:
            return None  # OpenSlide reports the truncation
        shape = (fast.tile_h, fast.tile_w, 3)
        if out is None or out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            out = np.empty(shape, np.uint8)
        return decode_jpeg_tile(data, fast.codec, out)

    def _setup_fast_level(self, level: int) -> _FastLevel | None:
        """Find and verify ``level``'s fast path once (thread-safe); None if it does not apply."""
        with self._fast_lock:
            if level in self._fast:
                return self._fast[level]
            fast = None
            try:
                if self._fast_candidates is None:
                    self._fast_candidates = self._find_fast_levels()
                fast = self._fast_candidates.get(level)
                if fast is None:
                    log.debug(
                        "%s: level %d: no fast tile path (vendor %r; needs one tiled 8-bit "
                        "RGB/YCbCr JPEG page of the level's size, exact tile origins)",
                        self.path,
                        level,
                        self.vendor,
                    )
                elif not self._verify_fast_level(level, fast):
                    fast = None
            except Exception as e:  # noqa: BLE001 - any doubt: OpenSlide reads the level
                log.debug("%s: level %d: no fast tile path (%s)", self.path, level, e)
                fast = None
                if self._fast_candidates is None:  # the TIFF could not be mapped: not again
                    self._fast_candidates = {}
            self._fast[level] = fast
            return fast

    def _find_fast_levels(self) -> dict[int, _FastLevel]:
        """Levels whose OpenSlide level is one unambiguous tiled JPEG TIFF page."""
        if self.vendor not in FAST_TILE_VENDORS or not self.path.is_file():
            return {}
        if not is_tiff_file(self.path):
            return {}
        import tifffile

        from wsi_mil.slides.backends.tiff_backend import jpeg_tile_codec

        found: dict[int, _FastLevel] = {}
        with quiet_readers(), tifffile.TiffFile(self.path) as tf:
            if len(tf.pages) > _MAX_PAGES:
                return {}
            pages = [p for p in tf.pages if getattr(p, "is_tiled", False)]
            for level, (w, h) in enumerate(self._dims):
                grid = self.tile_grid(level)
                if grid is None:
                    continue
                match = [
                    p
                    for p in pages
                    if (int(p.imagewidth), int(p.imagelength)) == (w, h)
                    and (int(p.tilewidth), int(p.tilelength)) == (grid.tile_w, grid.tile_h)
                    and int(getattr(p, "imagedepth", 1) or 1) == 1
                ]
                if len(match) != 1:
                    continue  # no page or several: doubt
                page = match[0]
                codec = jpeg_tile_codec(page)
                if codec is None or not _origins_exact(
                    w, h, grid.tile_w, grid.tile_h, self._ds[level]
                ):
                    continue
                n_across, n_down = -(-w // grid.tile_w), -(-h // grid.tile_h)
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                if offsets.shape != (n_across * n_down,) or counts.shape != offsets.shape:
                    continue
                found[level] = _FastLevel(
                    grid.tile_w, grid.tile_h, n_across, n_down, offsets, counts, codec
                )
        if found and self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return found

    def _verify_fast_level(self, level: int, fast: _FastLevel) -> bool:
        """Decode up to two fully-inside tiles both ways; True if all are bit-identical."""
        w, h = self._dims[level]
        inside_across, inside_down = w // fast.tile_w, h // fast.tile_h
        if inside_across == 0 or inside_down == 0:
            log.debug("%s: level %d: no full tile to verify, no fast tile path", self.path, level)
            return False
        counts = fast.counts.reshape(fast.n_down, fast.n_across)[:inside_down, :inside_across]
        # the largest tiles hold the most detail (colour, edges): the strictest comparison
        order = np.argsort(-counts, axis=None, kind="stable")[:_VERIFY_TILES]
        checked = 0
        for idx in order:
            if counts.flat[idx] <= 0:
                break
            row, col = divmod(int(idx), inside_across)
            got = self._decode_fast(fast, col, row, None)
            ref = self.read_level_region(
                level, col * fast.tile_w, row * fast.tile_h, fast.tile_w, fast.tile_h
            )
            if got is None or not _tiles_equal(got, ref):
                log.debug(
                    "%s: level %d: tile (%d, %d) decodes differently from OpenSlide's, "
                    "no fast tile path",
                    self.path,
                    level,
                    col,
                    row,
                )
                return False
            checked += 1
        return checked > 0

    def properties(self) -> dict:
        d = super().properties()
        d["vendor"] = self.vendor
        return d

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_os", None) is not None:
            self._os.close()
            self._os = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _tile_grid(props: Any, level: int) -> TileGrid | None:
    """Native tile size of ``level`` from OpenSlide's properties, or None when not reported."""
    tw = props.get(f"openslide.level[{level}].tile-width")
    th = props.get(f"openslide.level[{level}].tile-height")
    return None if tw is None or th is None else TileGrid(int(tw), int(th))


def _tiles_equal(fast: np.ndarray, ref: np.ndarray) -> bool:
    """Whether a directly decoded tile equals OpenSlide's (the seam tests use for a mismatch)."""
    return bool(np.array_equal(fast, ref))


def _origins_exact(w: int, h: int, tile_w: int, tile_h: int, downsample: float) -> bool:
    """Whether every tile origin survives level px -> level-0 px (rounded) -> level px exactly.

    :meth:`OpenSlideSlide._read_level` asks OpenSlide for level-0 ``round(lx * ds)``, which
    OpenSlide maps back to ``x0 / ds``; a fractional result is resampled by cairo, so the
    native tile would not equal the window read for it. True for integer downsamples.
    """
    for size, tile in ((w, tile_w), (h, tile_h)):
        lx = np.arange(0, size, tile, dtype=np.float64)
        if not np.array_equal(np.round(lx * downsample) / downsample, lx):
            return False
    return True
