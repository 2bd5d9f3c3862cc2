"""Pure, deterministic rendering of any region of a synthetic slide at any downsample.

Every pixel is the *box average* of a continuous image over its footprint: a pixel of
a level with downsample ``d`` at column ``j`` covers level-0 x in ``[x0 + j*d, x0 +
(j+1)*d)``. The linear parts of the image (random fields built from cubic B-splines on
a seeded lattice) are box-averaged exactly, in closed form, so a level-k pixel equals
the mean of its ``d x d`` level-0 pixels; the non-linear parts (tissue edge, marker
outlines, clipping) are filtered analytically and agree to within a few grey levels.
Lower pyramid levels are therefore rendered directly, never downsampled from a stored
level 0, and nothing ever holds more than one tile.

Random lattice values are drawn per 64x64 block of nodes from a generator seeded with
``(slide seed, field id, block row, block column)``, so a pixel's value does not
depend on which tile asked for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

_BLOCK = 64  # lattice nodes per random block side
_OFFSET = 1 << 24  # keeps block indices non-negative for SeedSequence
_MAX_NODES = 1536  # per axis per call; coarser sampling than this means the field is averaged out
_UNIT_STD = 0.48  # std of a B-spline field of iid N(0,1) nodes (sqrt of sum of squared weights)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "blue": (0, 0, 255),
    "green": (0, 255, 0),
    "yellow": (255, 255, 0),
}
SHAPES = ("circle", "ellipse", "rectangle")

# tissue style palette (RGB): glass, eosin-pink stroma, haematoxylin-purple nuclei
_GLASS = np.array([241.0, 240.0, 243.0], np.float32)
_EOSIN = np.array([236.0, 166.0, 204.0], np.float32)
_HAEMA = np.array([98.0, 62.0, 148.0], np.float32)


@dataclass(frozen=True)
class Marker:
    """One marker outline in level-0 px. ``angle_deg`` rotates ellipses and rectangles.

    ``size_a``/``size_b``: radius (circle), semi-axes (ellipse), half-width/half-height
    (rectangle), measured to the middle of the outline. ``thickness_px``: outline width;
    ``filled``: solid shape instead of an outline.
    """

    shape: str
    cx: float
    cy: float
    size_a: float
    size_b: float
    angle_deg: float
    colour: str
    thickness_px: int
    filled: bool = False

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) level-0 px, x1/y1 exclusive: every pixel the marker touches."""
        hx, hy = self._half_extent()
        pad = (0.0 if self.filled else self.thickness_px / 2.0) + 1.0  # +1: anti-aliasing ramp
        return (
            math.floor(self.cx - hx - pad),
            math.floor(self.cy - hy - pad),
            math.ceil(self.cx + hx + pad),
            math.ceil(self.cy + hy + pad),
        )

    def _half_extent(self) -> tuple[float, float]:
        t = math.radians(self.angle_deg)
        c, s = abs(math.cos(t)), abs(math.sin(t))
        a, b = self.size_a, self.size_b
        if self.shape == "circle":
            return a, a
        if self.shape == "ellipse":
            return math.hypot(a * c, b * s), math.hypot(a * s, b * c)
        return a * c + b * s, a * s + b * c


@dataclass(frozen=True)
class SlideSpec:
    """Everything needed to render one slide (level-0 size in px)."""

    slide_id: str
    width_px: int
    height_px: int
    label: int
    background: str  # "noise" | "tissue"
    seed: int
    markers: tuple[Marker, ...] = field(default_factory=tuple)
    brightness: float = 0.0  # noise style: per-slide brightness jitter (grey levels)
    tissue_scale_px: float = 0.0  # tissue style: lattice spacing of the tissue-shape field


# --------------------------------------------------------------------- fields
def _bspline_cdf(t: np.ndarray) -> np.ndarray:
    """Integral of the centred cubic B-spline from -inf to ``t`` (float64)."""
    u = -np.abs(t)
    out = np.where(
        u <= -2.0,
        0.0,
        np.where(
            u <= -1.0,
            (2.0 + u) ** 4 / 24.0,
            1.0 / 24.0 + (4.0 * u - 2.0 * u**3 - 0.75 * u**4 + 2.75) / 6.0,
        ),
    )
    return np.where(t > 0, 1.0 - out, out)


def _axis_weights(
    start_px: float, n: int, d: float, spacing_px: float
) -> tuple[int, np.ndarray] | None:
    """Box-average weights; shares work between tiles whose offset within a lattice cell repeats."""
    cell = math.floor(start_px / spacing_px)
    got = _axis_weights_cached(start_px - cell * spacing_px, n, d, spacing_px)
    return None if got is None else (got[0] + cell, got[1])


