"""Pyramidal TIFF / OME-TIFF (incl. SubIFD pyramids) read tile by tile with tifffile.

Only the tiles (or strips) that cover a requested window are read (``os.pread`` at
their byte offsets, thread-safe) and decoded (tifffile's per-segment decoder, i.e.
imagecodecs); a small LRU cache of decoded tiles makes patch-by-patch reading of
neighbouring patches cheap. Windows aligned to :meth:`tile_grid` decode each tile once.

mpp: OME ``PhysicalSizeX`` (+ unit) > Aperio ``MPP =`` > XResolution/ResolutionUnit
(centimetre or inch, the same rule OpenSlide applies to generic TIFFs, and DNG's millimetre
and micrometre; ImageJ/Fiji TIFFs: XResolution in the description's ``unit=``).

Pixels: 3-sample RGB/YCbCr as is; grayscale replicated; palette through its colour map;
alpha composited over white; channels stored as separate grayscale pages (OME / ImageJ
``CYX``, ``TCZYX``, ...): channels 0, 1, 2 of the first time point and z-plane as RGB when
there are at least 3, else channel 0 as gray. Samples wider than 8 bits keep their top 8
significant bits (OME ``SignificantBits``, else BitsPerSample); grey/RGB samples narrower than
8 bits (2-, 4-bit) are stretched to 0..255 (palette indices are not); float samples map
``_util.float_white`` of the smallest level (1.0 for 0..1 data) to 255. mpp outside
``_util.MPP_RANGE`` (inf, nan, 0, 1e300) is unknown.

Levels: a level whose width and height are not level 0's divided by one downsample (within
rounding or 1 %, ``_util.level_mismatch``), e.g. half as wide but a third as high, is dropped
(with a warning). The TIFF Orientation tag is ignored, as OpenSlide does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slides import register_backend
from wsi_mil.slides.backends._util import (
    OME_TIFF_SUFFIXES,
    UM_PER_UNIT,
    expand_low_bits,
    first_line,
    float_white,
    is_tiff_file,
    level_mismatch,
    lower_name,
    quiet_readers,
    read_segments,
    tiff_alpha,
    to_rgb,
    to_uint8,
    valid_mpp,
)
from wsi_mil.slides.base import PAD_VALUE, Slide, TileGrid

log = logging.getLogger(__name__)

# OpenSlide vendors whose files are TIFFs but carry vendor-specific layout/metadata:
# those are left to the openslide backend.
_OPENSLIDE_VENDOR_TIFFS = {"aperio", "hamamatsu", "leica", "philips", "ventana", "trestle"}
#: ... of which those the tiff backend reads right when OpenSlide cannot open them (levels
#: are plain tile grids; Ventana/Trestle tiles overlap, Leica SCN places regions)
FALLBACK_VENDORS = {"aperio", "hamamatsu", "philips"}


@dataclass
class _Level:
    """One pyramid level: the page(s) holding its samples and its segment (tile/strip) layout."""

    width: int
    height: int
    pages: list[Any]  # one page (RGB/gray) or one page per channel (3 grayscale pages)
    tiled: bool
    seg_w: int
    seg_h: int
    n_across: int
    n_down: int
    planar: bool  # samples stored as separate planes
    samples: int
    bits: int
    photometric: int
    alpha: str | None
    colormap: np.ndarray | None
    #: (jpegtables, colorspace, outcolorspace) when tiles are 8-bit 3-sample JPEG that
    #: :meth:`TiffSlide.read_tile` decodes straight into the caller's buffer; else None
    jpeg: tuple[bytes | None, Any, Any] | None = None
    #: uncompressed strips stored contiguously: read as blocks of seg_w x seg_h px straight
    #: from the file (a whole-image strip is never decoded at once)
    raw: bool = False


def _segment_extents_ok(page: Any, file_size: int) -> bool:
    offs = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if offs.size == 0:
        return False
    present = counts > 0  # zero-length segments are sparse (empty) tiles
    return bool(np.all(offs[present] > 0) and np.all(offs[present] + counts[present] <= file_size))


def check_tiff_extents(path: Path) -> None:
    """Raise :class:`SlideError` if any tile/strip of any page lies past the end of the file.

    Cheap (IFDs only): catches truncated downloads/copies at open time instead of at read time.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with quiet_readers(), tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            for p in list(pages):
                for sub in getattr(p, "pages", None) or []:
                    pages.append(sub)
            for s in tf.series:
                for lv in s.levels:
                    pages.extend(lv.pages)
            for p in pages:
                if p is None or not hasattr(p, "dataoffsets"):
                    continue
                if not _segment_extents_ok(p, size):
                    raise SlideError(
                        f"{path}: TIFF is truncated or corrupt (image data of page {p.index} lies past the end of the {size}-byte file)",
                        "re-copy or re-export the file",
                    )
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SlideError(
            f"{path}: not a readable TIFF ({first_line(e)})",
            "the file may be truncated or corrupt",
        ) from None


