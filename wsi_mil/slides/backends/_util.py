"""Small helpers shared by the backends: pixel conversion, unit maths, sniffing."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf", ".ome.tf8", ".ome.tf2")

# micrometres per unit, for NGFF / OME length units
UM_PER_UNIT = {
    "angstrom": 1e-4,
    "Å": 1e-4,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "µm": 1.0,
    "\\u00B5m": 1.0,  # ImageJ writes µm escaped
    "μm": 1.0,
    "um": 1.0,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
    # OME UnitsLength symbols / UDUNITS names seen less often
    "picometer": 1e-6,
    "pm": 1e-6,
    "decimeter": 1e5,
    "dm": 1e5,
    "inch": 25400.0,
    "in": 25400.0,
    "thou": 25.4,  # a thousandth of an inch
    "mil": 25.4,
    "foot": 304800.0,
    "ft": 304800.0,
    "point": 25400.0 / 72,
    "pt": 25400.0 / 72,
}

#: Level-0 µm/px outside this range is taken as unknown (None), like a missing value: 1e-4
#: µm (0.1 nm) is below electron-microscopy pixel sizes and 1e4 µm (1 cm) above any photo of a
#: glass slide, so values beyond are metadata garbage (``MPP = 1e300``, 1 px per inch, a
#: unit mix-up), and such a value would only make level choice by ``--mpp`` nonsense.
MPP_RANGE = (1e-4, 1e4)

#: A level's width and height must both be level 0's divided by one downsample, each rounded
#: up or down, within this many level px: anything else is an anisotropic level (e.g. half as
#: wide but a third as high) whose mean downsample would misplace level-0 coordinates.
LEVEL_SIZE_TOLERANCE_PX = 1.5


@contextlib.contextmanager
def quiet_readers():
    """Silence tifffile's log lines and Pillow's warnings about damaged files.

    Backends turn such failures into one :class:`SlideError` line instead.
    """
    lg = logging.getLogger("tifffile")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(old)


def valid_mpp(v: Any) -> float | None:
    """``v`` as a float if it is a usable µm/px (finite, within :data:`MPP_RANGE`), else None."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and MPP_RANGE[0] <= f <= MPP_RANGE[1] else None


def level_downsample_range(
    level0: tuple[int, int], level: tuple[int, int], tol: float = LEVEL_SIZE_TOLERANCE_PX
) -> tuple[float, float] | None:
    """The downsamples ``ds`` for which both of ``level``'s (width, height) are within ``tol``
    px of ``level0``'s divided by ``ds`` (as (lowest, highest)), or None when there is none:
    the level is empty, or its x and y downsamples differ by more than rounding."""
    lo, hi = 0.0, math.inf
    for full, n in zip(level0, level, strict=True):
        if n <= 0 or full <= 0:
            return None
        lo = max(lo, full / (n + tol))
        if n > tol:
            hi = min(hi, full / (n - tol))
    return (lo, hi) if lo <= hi * (1 + 1e-9) else None


#: x and y downsamples of a level that differ by less than this (relative) are one
#: downsample even past LEVEL_SIZE_TOLERANCE_PX: pyramids whose levels are padded to whole
#: tiles (46000 x 32914 -> 23040 x 16512) differ by ~0.2 %; real anisotropy by far more
LEVEL_ASPECT_TOLERANCE = 0.01


def level_mismatch(level0: tuple[int, int], level: tuple[int, int]) -> str | None:
    """Why ``level`` (width, height) is not ``level0`` reduced by one downsample in x and y
    (within rounding, :func:`level_downsample_range`, or LEVEL_ASPECT_TOLERANCE), or None."""
    if level_downsample_range(level0, level) is not None:
        return None
    if min(*level0, *level) <= 0:
        return f"it is empty ({level[0]} x {level[1]} px)"
    dx, dy = level0[0] / level[0], level0[1] / level[1]
    if abs(dx / dy - 1.0) <= LEVEL_ASPECT_TOLERANCE:
        return None
    return (
        f"its x downsample {dx:.4g} and y downsample {dy:.4g} (from level 0's "
        f"{level0[0]} x {level0[1]}) differ by more than {LEVEL_ASPECT_TOLERANCE:.0%}"
    )


def consistent_level(level0: tuple[int, int], level: tuple[int, int]) -> bool:
    """Whether ``level`` is ``level0`` reduced by one downsample (:func:`level_mismatch`)."""
    return level_mismatch(level0, level) is None


def first_line(e: BaseException) -> str:
    """First line of an exception message, at most 200 characters."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def lower_name(path: Path) -> str:
    return path.name.lower().rstrip("/")


def is_tiff_file(path: Path) -> bool:
    """True when ``path`` is a regular file starting with a TIFF/BigTIFF header."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGICS
    except OSError:
        return False


#: percentile of a float image's samples mapped to white when they exceed 1 (:func:`float_white`)
FLOAT_WHITE_PERCENTILE = 99.9
#: float images whose percentile is at most this are 0..1 intensities (values above 1 clip)
FLOAT_UNIT_MAX = 2.0