@functools.lru_cache(maxsize=64)
def _axis_weights_cached(
    start_px: float, n: int, d: float, spacing_px: float
) -> tuple[int, np.ndarray] | None:
    """Box-average weights of lattice nodes for ``n`` footprints of ``d`` px from ``start_px``.

    Returns (first node index, (n, n_nodes) float32 matrix), or None when the call would
    need more than ``_MAX_NODES`` nodes (the field is then averaged out to ~0 anyway).
    """
    a = (start_px + np.arange(n, dtype=np.float64) * d) / spacing_px
    b = a + d / spacing_px
    i0 = math.floor(a[0]) - 2
    i1 = math.ceil(b[-1]) + 2
    if i1 - i0 > _MAX_NODES:
        return None
    # each footprint meets only the K nodes within 2 of it: evaluate that band, scatter it
    k_band = math.ceil(d / spacing_px) + 5
    first = np.floor(a).astype(np.int64) - 2  # (n,)
    cols = first[:, None] + np.arange(k_band)[None, :]  # (n, K) node indices
    nodes = cols.astype(np.float64)
    band = (_bspline_cdf(b[:, None] - nodes) - _bspline_cdf(a[:, None] - nodes)) / (b - a)[:, None]
    w = np.zeros((n, i1 - i0 + k_band), np.float64)
    np.put_along_axis(w, cols - i0, band, axis=1)
    w = w[:, : i1 - i0]
    w[np.abs(w) < 1e-9] = 0.0  # float32 denormals would make the matrix products ~50x slower
    w = w.astype(np.float32)
    w.flags.writeable = False
    return i0, w


def _lattice(seed: int, field_id: int, iy0: int, ny: int, ix0: int, nx: int) -> np.ndarray:
    """(ny, nx) float32 iid N(0,1) lattice values for nodes [iy0, iy0+ny) x [ix0, ix0+nx)."""
    out = np.empty((ny, nx), np.float32)
    by0, by1 = iy0 // _BLOCK, (iy0 + ny - 1) // _BLOCK
    bx0, bx1 = ix0 // _BLOCK, (ix0 + nx - 1) // _BLOCK
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            rng = np.random.default_rng([seed, field_id, by + _OFFSET, bx + _OFFSET])
            block = rng.standard_normal((_BLOCK, _BLOCK), dtype=np.float32)
            ys, xs = by * _BLOCK, bx * _BLOCK
            y_lo, y_hi = max(ys, iy0), min(ys + _BLOCK, iy0 + ny)
            x_lo, x_hi = max(xs, ix0), min(xs + _BLOCK, ix0 + nx)
            out[y_lo - iy0 : y_hi - iy0, x_lo - ix0 : x_hi - ix0] = block[
                y_lo - ys : y_hi - ys, x_lo - xs : x_hi - xs
            ]
    return out


def field(
    seed: int, field_id: int, spacing_px: float, x0: float, y0: float, w: int, h: int, d: float
) -> np.ndarray:
    """(h, w) float32 smooth random field, unit std at level 0, box-averaged over footprints.

    Features are about ``spacing_px`` level-0 px across. Zeros where the footprint is so
    large that the field averages out (std below ~0.1 of level 0's).
    """
    wx = _axis_weights(x0, w, d, spacing_px)
    wy = _axis_weights(y0, h, d, spacing_px)
    if wx is None or wy is None:
        return np.zeros((h, w), np.float32)
    (ix0, ax), (iy0, ay) = wx, wy
    g = _lattice(seed, field_id, iy0, ay.shape[1], ix0, ax.shape[1])
    return (ay @ (g @ ax.T)) * np.float32(1.0 / _UNIT_STD)


# ---------------------------------------------------------------- backgrounds
_F_TISSUE, _F_STAIN, _F_MID, _F_FINE, _F_GLASS, _F_NOISE = 1, 2, 3, 4, 5, 10
TISSUE_THRESHOLD = 0.15  # field value above which there is tissue (~44% of the area)
_EDGE_PX = 3.0  # width of the tissue/glass edge ramp at level 0
_FIELD_SLOPE = 1.1  # typical |gradient| of a unit field, in std per lattice spacing
NOISE_SPACING_PX = 24.0  # ~ the seed's Gaussian blur of uniform noise
NOISE_STD = 1.5  # grey levels: the seed's blurred-noise amplitude (measured on its sample image)