JpegCodec = tuple[bytes | None, Any, Any]  # (jpegtables, colorspace, outcolorspace)


def jpeg_tile_codec(page: Any) -> JpegCodec | None:
    """How :func:`decode_jpeg_tile` decodes ``page``'s tiles, or None if it cannot.

    Only tiled pages of 8-bit, 3-sample, contiguous RGB/YCbCr JPEG without extra samples.
    """
    try:
        if not (
            page.is_tiled
            and int(page.compression) == 7
            and int(page.samplesperpixel) == 3
            and int(page.bitspersample) == 8
            and int(page.photometric) in (2, 6)
            and int(page.planarconfig) == 1
            and not page.extrasamples
        ):
            return None
        from tifffile.tifffile import jpeg_decode_colorspace

        # the same colour spaces tifffile's own decoder uses, so pixels are identical
        cs, ocs = jpeg_decode_colorspace(int(page.photometric), 1, (), bool(page.is_jfif))
        return (page.jpegtables, cs, ocs)
    except Exception:  # noqa: BLE001 - no fast path, the general decoder still applies
        return None


def decode_jpeg_tile(
    data: bytes | memoryview, codec: JpegCodec, out: np.ndarray
) -> np.ndarray | None:
    """Decode one JPEG tile (its TIFF segment bytes) straight into ``out`` and return ``out``.

    ``out``: (tile_h, tile_w, 3) uint8, C-contiguous. None when libjpeg-turbo refuses the tile
    (odd JPEG dimensions, corrupt data): the caller then takes its general path.
    """
    import imagecodecs

    tables, cs, ocs = codec
    try:
        return imagecodecs.jpeg_decode(
            data,
            bitspersample=8,
            tables=tables,
            colorspace=cs,
            outcolorspace=ocs,
            shape=out.shape[:2],
            out=out,
        )
    except Exception:  # noqa: BLE001
        return None


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's format name for ``path`` ("generic-tiff", "aperio", ...) or None."""
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        return None


#: block side (px) in which uncompressed strip images are read (tiling's untiled block)
_RAW_BLOCK_PX = 512
#: segments of the smallest level sampled for the range of float samples
_FLOAT_SAMPLE_SEGMENTS = 64
#: top-level pages looked at for pyramid levels tifffile did not list
_MAX_LEVEL_PAGES = 64
#: names of associated images (Bio-Formats, vendors) that are not the slide
_ASSOCIATED_NAME = re.compile(r"(?i)^(label|macro|thumbnail|overview)([ _-]?image)?$")