def float_white(samples: np.ndarray) -> float:
    """The float sample value :func:`to_uint8` maps to 255 for an image of ``samples`` (a
    sample of its values), from their :data:`FLOAT_WHITE_PERCENTILE` th percentile ``hi``:
    1.0 when ``hi <= FLOAT_UNIT_MAX`` (0..1 intensities, some overshooting a little, e.g.
    after stain normalisation: clipped), 255.0 when ``hi <= 255`` (8-bit values kept as
    float, which Pillow reads the same way), else ``hi`` (camera or processed values:
    0..4095, 0..65535, deconvolved). A fixed [0, 1] made all but the first white. NaN and
    inf are left out."""
    v = np.asarray(samples, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 1.0
    hi = float(np.percentile(v, FLOAT_WHITE_PERCENTILE))
    return 1.0 if hi <= FLOAT_UNIT_MAX else 255.0 if hi <= 255.0 else hi


def to_uint8(a: np.ndarray, bits: int | None = None, float_max: float = 1.0) -> np.ndarray:
    """Map any integer/float array to uint8 (16-bit -> top 8 bits, float 0..``float_max``).

    ``bits``: significant bits of unsigned samples (e.g. 12 in uint16), at most the stored
    width; their top 8 become the uint8 value. Signed samples keep their stored width.
    ``float_max``: the float value that maps to 255 (:func:`float_white`)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        width = a.dtype.itemsize * 8
        nbits = min(bits, width) if bits and a.dtype.kind == "u" else width
        shift = max(0, nbits - 8)
        return np.clip(a.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    scale = np.float32(255.0 / float_max)
    return np.clip(np.nan_to_num(a.astype(np.float32)) * scale + 0.5, 0, 255).astype(np.uint8)


def expand_low_bits(a: np.ndarray, bits: int) -> np.ndarray:
    """uint8 samples of ``bits`` < 8 significant bits (4-bit grey: 0..15) stretched to 0..255
    (``round(v * 255 / (2**bits - 1))``: 4-bit ``v * 17``, 1-bit 0/255); else ``a`` as is.
    Bool arrays (tifffile's bilevel images) are left to :func:`to_uint8`."""
    if a.dtype != np.uint8 or not 1 <= bits < 8:
        return a
    top = (1 << bits) - 1
    lut = np.full(256, 255, np.uint8)  # values above 2**bits - 1 (not in valid data): white
    lut[: top + 1] = np.round(np.arange(top + 1) * (255.0 / top)).astype(np.uint8)
    return lut[a]


def tiff_alpha(extrasamples: Any) -> str | None:
    """The alpha mode of a TIFF's first ExtraSamples value (1 associated = "premultiplied",
    2 unassociated = "straight"; None: no alpha, or an unspecified extra sample)."""
    return {1: "premultiplied", 2: "straight"}.get(int(extrasamples[0])) if extrasamples else None


def to_rgb(a: np.ndarray, alpha: str | None = None) -> np.ndarray:
    """(h, w, c) uint8 -> (h, w, 3): grayscale replicated, alpha composited over white.

    ``alpha``: None (a 4th sample is ignored), "straight" or "premultiplied".
    """
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    if c == 3:
        return a
    if c < 3:  # gray or gray+alpha
        return np.repeat(a[:, :, :1], 3, axis=2)
    rgb = a[:, :, :3]
    if alpha is None:
        return np.ascontiguousarray(rgb)
    al = a[:, :, 3:4]
    if al.min() == 255:
        return np.ascontiguousarray(rgb)
    rgb16 = rgb.astype(np.uint16)
    inv = 255 - al.astype(np.uint16)
    if alpha == "premultiplied":
        out = rgb16 + inv
    else:
        out = (rgb16 * al + 255 * inv + 127) // 255
    return np.clip(out, 0, 255).astype(np.uint8)


#: adjacent tiles are read with one read call when the bytes between them are at most this
#: (alignment padding; a skipped tile, e.g. background between tissue, ends the run)
READ_RUN_MAX_GAP = 4 << 10
#: ... and the whole run is at most this many bytes
READ_RUN_MAX_BYTES = 16 << 20


def byte_runs(
    offsets: Sequence[int],
    counts: Sequence[int],
    max_gap: int | None = None,
    max_bytes: int | None = None,
) -> list[tuple[int, int, int, int]]:
    """Group file segments, in the given order, into runs read with one call each.

    ``offsets``/``counts`` (n,): byte offset and length of each segment; a segment of length
    0 (a missing tile) is a run of its own. Consecutive segments share a run while each
    starts at most ``max_gap`` bytes past the previous one's end (never before it) and the
    run spans at most ``max_bytes`` (defaults: :data:`READ_RUN_MAX_GAP`,
    :data:`READ_RUN_MAX_BYTES`). Returns ``(first, stop, byte_start, byte_stop)`` per run:
    segments ``[first, stop)`` lie in file bytes ``[byte_start, byte_stop)``.
    """
    max_gap = READ_RUN_MAX_GAP if max_gap is None else max_gap
    max_bytes = READ_RUN_MAX_BYTES if max_bytes is None else max_bytes
    runs: list[tuple[int, int, int, int]] = []
    n = len(offsets)
    i = 0
    while i < n:
        start, end = int(offsets[i]), int(offsets[i]) + int(counts[i])
        j = i + 1
        if counts[i] and offsets[i]:
            while j < n and counts[j] and offsets[j]:
                o, c = int(offsets[j]), int(counts[j])
                if not (end <= o <= end + max_gap) or o + c - start > max_bytes:
                    break
                end = o + c
                j += 1
        runs.append((i, j, start, end))
        i = j
    return runs


def read_segments(
    fd: int, offsets: Sequence[int], counts: Sequence[int]
) -> Iterator[memoryview | None]:
    """The bytes of each file segment, in order, read in :func:`byte_runs` (one ``os.pread``
    per run: tiling's tiles are mostly adjacent in the file). None for a missing segment
    (offset or length 0); a segment past the end of the file comes back short. ``OSError``
    of a read propagates."""
    for first, stop, b0, b1 in byte_runs(offsets, counts):
        if not counts[first] or not offsets[first]:
            yield None
            continue
        run = memoryview(os.pread(fd, b1 - b0, b0))
        for k in range(first, stop):
            at = int(offsets[k]) - b0
            yield run[at : at + int(counts[k])]
