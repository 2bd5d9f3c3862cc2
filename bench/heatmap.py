"""Benchmark the heatmap drawing: vectorised (ours) vs one PIL draw call per patch.

For a virtual slide with N patches (a gap-free 224 px grid) and a white 2048 px thumbnail:

  ours (boxes)      wsi_mil.viz.heatmap.draw_attention_boxes: summed-area alpha layer
  ours (smooth)     draw_smooth_heatmap: coarse grid, Gaussian, colour map, blend
  PIL one layer     baseline: ImageDraw.rectangle(outline, width) per patch on ONE RGBA
                    overlay, composited once (fast, but an overlapping box overwrites the
                    one below instead of compositing with it)
  PIL per patch     baseline: the same per patch on its own RGBA layer, alpha-composited
                    (correct compositing, like the seed's per-patch drawing); timed on a
                    subset and extrapolated to N

The machine is shared, so compare the ratios printed at the end, not absolute times.

  .venv/bin/python bench/heatmap.py                 # N = 10^4 and 10^5
  .venv/bin/python bench/heatmap.py --n 1000000     # also 10^6
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from wsi_mil.viz.heatmap import (
    BLUE,
    draw_attention_boxes,
    draw_smooth_heatmap,
    outline_px,
    patch_boxes_thumb,
    scaled_attention,
    thumbnail_size,
)

PATCH = 224


def grid(n: int) -> tuple[np.ndarray, tuple[int, int]]:
    cols = int(math.ceil(math.sqrt(2 * n)))  # a 2:1 slide
    rows = int(math.ceil(n / cols))
    xs, ys = np.meshgrid(np.arange(cols) * PATCH, np.arange(rows) * PATCH)
    xy = np.stack([xs.ravel(), ys.ravel()], 1)[:n].astype(np.int64)
    return xy, (cols * PATCH, rows * PATCH)


def pil_per_patch(thumb, coords, att, level0, limit):
    """Baseline on the first ``limit`` patches; returns seconds for those."""
    from PIL import Image, ImageDraw

    th, tw = thumb.shape[:2]
    boxes, keep = patch_boxes_thumb(coords[:limit], PATCH, level0, (th, tw))
    a = 0.85 * scaled_attention(att)[:limit][keep]
    t = outline_px(float(np.median(boxes[:, 2] - boxes[:, 0])))
    img = Image.fromarray(thumb).convert("RGBA")
    t0 = time.perf_counter()
    for (x0, y0, x1, y1), al in zip(boxes.tolist(), a.tolist(), strict=True):
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).rectangle(
            [x0, y0, x1 - 1, y1 - 1], outline=(*BLUE, int(255 * al)), width=t
        )
        img = Image.alpha_composite(img, layer)
    return time.perf_counter() - t0


def pil_one_layer(thumb, coords, att, level0):
    from PIL import Image, ImageDraw

    th, tw = thumb.shape[:2]
    t0 = time.perf_counter()
    boxes, keep = patch_boxes_thumb(coords, PATCH, level0, (th, tw))
    a = (0.85 * 255 * scaled_attention(att)[keep]).astype(int)
    t = outline_px(float(np.median(boxes[:, 2] - boxes[:, 0])))
    layer = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for (x0, y0, x1, y1), al in zip(boxes.tolist(), a.tolist(), strict=True):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(*BLUE, al), width=t)
    Image.alpha_composite(Image.fromarray(thumb).convert("RGBA"), layer).convert("RGB")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--thumbnail-px", type=int, default=2048)
    ap.add_argument("--baseline-patches", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    att0 = np.ones(1)  # one warm-up call per size, so imports and page faults are not timed
    print(
        f"{'patches':>9} {'boxes s':>8} {'smooth s':>9} {'PIL 1 layer s':>14} {'ratio':>6} "
        f"{'PIL/patch ms':>13} {'PIL total s':>12} {'ratio':>7}"
    )
    for n in args.n:
        coords, level0 = grid(n)
        draw_attention_boxes(np.full((8, 8, 3), 255, np.uint8), coords[:1], att0, PATCH, level0)
        att = rng.dirichlet(np.ones(n))
        tw, th = thumbnail_size(level0, args.thumbnail_px)
        thumb = np.full((th, tw, 3), 255, np.uint8)
        t0 = time.perf_counter()
        draw_attention_boxes(thumb, coords, att, PATCH, level0)
        t_boxes = time.perf_counter() - t0
        t0 = time.perf_counter()
        draw_smooth_heatmap(thumb, coords, att, PATCH, level0)
        t_smooth = time.perf_counter() - t0
        t_one = pil_one_layer(thumb, coords, att, level0)
        k = min(n, args.baseline_patches)
        per = pil_per_patch(thumb, coords, att, level0, k) / k
        print(
            f"{n:>9} {t_boxes:>8.2f} {t_smooth:>9.2f} {t_one:>14.2f} {t_one / t_boxes:>5.1f}x "
            f"{1000 * per:>13.2f} "
            f"{per * n:>12.1f} {per * n / t_boxes:>6.0f}x"
        )
    print("ratios = PIL baseline / ours (boxes), same input, same run (per-patch extrapolated)")


if __name__ == "__main__":
    main()