@register_backend("tiff", priority=10)
class TiffSlide(Slide):
    """Tiled (or stripped) TIFF pyramids via tifffile: generic pyramidal TIFF, OME-TIFF, SubIFDs."""

    #: bytes of decoded tiles kept per open slide (LRU)
    cache_bytes: int = 64 << 20

    #: vendor TIFFs OpenSlide detects but cannot open (e.g. an SVS with a tiled label image:
    #: "Downsampled images not correctly ordered") come here before the image backend, which
    #: would read level 0 alone, without mpp, or refuse a whole-slide image as too large
    fallback_after = ("openslide",)

    @classmethod
    def can_open(cls, path: Path) -> bool:
        """OME-TIFFs always; other TIFFs unless OpenSlide recognises a vendor format in them."""
        if not path.is_file() or not is_tiff_file(path):
            return False
        if lower_name(path).endswith(OME_TIFF_SUFFIXES):
            return True
        return openslide_vendor(path) not in _OPENSLIDE_VENDOR_TIFFS

    @classmethod
    def can_open_fallback(cls, path: Path) -> bool:
        """A vendor TIFF whose levels are plain tile grids (:data:`FALLBACK_VENDORS`), once
        OpenSlide, which it was left to, failed on it."""
        return path.is_file() and is_tiff_file(path) and openslide_vendor(path) in FALLBACK_VENDORS

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import tifffile

        super().__init__(path, mpp)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: not a file", "the tiff backend reads single TIFF files")
        check_tiff_extents(self.path)
        try:
            with quiet_readers():
                self._tf = tifffile.TiffFile(self.path)
        except Exception as e:  # noqa: BLE001
            raise SlideError(f"{self.path}: not a readable TIFF ({first_line(e)})") from None
        try:
            self._series_index, series = self._pick_series()
            self._levels = self._build_levels(series)
            self._use_significant_bits()
            self._native_mpp = self._find_mpp(series)
        except Exception:
            self._tf.close()
            raise
        self._fd = os.open(self.path, os.O_RDONLY)
        self._float_max = 1.0
        try:
            self._float_max = self._measure_float_max()
        except Exception as e:  # noqa: BLE001 - unreadable tiles fail on read, with their place
            log.debug("%s: float range not measured (%s)", self.path, e)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()

    # -- structure ---------------------------------------------------------
    def _pick_series(self) -> tuple[int, Any]:
        """The largest image series (the slide), not one named as a label/macro/thumbnail
        image ("label", "Macro image", ...; an image called "Label-free 20x" is a slide);
        the largest of all if every series is so named."""
        best: dict[bool, tuple[int, int, Any]] = {}  # named associated? -> (area, index, series)
        for i, s in enumerate(self._tf.series):
            page = s.levels[0].pages[0] if s.levels[0].pages else None
            if page is None:
                continue
            associated = bool(_ASSOCIATED_NAME.match((s.name or "").strip()))
            area = int(page.imagewidth) * int(page.imagelength)
            if area > best.get(associated, (-1,))[0]:
                best[associated] = (area, i, s)
        if not best:
            raise SlideError(f"{self.path}: TIFF contains no image", "the file may be corrupt")
        _, i, series = best.get(False) or best[True]
        return i, series

    def _build_levels(self, series: Any) -> list[_Level]:
        levels: list[_Level] = []
        found = [self._make_level(lv) for lv in series.levels]
        found += [self._make_level(_PageLevel([p])) for p in self._unlisted_level_pages(found)]
        for level in sorted(found, key=lambda lv: -lv.width):
            if levels and (level.width >= levels[-1].width or level.height >= levels[-1].height):
                continue  # not a reduced level (e.g. a stray same-size page)
            if levels and not _consistent_level(self.path, levels[0], level):
                continue  # anisotropic: no one downsample maps it to level 0
            levels.append(level)
        return levels

    def _unlisted_level_pages(self, levels: list[_Level]) -> list[Any]:
        """Tiled top-level pages that are reduced copies of level 0 but not in tifffile's
        pyramid, which only takes steps of 2, 3 or 4, the same each time: a 1, 8, 64 or a
        1, 4, 16, 32 pyramid lost levels. Like OpenSlide's generic TIFF, any tiled page with
        level 0's samples and aspect ratio is a level. Not for OME or channel-page series."""
        base = levels[0]
        if self._tf.is_ome or len(base.pages) != 1 or not base.tiled:
            return []
        p0 = base.pages[0]
        used = {int(p.offset) for lv in levels for p in lv.pages}
        out = []
        # vendor pyramids hold a handful of IFDs; an image stack's thousands are not read
        for page in itertools.islice(self._tf.pages, _MAX_LEVEL_PAGES):
            page = page.aspage() if hasattr(page, "aspage") else page
            w, h = int(page.imagewidth), int(page.imagelength)
            if (
                int(page.offset) in used
                or not page.is_tiled
                or not (w < base.width and h < base.height)
                or int(page.samplesperpixel) != int(p0.samplesperpixel)
                or page.dtype != p0.dtype
                or int(page.photometric) != int(p0.photometric)
                or abs(w * base.height / base.width - h) > max(1.5, 0.01 * h)  # same aspect
            ):
                continue
            out.append(page)
        return out

    def _make_level(self, lv: Any) -> _Level:
        # TiffFrames (light pages in multi-page series) need to become full pages to decode
        def full(p: Any) -> Any:
            return p.aspage() if hasattr(p, "aspage") else p

        channel_pages = _channel_pages(lv)
        if channel_pages is None:
            page = full(next(p for p in lv.pages if p is not None))
        else:
            page = full(channel_pages[0])
        if getattr(page, "tiledepth", 1) not in (1, None) or getattr(page, "imagedepth", 1) > 1:
            raise SlideError(f"{self.path}: volumetric (tiled depth) TIFFs are not supported")
        spp = int(page.samplesperpixel)
        photometric = int(page.photometric)
        if spp == 1 and channel_pages is not None:
            # channels stored as separate grayscale pages (OME "CYX", "TCZYX", ... with SizeC >= 3):
            # the first three channels of the first plane (t = 0, z = 0, ...) as RGB
            pages = [page] + [full(p) for p in channel_pages[1:]]
        else:
            pages = [page]
        if photometric not in (0, 1, 2, 3, 6):
            raise SlideError(
                f"{self.path}: TIFF photometric {page.photometric.name} is not supported by the tiff backend"
            )
        if photometric == 6 and int(page.compression) not in (6, 7, 34892, 33007):
            raise SlideError(
                f"{self.path}: uncompressed YCbCr TIFF is not supported by the tiff backend"
            )
        alpha = tiff_alpha(page.extrasamples) if spp >= 4 and photometric in (2, 6) else None
        colormap = None
        if photometric == 3:
            cm = np.asarray(page.colormap)
            colormap = to_uint8(cm, 16 if cm.dtype == np.uint16 else None).T.copy()  # (n, 3)
        w, h = int(page.imagewidth), int(page.imagelength)
        # uncompressed strips in one run of bytes (tifffile and Pillow write one strip of
        # the whole image): blocks read from the file, not whole strips decoded
        raw = not page.is_tiled and all(_is_raw_strips(p) for p in pages)
        if page.is_tiled:
            seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
        elif raw:
            seg_w, seg_h = min(w, _RAW_BLOCK_PX), min(h, _RAW_BLOCK_PX)
        else:
            seg_w, seg_h = (
                int(page.imagewidth),
                int(min(page.rowsperstrip or page.imagelength, page.imagelength)),
            )
        jpeg = jpeg_tile_codec(page) if len(pages) == 1 else None
        return _Level(
            width=w,
            height=h,
            pages=pages,
            tiled=bool(page.is_tiled),
            seg_w=seg_w,
            seg_h=seg_h,
            n_across=-(-w // seg_w),
            n_down=-(-h // seg_h),
            planar=int(page.planarconfig) == 2 and spp > 1,
            samples=spp,
            bits=int(page.bitspersample),
            photometric=photometric,
            alpha=alpha,
            colormap=colormap,
            jpeg=jpeg,
            raw=raw,
        )

    def set_significant_bits(self, bits: int) -> None:
        super().set_significant_bits(bits)
        for lv in self._levels:
            stored = np.dtype(lv.pages[0].dtype)
            if stored.kind == "u" and stored.itemsize > 1 and lv.photometric != 3:
                lv.bits = min(int(bits), stored.itemsize * 8)
        with self._lock:
            self._cache.clear()  # tiles decoded with the old mapping
            self._cache_used = 0

    def _use_significant_bits(self) -> None:
        """Integer samples with fewer significant bits than stored (OME ``SignificantBits``, e.g.
        12-bit camera data in uint16) map their top significant bits to uint8, not the top 8
        stored bits (which would leave such an image nearly black)."""
        tf = self._tf
        if not (tf.is_ome and tf.ome_metadata):
            return
        sig = _ome_significant_bits(tf.ome_metadata, self._series_index)
        for lv in self._levels:
            if sig is not None and 8 <= sig < lv.bits and lv.photometric != 3:
                if np.dtype(lv.pages[0].dtype).kind == "u":
                    lv.bits = sig

    def _find_mpp(self, series: Any) -> float | None:
        tf = self._tf
        if tf.is_ome and tf.ome_metadata:
            mpp = _ome_mpp(tf.ome_metadata, self._series_index, self.path)
            if mpp is not None:
                return mpp
        page0 = self._levels[0].pages[0]
        desc = page0.description or ""
        m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
        if m and (v := valid_mpp(m.group(1))) is not None:
            return v
        unit = None
        if tf.is_imagej:  # Fiji/ImageJ: ResolutionUnit none, the unit in the description
            unit = UM_PER_UNIT.get(str((tf.imagej_metadata or {}).get("unit", "")).strip())
        return valid_mpp(_resolution_mpp(page0, unit))

    # -- Slide API -----------------------------------------------------------
    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lv.width, lv.height) for lv in self._levels]

    @property
    def level_count(self) -> int:
        return len(self._levels)  # checked on every tile read: no list of dimensions

    @property
    def native_mpp(self) -> float | None:
        return self._native_mpp

    def tile_grid(self, level: int) -> TileGrid | None:
        lv = self._levels[level]
        return TileGrid(lv.seg_w, lv.seg_h) if lv.tiled else None

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.empty((h, w, 3), np.uint8)
        c0, c1 = lx // lv.seg_w, (lx + w - 1) // lv.seg_w
        r0, r1 = ly // lv.seg_h, (ly + h - 1) // lv.seg_h
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                tile = self._tile(level, lv, r, c)
                tx, ty = c * lv.seg_w, r * lv.seg_h
                x0, y0 = max(lx, tx), max(ly, ty)
                x1, y1 = min(lx + w, tx + lv.seg_w), min(ly + h, ty + lv.seg_h)
                out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = tile[
                    y0 - ty : y1 - ty, x0 - tx : x1 - tx
                ]
        return out

    def read_tile(
        self, level: int, col: int, row: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Native tile, decoded without the LRU cache (tiling reads each tile once).

        8-bit RGB/YCbCr JPEG tiles are decoded by libjpeg-turbo straight into ``out`` when
        it is given with the tile's shape: no allocation and no copy per tile.
        """
        # the class's read_tiles: a read_tiles wrapped on the instance sees tiling's reads only
        return next(TiffSlide.read_tiles(self, level, [(col, row)], out))

    def read_tiles(
        self, level: int, tiles: Iterable[tuple[int, int]], out: np.ndarray | None = None
    ) -> Iterator[np.ndarray]:
        """:meth:`read_tile` of each tile in order; JPEG tiles adjacent in the file are read
        with one ``os.pread`` (:func:`read_segments`)."""
        self._check_level(level)
        lv = self._levels[level]
        tiles = list(tiles)
        if not lv.tiled:
            for col, row in tiles:
                yield Slide.read_tile(self, level, col, row, out)
            return
        for col, row in tiles:
            if not (0 <= col < lv.n_across and 0 <= row < lv.n_down):
                raise ValueError(
                    f"tile ({col}, {row}) is outside level {level}'s "
                    f"{lv.n_across} x {lv.n_down} tile grid"
                )
        segs = [row * lv.n_across + col for col, row in tiles]
        page = lv.pages[0]
        direct = lv.jpeg is not None and out is not None and out.shape == (lv.seg_h, lv.seg_w, 3)
        datas: Iterator[memoryview | None] = (
            read_segments(
                self._fd,
                [page.dataoffsets[s] for s in segs],
                [page.databytecounts[s] for s in segs],
            )
            if direct
            else itertools.repeat(None)
        )
        for (col, row), seg in zip(tiles, segs, strict=True):
            try:
                data, tile = next(datas), None
                if data is not None:
                    if len(data) < page.databytecounts[seg]:
                        raise SlideError(
                            f"{self.path}: tile {seg} is truncated",
                            "the file may be truncated or corrupt",
                        )
                    # a tile this cannot decode in place (odd JPEG dimensions, say) goes the
                    # general way below, which raises if the tile is really broken
                    tile = decode_jpeg_tile(data, lv.jpeg, out)
                if tile is None:
                    tile = self._decode_tile(lv, seg)
            except SlideError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad slide, not a bug
                raise SlideError(
                    f"{self.path}: cannot decode level {level} tile ({col}, {row}): {first_line(e)}"
                ) from None
            yield tile

    def _tile(self, level: int, lv: _Level, row: int, col: int) -> np.ndarray:
        """Decoded (seg_h, seg_w, 3) uint8 RGB tile (edge tiles padded), via the LRU cache."""
        key = (level, row * lv.n_across + col)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        tile = self._decode_tile(lv, key[1])
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_used += tile.nbytes
                while self._cache_used > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_used -= old.nbytes
        return tile

    def _decode_tile(self, lv: _Level, seg: int) -> np.ndarray:
        arr = self._tile_samples(lv, seg)
        if lv.bits < 8 and lv.photometric != 3:  # 2-, 4-bit ... grey/RGB: 0..2**bits-1 -> 0..255
            arr = expand_low_bits(arr, lv.bits)
        arr = to_uint8(arr, lv.bits if lv.bits >= 8 else None, self._float_max)
        if lv.photometric == 0:  # MinIsWhite
            arr = 255 - arr
        elif lv.photometric == 3 and lv.colormap is not None:
            return lv.colormap[arr[..., 0]]
        return to_rgb(arr, lv.alpha)

    def _tile_samples(self, lv: _Level, seg: int) -> np.ndarray:
        """(seg_h, seg_w, samples) stored samples of segment ``seg`` (channel pages and planes
        stacked), before any mapping to uint8."""
        per_plane = lv.n_across * lv.n_down
        if len(lv.pages) > 1:  # one grayscale page per channel
            planes = [self._decode_segment(p, seg, lv)[..., 0] for p in lv.pages]
            arr = np.stack(planes, axis=-1)
        elif lv.planar:
            planes = [
                self._decode_segment(lv.pages[0], s * per_plane + seg, lv)[..., 0]
                for s in range(min(lv.samples, 4))
            ]
            arr = np.stack(planes, axis=-1)
        else:
            arr = self._decode_segment(lv.pages[0], seg, lv)
        return arr

    def _measure_float_max(self) -> float:
        """The float sample value that maps to 255 (:func:`float_white`), from up to
        :data:`_FLOAT_SAMPLE_SEGMENTS` segments spread over the smallest level; 1.0 for
        integer images."""
        lv = self._levels[-1]
        if np.dtype(lv.pages[0].dtype).kind != "f":
            return 1.0
        n = lv.n_across * lv.n_down
        parts = []
        for seg in np.unique(np.linspace(0, n - 1, min(n, _FLOAT_SAMPLE_SEGMENTS)).astype(int)):
            row, col = divmod(int(seg), lv.n_across)
            h = min(lv.seg_h, lv.height - row * lv.seg_h)
            w = min(lv.seg_w, lv.width - col * lv.seg_w)
            a = self._tile_samples(lv, int(seg))
            if a.dtype.kind == "f":  # not a missing (white) segment
                parts.append(a[:h, :w, :3].ravel())
        return float_white(np.concatenate(parts)) if parts else 1.0

    def _decode_segment(self, page: Any, index: int, lv: _Level) -> np.ndarray:
        """(seg_h, seg_w, samples) array of one segment; missing (sparse) segments are white."""
        if lv.raw:
            return self._raw_block(page, index, lv)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        spp = 1 if (lv.planar or len(lv.pages) > 1) else lv.samples
        if not count or not offset:
            return np.full(
                (lv.seg_h, lv.seg_w, spp), PAD_VALUE if lv.photometric != 0 else 0, np.uint8
            )
        data = os.pread(self._fd, count, offset)
        if len(data) < count:
            raise SlideError(
                f"{self.path}: tile {index} is truncated", "the file may be truncated or corrupt"
            )
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, _fullsize=True)
        arr = np.asarray(decoded)[0]  # (seg_h, seg_w, samples)
        if arr.shape[0] != lv.seg_h or arr.shape[1] != lv.seg_w:  # last strip of a stripped image
            pad = np.zeros((lv.seg_h, lv.seg_w, arr.shape[2]), arr.dtype)
            pad[: arr.shape[0], : arr.shape[1]] = arr
            arr = pad
        return arr

    def _raw_block(self, page: Any, index: int, lv: _Level) -> np.ndarray:
        """Block ``index`` (numbered like segments) of an uncompressed page, read row by row
        with ``os.pread`` (no memory map: no address-space cost, no SIGBUS on a file cut while
        open): (seg_h, seg_w, samples), the part past the image edge zero."""
        plane, seg = divmod(index, lv.n_across * lv.n_down)
        row, col = divmod(seg, lv.n_across)
        y0, x0 = row * lv.seg_h, col * lv.seg_w
        y1, x1 = min(y0 + lv.seg_h, lv.height), min(x0 + lv.seg_w, lv.width)
        spp = int(page.samplesperpixel)
        n_samples = 1 if int(page.planarconfig) == 2 and spp > 1 else spp
        stored = np.dtype(page.dtype).newbyteorder(self._tf.byteorder)
        px_bytes = n_samples * stored.itemsize
        row_bytes = lv.width * px_bytes
        # planar: ``plane`` is the sample plane, stored after the planes before it
        base = int(page.dataoffsets[0]) + plane * lv.height * row_bytes
        out = np.zeros((lv.seg_h, lv.seg_w, n_samples), stored.newbyteorder("="))
        full_rows = x0 == 0 and x1 == lv.width
        # whole rows: one read for the block; else one read per row of the block
        spans = [(y0, y1)] if full_rows else [(y, y + 1) for y in range(y0, y1)]
        for ya, yb in spans:
            n = (yb - ya) * row_bytes if full_rows else (x1 - x0) * px_bytes
            data = os.pread(self._fd, n, base + ya * row_bytes + x0 * px_bytes)
            if len(data) < n:
                raise SlideError(
                    f"{self.path}: the file is shorter than when it was opened (cut or being "
                    "rewritten)",
                    "wait until it is written completely, or copy it again",
                )
            out[ya - y0 : yb - y0, : x1 - x0] = np.frombuffer(data, stored).reshape(
                yb - ya, x1 - x0, n_samples
            )
        return out

    def properties(self) -> dict:
        d = super().properties()
        d["tiff_series"] = self._series_index
        d["ome"] = bool(self._tf.is_ome)
        return d

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_tf", None) is not None:
            self._tf.close()
            self._tf = None
        self._cache = OrderedDict()
        self._cache_used = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _is_raw_strips(page: Any) -> bool:
    """Whether ``page`` holds uncompressed, byte-aligned samples (8 to 64 bits, no predictor,
    normal fill order, no subsampling) in one run of bytes from its first strip on."""
    try:
        return bool(
            not page.is_tiled
            and page.is_final
            and page.dtype is not None
            and page.dtype != bool
            and sum(int(c) for c in page.databytecounts) >= page.nbytes
        )
    except Exception:  # noqa: BLE001 - any doubt: decode strip by strip
        return False


@dataclass
class _PageLevel:
    """A pyramid level made of top-level pages tifffile did not put in the series."""

    pages: list[Any]


def _channel_pages(lv: Any) -> list[Any] | None:
    """The pages of channels 0, 1, 2 at index 0 of every other page axis (T, Z, ...) of a
    series level whose channels are separate pages, or None (fewer than 3 channels, channels
    as samples, or a page layout that does not match the series shape)."""
    try:
        axes = lv.get_axes(False)
        shape = lv.get_shape(False)
    except Exception:  # noqa: BLE001
        return None
    page_dims = [(a, int(n)) for a, n in zip(axes, shape, strict=True) if a not in "YXS"]
    names = [a for a, _ in page_dims]
    sizes = [n for _, n in page_dims]
    if "C" not in names or sizes[names.index("C")] < 3 or int(np.prod(sizes)) != len(lv.pages):
        return None
    ci = names.index("C")
    pages = []
    for c in range(3):
        idx = [0] * len(sizes)
        idx[ci] = c
        page = lv.pages[int(np.ravel_multi_index(idx, sizes))]
        if page is None:
            return None
        pages.append(page)
    return pages


def _ome_pixels(xml: str, series_index: int) -> Any:
    """The ``Pixels`` element of the ``series_index``-th OME Image, or None."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root.iter() if el.tag.endswith("}Image") or el.tag == "Image"]
    if not images:
        return None
    img = images[min(series_index, len(images) - 1)] if series_index >= 0 else images[0]
    for el in img.iter():
        if el.tag.endswith("Pixels"):
            return el
    return None