def tissue_mask(spec: SlideSpec, x0: float, y0: float, w: int, h: int, d: float) -> np.ndarray:
    """(h, w) float32 tissue fraction in [0, 1] of each footprint (tissue style)."""
    f = field(spec.seed, _F_TISSUE, spec.tissue_scale_px, x0, y0, w, h, d)
    # the edge is a ramp _EDGE_PX wide at level 0; box averaging widens it to ~d px
    eps = (_EDGE_PX + d - 1.0) * _FIELD_SLOPE / spec.tissue_scale_px
    return np.clip((f - TISSUE_THRESHOLD) / eps + 0.5, 0.0, 1.0)


def _tissue_rgb(spec: SlideSpec, x0: int, y0: int, w: int, h: int, d: float) -> np.ndarray:
    s = spec.seed
    m = tissue_mask(spec, x0, y0, w, h, d)[..., None]
    stain = field(s, _F_STAIN, 512.0, x0, y0, w, h, d)
    mid = field(s, _F_MID, 16.0, x0, y0, w, h, d)
    fine = field(s, _F_FINE, 4.0, x0, y0, w, h, d)
    # haematoxylin fraction: patchy nuclei-rich areas, clusters, fine grain
    hfrac = (0.33 + 0.10 * stain + 0.16 * mid + 0.20 * fine)[..., None]
    tissue = _EOSIN + hfrac * (_HAEMA - _EOSIN)
    glass = _GLASS + 1.5 * field(s, _F_GLASS, 64.0, x0, y0, w, h, d)[..., None]
    return glass + m * (tissue - glass)


def _noise_rgb(spec: SlideSpec, x0: int, y0: int, w: int, h: int, d: float) -> np.ndarray:
    chans = [field(spec.seed, _F_NOISE + c, NOISE_SPACING_PX, x0, y0, w, h, d) for c in range(3)]
    return np.float32(127.5 + spec.brightness) + NOISE_STD * np.stack(chans, axis=-1)


# -------------------------------------------------------------------- markers
def _sdf(m: Marker, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) to the marker's outline centre line."""
    t = math.radians(m.angle_deg)
    c, s = math.cos(t), math.sin(t)
    dx, dy = px - m.cx, py - m.cy
    u = c * dx + s * dy  # rotate into the marker's frame
    v = -s * dx + c * dy
    if m.shape == "circle":
        return np.sqrt(u * u + v * v) - m.size_a
    if m.shape == "ellipse":
        a, b = m.size_a, m.size_b
        k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        k1 = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)
    qx = np.abs(u) - m.size_a
    qy = np.abs(v) - m.size_b
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def marker_coverage(m: Marker, x0: int, y0: int, w: int, h: int, d: float) -> np.ndarray:
    """(h, w) float32 fraction of each footprint the marker covers (1D box filter across it)."""
    px = (x0 + (np.arange(w, dtype=np.float32) + 0.5) * d)[None, :]
    py = (y0 + (np.arange(h, dtype=np.float32) + 0.5) * d)[:, None]
    s = _sdf(m, px, py)
    lo, hi = s - d / 2.0, s + d / 2.0
    if m.filled:
        band_lo, band_hi = -np.inf, 0.0
        cov = (np.minimum(hi, band_hi) - np.maximum(lo, band_lo)) / d
    else:
        half = m.thickness_px / 2.0
        cov = (np.minimum(hi, half) - np.maximum(lo, -half)) / d
    return np.clip(cov, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------- render
def render_region(
    spec: SlideSpec, x0: int, y0: int, w: int, h: int, downsample: int = 1
) -> np.ndarray:
    """(h, w, 3) uint8 RGB of the slide at ``downsample``; (x0, y0) in level-0 px.

    Pure function of its arguments: the same call always returns the same pixels, and a
    pixel's value does not depend on the region it was rendered in. Pixels beyond the
    slide edge are rendered like any other (callers crop or pad).
    """
    d = float(downsample)
    if spec.background == "tissue":
        rgb = _tissue_rgb(spec, x0, y0, w, h, d)
    else:
        rgb = _noise_rgb(spec, x0, y0, w, h, d)
    rx1, ry1 = x0 + w * d, y0 + h * d
    for m in spec.markers:
        bx0, by0, bx1, by1 = m.bbox
        if bx1 <= x0 or by1 <= y0 or bx0 >= rx1 or by0 >= ry1:
            continue
        # only the output pixels whose footprint meets the marker's bbox
        j0 = max(0, int((bx0 - x0) // d))
        j1 = min(w, int(math.ceil((bx1 - x0) / d)))
        i0 = max(0, int((by0 - y0) // d))
        i1 = min(h, int(math.ceil((by1 - y0) / d)))
        cov = marker_coverage(m, int(x0 + j0 * d), int(y0 + i0 * d), j1 - j0, i1 - i0, d)[..., None]
        col = np.asarray(COLOURS[m.colour], np.float32)
        sub = rgb[i0:i1, j0:j1]
        sub += cov * (col - sub)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
