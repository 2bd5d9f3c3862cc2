"""Drawing: box geometry, opacity vs attention, placement on the thumbnail, markers, smooth map."""

from __future__ import annotations

import time

import numpy as np
import pytest
from viz.viz_helpers import blueness, grid_coords

from wsi_mil.viz.heatmap import (
    MARKER_GREEN,
    draw_attention_boxes,
    draw_marker_boxes,
    draw_smooth_heatmap,
    outline_alpha,
    outline_px,
    patch_boxes_thumb,
    rect_sum,
    scaled_attention,
    thumbnail_size,
    topk_strip,
)


def white(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, np.uint8)


def test_thumbnail_size_matches_slide_thumbnail_rule():
    assert thumbnail_size((4000, 2000), 1000) == (1000, 500)
    assert thumbnail_size((300, 200), 1000) == (300, 200)  # never upscaled
    assert thumbnail_size((1001, 3), 100) == (100, 1)


def test_rect_sum_equals_naive_loop():
    rng = np.random.default_rng(0)
    h, w = 23, 31
    x0 = rng.integers(0, w, 40)
    y0 = rng.integers(0, h, 40)
    boxes = np.stack(
        [
            x0,
            y0,
            np.minimum(x0 + rng.integers(1, 9, 40), w),
            np.minimum(y0 + rng.integers(1, 9, 40), h),
        ],
        1,
    )
    vals = rng.normal(size=40)
    want = np.zeros((h, w))
    for (a, b, c, d), v in zip(boxes, vals, strict=True):
        want[b:d, a:c] += v
    np.testing.assert_allclose(rect_sum((h, w), boxes, vals), want, atol=1e-12)


def test_outline_alpha_equals_sequential_over_compositing():
    rng = np.random.default_rng(1)
    h, w, t = 40, 50, 2
    x0 = rng.integers(0, 40, 15)
    y0 = rng.integers(0, 30, 15)
    boxes = np.stack([x0, y0, x0 + rng.integers(3, 10, 15), y0 + rng.integers(3, 10, 15)], 1)
    boxes[:, 2] = np.minimum(boxes[:, 2], w)
    boxes[:, 3] = np.minimum(boxes[:, 3], h)
    alphas = rng.uniform(0, 0.9, 15)
    keep = np.ones((h, w))  # 1 - accumulated alpha, layer by layer
    for (a, b, c, d), al in zip(boxes, alphas, strict=True):
        ring = np.zeros((h, w), bool)
        ring[b:d, a:c] = True
        ring[b + t : d - t, a + t : c - t] = False
        keep[ring] *= 1 - al
    np.testing.assert_allclose(outline_alpha((h, w), boxes, alphas, t), 1 - keep, atol=1e-9)


def test_grid_boxes_tile_the_thumbnail_without_gaps_or_overlaps():
    coords = grid_coords(1000, 700, 100)  # 10 x 7 patches
    for th, tw in [(70, 100), (137, 196), (333, 476)]:
        boxes, keep = patch_boxes_thumb(coords, 100, (1000, 700), (th, tw))
        assert len(keep) == len(coords)
        cover = rect_sum((th, tw), boxes, np.ones(len(boxes)))
        np.testing.assert_allclose(cover, 1.0, atol=1e-9)


def test_boxes_outside_are_dropped_and_edges_clipped():
    coords = np.array([[950, 0], [2000, 0], [-500, 0]])
    boxes, keep = patch_boxes_thumb(coords, 100, (1000, 1000), (100, 100))
    assert keep.tolist() == [0]
    assert boxes.tolist() == [[95, 0, 100, 10]]


def test_outline_thickness_is_bold_and_small_boxes_fill():
    assert outline_px(100) == 20
    assert outline_px(10) == 2
    assert outline_px(4) == 2 and outline_px(2) == 1 and outline_px(1) == 1


def test_box_is_drawn_at_the_right_place_on_a_white_thumbnail():
    # level 0 is 2000 x 1200, the thumbnail 500 x 300 (scale 1/4); one patch at (400, 200) side 200
    thumb = white(300, 500)
    out = draw_attention_boxes(
        thumb, np.array([[400, 200]]), np.array([1.0]), 200, (2000, 1200), max_alpha=0.8
    )
    # box in thumbnail px: x [100, 150), y [50, 100); outline 10 px
    b = blueness(out)
    assert b[50, 100] > 150 and b[99, 149] > 150 and b[55, 125] > 150  # corners, top edge
    assert tuple(out[50, 100]) == (51, 51, 255)  # 255 * (1 - 0.8) + blue * 0.8
    assert b[75, 125] == 0  # the centre of an outline box stays white
    assert b[49, 100] == 0 and b[50, 99] == 0 and b[100, 149] == 0 and b[99, 150] == 0
    changed = np.argwhere(b > 0)
    assert changed.min(0).tolist() == [50, 100] and changed.max(0).tolist() == [99, 149]


