"""Tissue detection on thumbnails and per-patch tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest
from tiling.tiling_images import blank_image, tissue_slide_image

from wsi_mil.errors import ConfigError
from wsi_mil.tiling.tissue import (
    inside_fraction,
    otsu_threshold,
    patch_tissue_fraction,
    pen_colours,
    pen_mask,
    saturation,
    tissue_mask,
)


def test_saturation_values():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], np.uint8)
    np.testing.assert_array_equal(saturation(rgb)[0], [0, 255, 0, 128])


def test_otsu_splits_two_modes():
    v = np.concatenate([np.full(1000, 10), np.full(500, 200)]).astype(np.uint8)
    t = otsu_threshold(v)
    assert 10 < t <= 200
    assert otsu_threshold(np.full(100, 7, np.uint8)) == 8  # constant: all below threshold


def test_mask_finds_blobs_not_glass():
    img = tissue_slide_image(400, 600)
    m = tissue_mask(img, "otsu")
    truth = img.min(axis=2) < 230
    agree = (m == truth).mean()
    assert agree > 0.97, agree
    assert 0.1 < m.mean() < 0.4


def test_blank_glass_has_no_tissue():
    assert tissue_mask(blank_image(300, 300), "otsu").sum() == 0
    assert tissue_mask(np.full((64, 64, 3), 255, np.uint8), "otsu").sum() == 0


def test_tissue_none_is_all_foreground():
    assert tissue_mask(blank_image(50, 70), "none").all()
    with pytest.raises(ConfigError):
        tissue_mask(blank_image(50, 70), "magic")


def test_patch_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 60)) < 0.3
    scale = (4.0, 4.0)  # level-0 px per mask px
    xy = np.array([[0, 0], [8, 12], [200, 120], [236, 148], [-8, -8]], np.int64)
    patch = 16.0  # 4 mask px
    got = patch_tissue_fraction(mask, scale, xy, patch)
    for (x, y), g in zip(xy, got, strict=True):
        x0, y0 = int(x // 4), int(y // 4)
        full = np.zeros((4, 4))
        for dy in range(4):
            for dx in range(4):
                yy, xx = y0 + dy, x0 + dx
                if 0 <= yy < 40 and 0 <= xx < 60:
                    full[dy, dx] = mask[yy, xx]
        assert g == pytest.approx(full.mean())


def test_patch_fraction_counting_and_integral_image_agree():
    """Few patches are counted one by one, many through an integral image: same fractions."""
    from wsi_mil.tiling.tissue import DIRECT_COUNT_MAX_PATCHES

    rng = np.random.default_rng(1)
    mask = rng.random((64, 96)) < 0.4
    step = 3.0  # level-0 px; patches of 10 px overlap, the grid runs past every edge
    g = np.arange(-6, 300, step)
    xy = np.stack(np.meshgrid(g, g[:60]), -1).reshape(-1, 2)
    assert len(xy) > DIRECT_COUNT_MAX_PATCHES
    many = patch_tissue_fraction(mask, (3.0, 2.5), xy, 10.0)
    few = np.concatenate(
        [
            patch_tissue_fraction(mask, (3.0, 2.5), xy[i : i + 50], 10.0)
            for i in range(0, len(xy), 50)
        ]
    )
    np.testing.assert_array_equal(many, few)
    for (x, y), f in zip(xy[::97], many[::97], strict=True):  # brute force on a sample
        x0, y0 = int(np.floor(x / 3.0)), int(np.floor(y / 2.5))
        x1, y1 = int(np.ceil((x + 10) / 3.0 - 1e-9)), int(np.ceil((y + 10) / 2.5 - 1e-9))
        inside = mask[max(y0, 0) : max(min(y1, 64), 0), max(x0, 0) : max(min(x1, 96), 0)].sum()
        assert f == pytest.approx(inside / ((x1 - x0) * (y1 - y0)))


def test_patch_smaller_than_a_mask_pixel():
    mask = np.array([[True, False]])
    got = patch_tissue_fraction(mask, (100.0, 100.0), np.array([[10, 10], [150, 10]]), 20.0)
    np.testing.assert_array_equal(got, [1.0, 0.0])


def test_inside_fraction():
    f = inside_fraction(np.array([[0, 0], [90, 0], [90, 90], [100, 0]]), 20, 100, 100)
    np.testing.assert_allclose(f, [1.0, 0.5, 0.25, 0.0])


def test_fill_holes_equals_scipy() -> None:
    from scipy import ndimage as ndi

    from wsi_mil.tiling.tissue import fill_holes

    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 7), (7, 1), (2, 2), (40, 60), (97, 33)]
    for trial in range(120):
        h, w = shapes[trial % len(shapes)]
        m = ndi.uniform_filter(rng.random((h, w)), 3) > rng.uniform(0.2, 0.8)
        np.testing.assert_array_equal(fill_holes(m), ndi.binary_fill_holes(m), err_msg=str(trial))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a one-pixel hole
    assert fill_holes(ring)[4, 4] and not fill_holes(ring)[0, 0]
    assert fill_holes(np.ones((3, 3), bool)).all() and not fill_holes(np.zeros((3, 3), bool)).any()


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 21])
def test_square_filters_equal_scipy(k: int) -> None:
    from scipy import ndimage as ndi

    from wsi_mil.tiling.tissue import max_filter, mean_filter, min_filter

    rng = np.random.default_rng(k)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 3), (k - 1 or 1, k + 1), (64, 97), (257, 130)]
    for trial in range(3 * len(shapes)):
        h, w = shapes[trial % len(shapes)]
        kind = trial // len(shapes)
        if kind == 0:  # a binary mask, as the tissue pipeline filters
            x = (rng.random((h, w)) < rng.uniform(0.1, 0.9)).astype(np.uint8)
        elif kind == 1:  # noise over the whole range (rounding of the mean)
            x = rng.integers(0, 256, (h, w), dtype=np.uint8)
        else:  # smooth ramps with flat runs
            x = np.clip(np.cumsum(rng.integers(-3, 4, (h, w)), axis=1) + 128, 0, 255)
            x = x.astype(np.uint8)
        msg = f"shape {h}x{w}, kind {kind}"
        np.testing.assert_array_equal(
            max_filter(x, k), ndi.maximum_filter(x, k, mode="nearest"), msg
        )
        np.testing.assert_array_equal(
            min_filter(x, k), ndi.minimum_filter(x, k, mode="nearest"), msg
        )
        np.testing.assert_array_equal(
            mean_filter(x, k), ndi.uniform_filter(x, k, mode="nearest"), msg
        )


def test_mask_equals_the_scipy_pipeline() -> None:
    """tissue_mask with its own filters gives the mask scipy's filters gave (stores unchanged)."""
    from scipy import ndimage as ndi

    from wsi_mil.tiling.tissue import MIN_OBJECT_FRACTION, fill_holes, remove_small_objects

    def reference(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        sat = ndi.uniform_filter(saturation(rgb), size=5, mode="nearest")
        mask = (sat >= max(otsu_threshold(sat), 20)).astype(np.uint8)
        k = 2 * max(1, round(min(h, w) / 400)) + 1
        mask = ndi.minimum_filter(ndi.maximum_filter(mask, k, mode="nearest"), k, mode="nearest")
        mask = fill_holes(mask.astype(bool)).astype(np.uint8)
        mask = ndi.maximum_filter(ndi.minimum_filter(mask, 3, mode="nearest"), 3, mode="nearest")
        return remove_small_objects(mask.astype(bool), max(4, int(MIN_OBJECT_FRACTION * h * w)))

    for seed, (h, w) in enumerate([(300, 420), (1024, 800), (97, 61)]):
        rgb = tissue_slide_image(h, w, seed=seed)
        got = tissue_mask(rgb)
        assert 0 < got.mean() < 1, "the image should have tissue and glass"
        np.testing.assert_array_equal(got, reference(rgb))


def _blobs(h: int, w: int, centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), bool)
    for cy, cx in centres:
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return m


