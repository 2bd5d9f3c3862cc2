"""Drawing attention on slide thumbnails. Pure numpy on (h, w, 3) uint8 images.

Everything is computed at thumbnail scale and vectorised over patches: a slide of 10^5..10^6
patches costs a few array passes over the thumbnail, never one draw call per patch.

- :func:`draw_attention_boxes`: the seed's picture -- bold blue box outlines over every
  patch, opacity ``max_alpha * attention / max(attention)`` (or min-max / rank scaled). Overlapping boxes composite
  like stacked translucent layers (``alpha = 1 - prod(1 - alpha_i)``).
- :func:`draw_smooth_heatmap`: attention painted on the patch footprints, Gaussian-smoothed
  (normalised convolution, so tissue edges do not fade), colour-mapped and alpha-blended.
- :func:`draw_marker_boxes`: true marker bounding boxes as green outlines.
- :func:`topk_strip`: a row of patch crops with captions.
"""

from __future__ import annotations

import numpy as np

from wsi_mil.slides.base import thumbnail_size  # noqa: F401 - part of this module's API

BLUE = (0, 0, 255)
MARKER_GREEN = (0, 200, 0)
TOPK_HIT = (0, 170, 0)
TOPK_MISS = (200, 40, 40)


# ---------------------------------------------------------------- geometry
def patch_boxes_thumb(
    coords_level0: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    thumb_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Patch boxes in thumbnail px: ((K, 4) int64 x0, y0, x1, y1 exclusive, (K,) index into coords).

    Edges are rounded from level-0 edges, so a gap-free grid stays gap-free and
    non-overlapping; every box is at least 1 px; boxes wholly outside are dropped.
    """
    th, tw = thumb_hw
    w0, h0 = level0_size
    sx, sy = tw / max(1, w0), th / max(1, h0)
    xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    ps = float(patch_size_level0)
    x0 = np.round(xy[:, 0] * sx).astype(np.int64)
    y0 = np.round(xy[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(np.round((xy[:, 0] + ps) * sx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((xy[:, 1] + ps) * sy).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, tw), np.clip(x1, 0, tw)
    y0, y1 = np.clip(y0, 0, th), np.clip(y1, 0, th)
    keep = np.flatnonzero((x1 > x0) & (y1 > y0))
    return np.stack([x0, y0, x1, y1], axis=1)[keep], keep


def outline_px(box_side_px: float) -> int:
    """Outline thickness for boxes of this side: bold (~1/5 of the side), at least 1 px.

    Boxes of 4 px or less are filled: an outline would not be visible anyway.
    """
    s = float(box_side_px)
    if s <= 4:
        return max(1, int(np.ceil(s / 2)))
    return max(1, int(round(0.2 * s)))


def rect_sum(shape_hw: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(h, w) float64: sum of ``values[i]`` over the rectangles ``boxes[i]`` (x0, y0, x1, y1 excl.).

    Summed-area trick: four scatter-adds into a difference array, then two cumsums; cost
    O(K + h * w) whatever the size of the boxes.
    """
    h, w = shape_hw
    d = np.zeros((h + 1, w + 1), dtype=np.float64)
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    np.add.at(d, (b[:, 1], b[:, 0]), v)
    np.add.at(d, (b[:, 1], b[:, 2]), -v)
    np.add.at(d, (b[:, 3], b[:, 0]), -v)
    np.add.at(d, (b[:, 3], b[:, 2]), v)
    return np.cumsum(np.cumsum(d, axis=0), axis=1)[:h, :w]


def outline_alpha(
    shape_hw: tuple[int, int], boxes: np.ndarray, alphas: np.ndarray, thickness_px: int
) -> np.ndarray:
    """(h, w) float64 in [0, 1]: box outlines of opacity ``alphas`` composited over each other.

    Same-colour layers stacked with "over" give ``1 - prod(1 - a_i)``; the product becomes
    a sum of logs, which :func:`rect_sum` accumulates (outer rectangle minus inner one).
    """
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    a = np.clip(np.asarray(alphas, dtype=np.float64).reshape(-1), 0.0, 1.0 - 1e-9)
    log_keep = np.log1p(-a)  # <= 0
    t = int(thickness_px)
    inner = np.stack([b[:, 0] + t, b[:, 1] + t, b[:, 2] - t, b[:, 3] - t], axis=1)
    has_inner = (inner[:, 2] > inner[:, 0]) & (inner[:, 3] > inner[:, 1])
    all_boxes = np.concatenate([b, inner[has_inner]])
    all_vals = np.concatenate([log_keep, -log_keep[has_inner]])
    s = rect_sum(shape_hw, all_boxes, all_vals)
    return 1.0 - np.exp(np.minimum(s, 0.0))


def blend(
    img: np.ndarray, colour: tuple[int, int, int] | np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """``img * (1 - alpha) + colour * alpha``; ``colour`` (3,) or (h, w, 3); uint8 out."""
    a = np.asarray(alpha, dtype=np.float32)[..., None]
    c = np.asarray(colour, dtype=np.float32)
    out = img.astype(np.float32) * (1.0 - a) + c * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


SCALES = ("max", "minmax", "rank")


def scaled_attention(attention: np.ndarray, scale: str = "max") -> np.ndarray:
    """Attention mapped to [0, 1] for drawing.

    max (the seed's): ``a / max(a)``; minmax: ``(a - min) / (max - min)`` (contrast for
    nearly flat attention); rank: percentile rank in (0, 1] (CLAM-style, ties share a rank).
    """
    a = np.clip(np.asarray(attention, dtype=np.float64).reshape(-1), 0.0, None)
    if len(a) == 0:
        return a
    if scale == "max":
        m = a.max()
        return a / m if m > 0 else a
    if scale == "minmax":
        lo, hi = a.min(), a.max()
        return (a - lo) / (hi - lo) if hi > lo else np.ones_like(a)
    if scale == "rank":
        from wsi_mil.train.metrics import average_ranks

        return average_ranks(a) / len(a)
    raise ValueError(f"unknown attention scale {scale!r}; choose one of {', '.join(SCALES)}")


# ---------------------------------------------------------------- styles
def draw_attention_boxes(
    thumb: np.ndarray,
    coords_level0: np.ndarray,
    attention: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    colour: tuple[int, int, int] = BLUE,
    max_alpha: float = 0.85,
    scale: str = "max",
) -> np.ndarray:
    """The seed's overlay: bold ``colour`` outlines, opacity ``max_alpha * a / max(a)``.

    ``thumb`` (h, w, 3) uint8 shows the whole level-0 extent ``level0_size`` (w, h).
    """
    th, tw = thumb.shape[:2]
    boxes, keep = patch_boxes_thumb(coords_level0, patch_size_level0, level0_size, (th, tw))
    if len(boxes) == 0:
        return thumb.copy()
    side = float(np.median(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    alphas = float(max_alpha) * scaled_attention(attention, scale)[keep]
    alpha = outline_alpha((th, tw), boxes, alphas, outline_px(side))
    return blend(thumb, colour, alpha)


def attention_grid(
    coords_level0: np.ndarray,
    attention: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    thumb_hw: tuple[int, int],
    scale: str = "max",
) -> tuple[np.ndarray, np.ndarray]:
    """((h, w) mean scaled attention over the patches covering each pixel, (h, w) patch count)."""
    boxes, keep = patch_boxes_thumb(coords_level0, patch_size_level0, level0_size, thumb_hw)
    a = scaled_attention(attention, scale)[keep]
    total = rect_sum(thumb_hw, boxes, a)
    count = rect_sum(thumb_hw, boxes, np.ones(len(boxes)))
    count = np.round(count)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return mean, count


def draw_smooth_heatmap(
    thumb: np.ndarray,
    coords_level0: np.ndarray,
    attention: np.ndarray,
    patch_size_level0: int,
    level0_size: tuple[int, int],
    max_alpha: float = 0.6,
    cmap: str = "jet",
    sigma_patches: float = 0.5,
    scale: str = "max",
) -> np.ndarray:
    """Smooth colour heatmap: attention on the patch footprints, Gaussian of ``sigma_patches``
    patch sides, colour map ``cmap`` over [0, 1] of the smoothed maximum, blended where patches are.

    The smoothing runs on a grid of ~4 px per patch side and is resized up (bilinear), so
    its cost does not grow with the thumbnail size.
    """
    from matplotlib import colormaps
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    th, tw = thumb.shape[:2]
    w0, _ = level0_size
    side_px = max(1.0, patch_size_level0 * tw / max(1, w0))
    f = max(1, int(side_px // 4))  # coarse grid: thumbnail px per coarse px
    ch, cw = -(-th // f), -(-tw // f)
    # the coarse grid covers f*cw x f*ch thumbnail px = a slightly larger level-0 extent
    ext0 = (level0_size[0] * (cw * f) / tw, level0_size[1] * (ch * f) / th)
    mean, count = attention_grid(coords_level0, attention, patch_size_level0, ext0, (ch, cw), scale)
    covered = (count > 0).astype(np.float32)
    sigma = max(0.5, sigma_patches * side_px / f)
    num = gaussian_filter((mean * covered).astype(np.float32), sigma, mode="constant")
    den = gaussian_filter(covered, sigma, mode="constant")
    smooth = np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)

    def up(a: np.ndarray) -> np.ndarray:
        if f == 1:
            return a
        box = (0.0, 0.0, tw / f, th / f)
        img = Image.fromarray(a.astype(np.float32), mode="F")
        return np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR, box=box))

    smooth, den = up(smooth), up(den)
    peak = smooth.max()
    if peak > 0:
        smooth = smooth / peak
    rgb = colormaps[cmap](np.clip(smooth, 0.0, 1.0), bytes=True)[..., :3]
    # the patches' footprint with a soft edge; untiled background stays as it is
    alpha = float(max_alpha) * np.clip(2.0 * den, 0.0, 1.0)
    return blend(thumb, rgb, alpha)


def draw_marker_boxes(
    img: np.ndarray,
    boxes_level0: np.ndarray,
    level0_size: tuple[int, int],
    colour: tuple[int, int, int] = MARKER_GREEN,
    thickness_px: int | None = None,
) -> np.ndarray:
    """Opaque ``colour`` outlines of the marker boxes (M, 4) level-0 x0, y0, x1, y1 (excl.)."""
    out = img.copy()
    th, tw = img.shape[:2]
    b = np.asarray(boxes_level0, dtype=np.int64).reshape(-1, 4)
    if len(b) == 0:
        return out
    sx, sy = tw / max(1, level0_size[0]), th / max(1, level0_size[1])
    t = int(thickness_px) if thickness_px else max(2, int(round(max(th, tw) / 300)))
    for x0l, y0l, x1l, y1l in b:
        x0, y0 = int(np.floor(x0l * sx)), int(np.floor(y0l * sy))
        x1, y1 = int(np.ceil(x1l * sx)), int(np.ceil(y1l * sy))
        # grow by the outline so it frames the marker instead of covering its edge
        x0, y0, x1, y1 = x0 - t, y0 - t, x1 + t, y1 + t
        for ya, yb, xa, xb in (
            (y0, y0 + t, x0, x1),
            (y1 - t, y1, x0, x1),
            (y0, y1, x0, x0 + t),
            (y0, y1, x1 - t, x1),
        ):
            ya, yb = max(ya, 0), min(yb, th)
            xa, xb = max(xa, 0), min(xb, tw)
            if yb > ya and xb > xa:
                out[ya:yb, xa:xb] = colour
    return out


def topk_strip(
    tiles: list[np.ndarray],
    captions: list[str],
    hits: list[bool | None] | None = None,
    tile_px: int = 192,
    pad_px: int = 6,
    caption_px: int = 30,
) -> np.ndarray:
    """(H, W, 3) uint8: ``tiles`` resized to ``tile_px``, side by side, each with a caption.

    ``hits[i]`` True/False frames tile i green/red (on/off a marker); None: no frame.
    """
    from PIL import Image, ImageDraw

    n = max(1, len(tiles))
    w = n * (tile_px + pad_px) + pad_px
    h = tile_px + 2 * pad_px + caption_px
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        x = pad_px + i * (tile_px + pad_px)
        im = Image.fromarray(np.asarray(tile, dtype=np.uint8)).resize(
            (tile_px, tile_px), Image.Resampling.LANCZOS
        )
        canvas.paste(im, (x, pad_px))
        hit = None if hits is None else hits[i]
        if hit is not None:
            c = TOPK_HIT if hit else TOPK_MISS
            draw.rectangle([x, pad_px, x + tile_px - 1, pad_px + tile_px - 1], outline=c, width=4)
        for j, line in enumerate(captions[i].split("\n")[:2]):
            draw.text((x + 2, pad_px + tile_px + 2 + 13 * j), line, fill=(0, 0, 0))
    return np.asarray(canvas)