def _consistent_level(path: Path, base: _Level, level: _Level) -> bool:
    """Whether ``level`` is ``base`` (level 0) reduced by one downsample in x and y (within
    rounding or 1 %); warns why not."""
    why = level_mismatch((base.width, base.height), (level.width, level.height))
    if why is not None:
        log.warning(
            "%s: dropped pyramid level %d x %d px: %s", path, level.width, level.height, why
        )
    return why is None


def _ome_physical_size(el: Any, axis: str) -> float | None:
    """OME ``PhysicalSize{axis}`` (converted to µm) of a Pixels element: None when absent, in
    an unknown unit, or not a usable value (:func:`valid_mpp`: inf, nan, 0, 1e300, ...)."""
    size = el.get(f"PhysicalSize{axis}")
    factor = UM_PER_UNIT.get(el.get(f"PhysicalSize{axis}Unit", "µm"))
    if size is None or factor is None:
        return None
    try:
        return valid_mpp(float(size) * factor)
    except (ValueError, OverflowError):
        return None


def _ome_mpp(xml: str, series_index: int, path: Path | None = None) -> float | None:
    """PhysicalSizeX (converted to µm) of the ``series_index``-th OME Image, or None.

    Non-square pixels (PhysicalSizeY differs): a warning, and X is kept, as OpenSlide's
    ``mpp-x`` is what the other backends report and level choice uses one mpp per slide."""
    el = _ome_pixels(xml, series_index)
    if el is None:
        return None
    x = _ome_physical_size(el, "X")
    y = _ome_physical_size(el, "Y")
    if x is not None and y is not None and abs(x - y) > 1e-3 * max(x, y):
        log.warning(
            "%s: OME pixels are not square (PhysicalSizeX %.6g µm, PhysicalSizeY %.6g µm): "
            "using X as the slide's µm/px",
            path,
            x,
            y,
        )
    return x