def _gray_rgb(level: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(level, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.mark.parametrize(
    ("background", "objects"),
    [(235, 150), (10, 90), (12, 27)],
    ids=["grey brightfield", "fluorescence", "dim fluorescence"],
)
def test_grey_images_find_objects_by_contrast_to_the_background(background, objects):
    """One-channel images have no saturation: the mask follows the contrast to the
    background, whichever side it is on (cell imaging, grey scans)."""
    rng = np.random.default_rng(background)
    h, w = 300, 400
    truth = _blobs(h, w, [(60, 80), (200, 300), (150, 180), (240, 60)], 25)
    level = np.where(truth, objects, background) + rng.normal(0, 3, (h, w))
    mask = tissue_mask(_gray_rgb(level))
    inter, union = (mask & truth).sum(), (mask | truth).sum()
    assert inter / union > 0.8, inter / union


@pytest.mark.parametrize("background", [8, 128, 242])
def test_blank_grey_field_has_no_foreground(background):
    rng = np.random.default_rng(background)
    level = background + rng.normal(0, 3, (200, 260))
    assert not tissue_mask(_gray_rgb(level)).any()


def _he_disc(h: int, w: int, radius: int, glass_sigma: float, seed: int = 0):
    """(rgb, truth): clean glass (238 +- sigma) with one pale pink disc, 15 % purple nuclei."""
    rng = np.random.default_rng(seed)
    truth = _blobs(h, w, [(h // 2, w // 2)], radius)
    img = np.clip(rng.normal(238, glass_sigma, (h, w, 3)), 0, 255)
    nuc = truth & (rng.random((h, w)) < 0.15)
    img[truth] = np.array([238, 190, 215.0]) + rng.normal(0, 4, (truth.sum(), 3))
    img[nuc] = np.array([150, 110, 190.0]) + rng.normal(0, 4, (nuc.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8), truth


def test_colour_images_still_use_saturation():
    from wsi_mil.tiling.tissue import MIN_SATURATION, foreground_score

    rgb = tissue_slide_image(200, 300)
    score, floor = foreground_score(rgb)
    assert floor == MIN_SATURATION
    np.testing.assert_array_equal(score, saturation(rgb))


@pytest.mark.parametrize("radius", [20, 30, 60])
def test_colour_slide_with_under_one_percent_tissue_keeps_saturation(radius):
    """A needle biopsy on clean glass (0.09-0.8 % tissue): still a colour image, and pale
    eosin (as bright as the glass, so no darker) is found."""
    from wsi_mil.tiling.tissue import MIN_SATURATION, foreground_score

    rgb, truth = _he_disc(1000, 1400, radius, glass_sigma=1.0)
    assert truth.mean() < 0.01
    assert foreground_score(rgb)[1] == MIN_SATURATION
    mask = tissue_mask(rgb)
    assert (mask & truth).sum() / truth.sum() > 0.95 and (mask & ~truth).sum() < truth.sum() / 10


@pytest.mark.parametrize("colour", [True, False], ids=["H&E", "grey brightfield"])
def test_black_fill_of_an_unscanned_area_is_not_tissue(colour):
    """Over half the thumbnail pure black (a scanner's fill), a strip of glass with tissue:
    still brightfield; neither the glass nor the fill is tissue."""
    rng = np.random.default_rng(1)
    h, w = 600, 800
    img = np.zeros((h, w, 3))
    scanned = np.zeros((h, w), bool)
    scanned[:, 450:] = True
    img[scanned] = rng.normal(238, 2, (scanned.sum(), 3))
    truth = _blobs(h, w, [(300, 620)], 80)
    tissue_rgb = [200, 120, 170.0] if colour else [150, 150, 150.0]
    img[truth] = np.array(tissue_rgb) + rng.normal(0, 4, (truth.sum(), 1 if not colour else 3))
    mask = tissue_mask(np.clip(img, 0, 255).astype(np.uint8))
    assert (mask & truth).sum() / truth.sum() > 0.95
    assert (mask & ~truth).sum() < 0.01 * truth.sum()


@pytest.mark.parametrize("background", [1, 3, 8])
def test_colour_fluorescence_on_a_near_black_field(background):
    """Nuclei in the blue channel over a near-black noisy field: saturation would call the
    whole field tissue ((2, 0, 1) is fully saturated); brightness above it does not."""
    rng = np.random.default_rng(background)
    h, w = 300, 400
    truth = _blobs(h, w, [(60, 80), (200, 300), (150, 180), (240, 60)], 25)
    img = np.clip(rng.normal(background, 1.5, (h, w, 3)), 0, 255)
    img[truth, 2] += 120
    img[truth, 1] += 40
    mask = tissue_mask(img.astype(np.uint8))
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def _nuclei_field(n_markers: int, n_nuclei: int = 60, dim_amp: int = 60, seed: int = 0):
    """Dark noisy field with dim nuclei (+``dim_amp`` grey levels) and ``n_markers`` much
    brighter large 'marker' cells (+230): (rgb, dim-nuclei truth, marker mask)."""
    rng = np.random.default_rng(seed)
    h, w = 400, 500
    centres = [tuple(c) for c in rng.integers(20, [h - 20, w - 20], (n_nuclei, 2))]
    dim = _blobs(h, w, centres, 5)
    level = 8 + rng.normal(0, 2, (h, w)) + dim_amp * dim
    spots = [tuple(c) for c in rng.integers(20, [h - 20, w - 20], (n_markers, 2))]
    markers = _blobs(h, w, spots, 14) if n_markers else np.zeros((h, w), bool)
    return _gray_rgb(level + 230 * markers), dim & ~markers, markers


@pytest.mark.parametrize("dim_amp", [60, 30])
def test_bright_marker_cells_do_not_drop_the_dim_ones(dim_amp):
    """The label's own signal (very bright cells, 0.9-6 % of the image) must not change
    which dim nuclei the mask keeps, or the bag size would give the label away."""
    recall = {}
    for n_markers in (0, 3, 10, 20):
        rgb, dim, markers = _nuclei_field(n_markers, dim_amp=dim_amp, seed=1)
        mask = tissue_mask(rgb)
        recall[n_markers] = (mask & dim).sum() / dim.sum()
        assert (mask & markers).sum() >= 0.95 * markers.sum()
    assert min(recall.values()) > 0.8 and max(recall.values()) - min(recall.values()) < 0.15, recall


def test_sparse_cells_under_one_percent_are_found():
    rgb, truth, _ = _nuclei_field(0, n_nuclei=12, seed=5)
    assert truth.mean() < 0.01
    mask = tissue_mask(rgb)
    assert (mask & truth).sum() / truth.sum() > 0.9 and (mask & ~truth).sum() < truth.sum()


def test_fill_holes_up_to_a_size() -> None:
    from wsi_mil.tiling.tissue import fill_holes

    m = np.ones((20, 30), bool)
    m[2:4, 2:4] = False  # a 4 px hole
    m[8:18, 5:25] = False  # a 200 px hole
    got = fill_holes(m, max_hole_px=50)
    assert got[2:4, 2:4].all() and not got[8:18, 5:25].any()
    np.testing.assert_array_equal(fill_holes(m, max_hole_px=201), fill_holes(m))


def test_field_enclosed_by_fluorescent_cells_stays_background():
    """A ring of touching bright cells around an empty dark field (a quarter of the image)
    must not turn that field into tissue, as hole filling does in brightfield; the dim
    middle of a ring-shaped cell is still filled."""
    rng = np.random.default_rng(3)
    h, w = 400, 400
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 200, xx - 200)
    network = (r > 110) & (r < 130)  # connected band of cells around an empty field
    cell = np.hypot(yy - 40, xx - 40)
    ring_cell = (cell > 3) & (cell < 12)  # a cell whose middle is dim
    level = 6 + rng.normal(0, 2, (h, w)) + 90 * (network | ring_cell)
    mask = tissue_mask(_gray_rgb(level))
    enclosed = r < 100
    assert (mask & enclosed).sum() < 0.01 * enclosed.sum()
    assert (mask & network).sum() > 0.95 * network.sum()
    assert mask[40, 40]  # the small hole is filled


def test_brightfield_tissue_keeps_its_large_holes_filled():
    """H&E: a lumen inside tissue is tissue (unchanged by the dark-background rule)."""
    rng = np.random.default_rng(4)
    h, w = 400, 400
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 200, xx - 200)
    tissue = (r > 60) & (r < 150)  # tissue with a large lumen
    img = np.full((h, w, 3), 235.0) + rng.normal(0, 2, (h, w, 3))
    img[tissue] = [200, 110, 170]
    mask = tissue_mask(np.clip(img, 0, 255).astype(np.uint8))
    assert mask[r < 50].all()


def _pen_strokes(h: int, w: int) -> dict[str, np.ndarray]:
    """Three marker-ink strokes (bands 12 px wide) crossing glass and tissue."""
    yy, xx = np.mgrid[0:h, 0:w]
    return {
        "green": np.abs(yy - 0.3 * h - 0.2 * xx) < 6,
        "blue": np.abs(xx - 0.5 * w - 0.3 * yy) < 6,
        "black": np.abs(yy - 0.85 * h + 0.1 * xx) < 6,
    }


INK = {"green": (60, 150, 80), "blue": (50, 70, 170), "black": (30, 30, 34)}


def test_exclude_pen_drops_marker_ink_and_keeps_the_tissue():
    """Green, blue and black ink over glass and tissue: by default the saturated green and
    blue strokes become tissue; with exclude_pen none of the ink does, while the tissue
    away from the strokes is kept as before."""
    h, w = 520, 712
    img = tissue_slide_image(h, w)
    base = tissue_mask(img)
    rng = np.random.default_rng(5)
    strokes = _pen_strokes(h, w)
    inked = img.copy()
    for name, band in strokes.items():
        noise = rng.integers(-6, 7, (band.sum(), 3))
        inked[band] = np.clip(np.array(INK[name]) + noise, 0, 255)
    ink = np.logical_or.reduce(list(strokes.values()))
    default = tissue_mask(inked)
    assert (default & strokes["green"] & ~base).sum() > 0.5 * (strokes["green"] & ~base).sum()
    assert (default & strokes["blue"] & ~base).sum() > 0.5 * (strokes["blue"] & ~base).sum()
    got = tissue_mask(inked, exclude_pen="all")
    assert not (got & ink).any()
    from scipy import ndimage as ndi

    away = base & ~ndi.binary_dilation(ink, iterations=15)
    assert (got & away).sum() >= 0.97 * away.sum()


def test_exclude_pen_leaves_he_and_dab_alone():
    """H&E (red and blue above green) and DAB brown (red above green above blue) never look
    like ink: the masks do not change."""
    rng = np.random.default_rng(2)
    he = tissue_slide_image(300, 400, seed=3)
    dab = tissue_slide_image(300, 400, seed=4)
    tissue = dab[..., 0] < 230
    brown = np.stack(
        [rng.integers(120, 190, (300, 400)), rng.integers(70, 120, (300, 400)),
         rng.integers(30, 80, (300, 400))], -1,
    ).astype(np.uint8)  # fmt: skip
    dab[tissue] = brown[tissue]
    for img in (he, dab):
        assert not pen_mask(img).any()
        np.testing.assert_array_equal(tissue_mask(img, exclude_pen="all"), tissue_mask(img))


def test_exclude_pen_does_not_touch_dark_background_images():
    """Fluorescence: a dark field is not black ink (the rule is for brightfield only)."""
    rgb, truth, _ = _nuclei_field(0, n_nuclei=30, seed=7)
    np.testing.assert_array_equal(tissue_mask(rgb, exclude_pen="all"), tissue_mask(rgb))


def test_ink_does_not_raise_the_threshold_over_pale_tissue():
    """Much saturated ink and pale tissue: counted in, the ink would pull Otsu's threshold
    above the tissue; it is taken out before the threshold."""
    rng = np.random.default_rng(8)
    h, w = 300, 400
    img = np.clip(rng.normal(240, 2, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = (xx - 100) ** 2 + (yy - 150) ** 2 < 70**2
    img[tissue] = np.clip(rng.normal((225, 195, 215), 3, (tissue.sum(), 3)), 0, 255)  # pale
    ink = xx > 250
    img[ink] = np.clip(rng.normal((40, 140, 70), 4, (ink.sum(), 3)), 0, 255)
    img = img.astype(np.uint8)
    got = tissue_mask(img, exclude_pen="green")
    assert (got & tissue).sum() > 0.95 * tissue.sum() and not (got & ink).any()


def test_ink_enclosed_by_tissue_is_not_filled_back_in():
    """Hole filling would turn ink that tissue surrounds back into tissue."""
    h, w = 300, 300
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - 150, xx - 150)
    rng = np.random.default_rng(9)
    ring = (r > 50) & (r < 110)
    img[ring] = rng.integers((150, 60, 140), (220, 120, 200), (ring.sum(), 3))
    ink = r < 40
    img[ink] = (60, 150, 80)
    assert tissue_mask(img)[ink].all()  # default: ink (and the hole) are tissue
    got = tissue_mask(img, exclude_pen="green")
    assert not got[ink].any() and got[ring & (r > 60)].mean() > 0.95


def test_pen_colours_and_what_is_not_ink():
    assert pen_colours("all") == ("green", "blue", "black")
    assert pen_colours("Black, green") == ("green", "black") and pen_colours(None) == ()
    with pytest.raises(ConfigError, match="red"):
        pen_colours("green,red")
    px = np.array(
        [[[0, 0, 0], [245, 245, 245], [150, 100, 60], [170, 110, 170], [120, 70, 150]]],
        np.uint8,
    )  # black fill, glass, DAB, H&E, dense haematoxylin
    assert not pen_mask(px).any()
    ink = np.array([[[60, 150, 80], [70, 110, 110], [50, 70, 170], [40, 50, 60]]], np.uint8)
    np.testing.assert_array_equal(pen_mask(ink, ("green",)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(pen_mask(ink, ("blue",)), [[0, 0, 1, 0]])
    np.testing.assert_array_equal(pen_mask(ink, ("black",)), [[0, 0, 0, 1]])


def test_exclude_pen_leaves_grey_brightfield_alone():
    """Grey images (no colour): dark tissue is not black ink."""
    rng = np.random.default_rng(10)
    level = 235 + rng.normal(0, 2, (300, 400))
    tissue = _blobs(300, 400, [(150, 120), (100, 300)], 50)
    level[tissue] = 40 + rng.normal(0, 5, tissue.sum())
    rgb = _gray_rgb(level)
    np.testing.assert_array_equal(tissue_mask(rgb, exclude_pen="all"), tissue_mask(rgb))
    assert (tissue_mask(rgb) & tissue).sum() > 0.95 * tissue.sum()