def test_opacity_is_monotone_in_attention_and_max_is_bluest():
    rng = np.random.default_rng(3)
    coords = grid_coords(1600, 1200, 100)  # 16 x 12 patches, 25 px boxes at 1/4 scale
    att = rng.dirichlet(np.ones(len(coords)))
    out = draw_attention_boxes(white(300, 400), coords, att, 100, (1600, 1200))
    b = blueness(out)
    # the top-left pixel of every box lies on its outline and on no other box
    at_corner = b[coords[:, 1] // 4, coords[:, 0] // 4]
    order = np.argsort(att)
    assert np.all(np.diff(at_corner[order]) >= 0)
    assert np.argmax(at_corner) == np.argmax(att)
    assert at_corner.max() == pytest.approx(255 * 0.85, abs=1)
    # the most attended box is the bluest region of the whole picture
    assert b.max() == at_corner.max()


def test_attention_is_scaled_to_the_slide_maximum():
    coords = np.array([[0, 0], [100, 0]])
    a = draw_attention_boxes(white(50, 100), coords, np.array([1e-6, 2e-6]), 100, (200, 100))
    c = draw_attention_boxes(white(50, 100), coords, np.array([0.25, 0.5]), 100, (200, 100))
    np.testing.assert_array_equal(a, c)
    assert tuple(a[0, 50]) == (38, 38, 255)  # max attention -> max_alpha 0.85


def test_colour_goes_through_the_slide_pixels():
    grey = np.full((100, 100, 3), 100, np.uint8)
    out = draw_attention_boxes(
        grey, np.array([[0, 0]]), np.array([1.0]), 100, (100, 100), max_alpha=0.5
    )
    assert tuple(out[0, 0]) == (50, 50, 178)


def test_markers_are_green_frames_around_the_box():
    out = draw_marker_boxes(
        white(100, 200), np.array([[400, 200, 600, 400]]), (2000, 1000), thickness_px=2
    )
    # thumbnail scale 1/10: marker spans x [40, 60), y [20, 40); frame 2 px outside it
    assert tuple(out[18, 38]) == MARKER_GREEN and tuple(out[41, 61]) == MARKER_GREEN
    assert tuple(out[30, 50]) == (255, 255, 255)  # marker itself is not covered
    assert tuple(out[20, 40]) == (255, 255, 255)
    assert tuple(out[10, 10]) == (255, 255, 255)


def test_smooth_heatmap_peaks_at_the_most_attended_patch():
    coords = grid_coords(1000, 1000, 100)
    att = np.full(len(coords), 0.01)
    hot = int(np.flatnonzero((coords[:, 0] == 600) & (coords[:, 1] == 300))[0])
    att[hot] = 1.0
    black = np.zeros((200, 200, 3), np.uint8)
    # a grey colour map on black: brightness is monotone in the smoothed attention
    grey = draw_smooth_heatmap(black, coords, att, 100, (1000, 1000), cmap="gray")[..., 0]
    y, x = np.unravel_index(np.argmax(grey), grey.shape)
    assert 120 <= x < 140 and 60 <= y < 80  # inside the hot patch (x 600..700, y 300..400) / 5
    assert grey[70, 130] > 4 * grey[170, 20]
    # default colour map (jet): red-ish at the hot patch, blue far away
    out = draw_smooth_heatmap(white(200, 200), coords, att, 100, (1000, 1000)).astype(int)
    assert out[70, 130, 0] > out[70, 130, 2]
    assert out[170, 20, 2] > out[170, 20, 0]


def test_smooth_heatmap_leaves_untiled_background_alone():
    out = draw_smooth_heatmap(
        white(100, 100), np.array([[0, 0]]), np.array([1.0]), 100, (1000, 1000)
    )
    assert tuple(out[90, 90]) == (255, 255, 255)
    assert tuple(out[5, 5]) != (255, 255, 255)


def test_topk_strip_layout():
    tiles = [np.zeros((50, 50, 3), np.uint8), np.full((64, 64, 3), 128, np.uint8)]
    img = topk_strip(tiles, ["#1 a=0.5\nx=0 y=0", "#2"], [True, False], tile_px=40, pad_px=4)
    assert img.shape == (40 + 8 + 30, 2 * 44 + 4, 3)
    assert tuple(img[4, 4]) == (0, 170, 0)  # green frame: on a marker
    assert tuple(img[4, 48]) == (200, 40, 40)  # red frame: off
    assert tuple(img[24, 24]) == (0, 0, 0)


def test_100k_patches_draw_in_bounded_time():
    coords = grid_coords(100_352, 50_176, 224)  # 448 x 224 = 100,352 patches
    att = np.random.default_rng(0).dirichlet(np.ones(len(coords)))
    thumb = white(1024, 2048)
    t = time.perf_counter()
    out = draw_attention_boxes(thumb, coords, att, 224, (100_352, 50_176))
    sm = draw_smooth_heatmap(thumb, coords, att, 224, (100_352, 50_176))
    dt = time.perf_counter() - t
    assert out.shape == sm.shape == thumb.shape
    assert blueness(out).max() > 200
    assert dt < 20, f"drawing 10^5 patches took {dt:.1f} s: not vectorised?"


def test_scales():
    a = np.array([2.0, 3.0, 4.0, 4.0])
    np.testing.assert_allclose(scaled_attention(a, "max"), [0.5, 0.75, 1, 1])
    np.testing.assert_allclose(scaled_attention(a, "minmax"), [0, 0.5, 1, 1])
    np.testing.assert_allclose(scaled_attention(a, "rank"), [0.25, 0.5, 0.875, 0.875])
    np.testing.assert_allclose(scaled_attention(np.full(3, 0.2), "minmax"), 1.0)
    with pytest.raises(ValueError, match="scale"):
        scaled_attention(a, "log")


def test_minmax_scale_shows_contrast_in_nearly_flat_attention():
    coords = np.array([[0, 0], [100, 0]])
    att = np.array([0.499, 0.501])
    flat = blueness(draw_attention_boxes(white(50, 100), coords, att, 100, (200, 100)))
    assert abs(flat[0, 0] - flat[0, 50]) < 2  # max-scaled: both nearly max_alpha
    mm = blueness(
        draw_attention_boxes(white(50, 100), coords, att, 100, (200, 100), scale="minmax")
    )
    assert mm[0, 0] == 0 and mm[0, 50] > 200