def _ome_significant_bits(xml: str, series_index: int) -> int | None:
    """OME ``SignificantBits`` of the ``series_index``-th Image (e.g. 12 for 12-bit camera data
    stored as uint16), or None."""
    el = _ome_pixels(xml, series_index)
    try:
        return int(el.get("SignificantBits")) if el is not None else None
    except (TypeError, ValueError):
        return None


def _resolution_mpp(page: Any, um_per_unit: float | None = None) -> float | None:
    """µm/px from XResolution + ResolutionUnit (centimetre or inch, as OpenSlide reports it;
    also DNG's millimetre and micrometre, ``resolutionunit="MICROMETER"`` in tifffile); with
    ResolutionUnit "none", ``um_per_unit`` µm per resolution unit when given (ImageJ)."""
    tag = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if tag is None or unit_tag is None:
        return None
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    if not num or not den:
        return None
    px_per_unit = num / den
    unit = int(unit_tag.value)
    if unit == 3:
        return 1e4 / px_per_unit
    if unit == 2:
        return 25400.0 / px_per_unit
    if unit in (4, 5):  # millimetre, micrometre: DNG's units, which tifffile writes on request
        return (1e3 if unit == 4 else 1.0) / px_per_unit
    if unit == 1 and um_per_unit:
        return um_per_unit / px_per_unit
    return None
