"""Adversarial tests of the scatter fast path of ``iter_patch_chunks`` (native tiles decoded
once each and scattered into chunk buffers).

Reference: ``read_patches_from_slide`` (one ``read_region`` per patch) of the same slide and,
for lossless slides, crops of the source image. ``plan_scatter`` is checked as a pure function
by rebuilding patches from its pieces.
"""

from __future__ import annotations

import csv
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from slide_factory import make_ome_zarr, make_pyramidal_tiff, pyramid_levels, test_image

from wsi_mil.errors import SlideError
from wsi_mil.slides import PAD_VALUE, open_slide
from wsi_mil.tiling import PatchStore
from wsi_mil.tiling import read as read_mod
from wsi_mil.tiling.grid import grid_level_xy, level_to_level0_xy
from wsi_mil.tiling.read import iter_patch_chunks, plan_scatter, read_patches_from_slide

IMG_H, IMG_W = 203, 331  # no multiple of any tile size: edge tiles are partial
# OpenSlide slides: level sizes halve exactly (OpenSlide renders levels whose downsample is
# not an integer with sub-pixel shifts, see test_openslide_fractional_downsample)
EVEN_H, EVEN_W = 204, 332
N_LEVELS = 3


# ---------------------------------------------------------------- helpers
def _padded_crops(level_img: np.ndarray, xy: np.ndarray, patch: int) -> np.ndarray:
    """(N, patch, patch, 3) crops of ``level_img`` at level px ``xy``, white past its edges."""
    h, w = level_img.shape[:2]
    out = np.full((len(xy), patch, patch, 3), PAD_VALUE, np.uint8)
    for i, (x, y) in enumerate(np.asarray(xy, np.int64).reshape(-1, 2).tolist()):
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + patch, w), min(y + patch, h)
        if x1 > x0 and y1 > y0:
            out[i, y0 - y : y1 - y, x0 - x : x1 - x] = level_img[y0:y1, x0:x1]
    return out


def _check_plan(plan, xy, patch, lw, lh, tw, th, seed=0) -> None:
    """Rebuild every patch from the plan's pieces and compare with direct crops."""
    rng = np.random.default_rng(seed)
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    n = len(xy)
    n_across, n_down = -(-lw // tw), -(-lh // th)
    n_tiles = len(plan.tile_col)
    assert plan.tile_row.shape == (n_tiles,) and plan.start.shape == (n_tiles + 1,)
    n_pieces = len(plan.patch)
    assert plan.src.shape == (n_pieces, 4) and plan.dst.shape == (n_pieces, 2)
    assert plan.start[0] == 0 and plan.start[-1] == n_pieces
    assert (np.diff(plan.start) > 0).all(), "a listed tile has no piece"
    col, row = plan.tile_col.astype(np.int64), plan.tile_row.astype(np.int64)
    assert ((col >= 0) & (col < n_across) & (row >= 0) & (row < n_down)).all()
    assert (np.diff(row * n_across + col) > 0).all(), "tiles not row-major or not unique"
    level_img = rng.integers(0, 256, (lh, lw, 3), dtype=np.uint8)
    # stored tiles: the level plus random garbage past its edge (a piece must never take it)
    canvas = rng.integers(0, 256, (n_down * th, n_across * tw, 3), dtype=np.uint8)
    canvas[:lh, :lw] = level_img
    rebuilt = np.zeros((n, patch, patch, 3), np.uint8)
    cover = np.zeros((n, patch, patch), np.int32)
    for t in range(n_tiles):
        c, r = int(col[t]), int(row[t])
        tile = canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw]
        for m in range(int(plan.start[t]), int(plan.start[t + 1])):
            i = int(plan.patch[m])
            sy, sx, h, w = (int(v) for v in plan.src[m])
            dy, dx = (int(v) for v in plan.dst[m])
            assert 0 <= i < n
            assert h > 0 and w > 0, "empty piece"
            assert 0 <= sy and sy + h <= th and 0 <= sx and sx + w <= tw, "piece past its tile"
            assert 0 <= dy and dy + h <= patch and 0 <= dx and dx + w <= patch
            assert r * th + sy + h <= lh and c * tw + sx + w <= lw, "piece past the level"
            assert (c * tw + sx, r * th + sy) == (xy[i, 0] + dx, xy[i, 1] + dy), "misplaced"
            rebuilt[i, dy : dy + h, dx : dx + w] = tile[sy : sy + h, sx : sx + w]
            cover[i, dy : dy + h, dx : dx + w] += 1
    ar = np.arange(patch)
    for i in range(n):
        xs, ys = xy[i, 0] + ar, xy[i, 1] + ar
        in_level = ((ys >= 0) & (ys < lh))[:, None] & ((xs >= 0) & (xs < lw))[None, :]
        np.testing.assert_array_equal(cover[i], in_level.astype(np.int32), err_msg=f"patch {i}")
        assert bool(plan.inside[i]) == bool(in_level.all()), f"inside of patch {i}"
    rebuilt[cover == 0] = PAD_VALUE
    np.testing.assert_array_equal(rebuilt, _padded_crops(level_img, xy, patch))
    assert plan.inside.shape == (n,)


def _random_plan_case(rng: np.random.Generator) -> tuple:
    lw, lh = (int(v) for v in rng.integers(1, 300, 2))
    patch = int(rng.integers(1, 150))
    lo = max(1, patch // 8)  # bounds the pieces per patch (the checker loops in Python)
    tw, th = (int(v) for v in rng.integers(lo, lo + 200, 2))
    if rng.random() < 0.3:
        th = tw  # square tiles too
    n = int(rng.integers(0, 30))
    xs = rng.integers(-patch - 20, lw + 20, n)
    ys = rng.integers(-patch - 20, lh + 20, n)
    xy = np.stack([xs, ys], 1)
    if n > 3 and rng.random() < 0.5:
        xy[1] = xy[0]  # duplicate patch
    return xy, patch, lw, lh, tw, th


class Recycler:
    """``get_buffer`` that recycles a few chunk buffers, each handed out full of fresh random
    garbage: every byte of a patch must be written, and a chunk must never be written after
    it was yielded (its buffer is garbage-filled and handed out again)."""

    def __init__(self, chunk: int, patch: int, seed: int = 0) -> None:
        self.chunk, self.patch = chunk, patch
        self.rng = np.random.default_rng(seed)
        self.free: list[np.ndarray] = []
        self.lent: dict[int, np.ndarray] = {}
        self.handed: list[np.ndarray] = []  # every buffer ever handed out
        self.calls: list[int] = []

    def __call__(self, n: int) -> np.ndarray:
        assert 1 <= n <= self.chunk
        self.calls.append(n)
        if self.free:
            buf = self.free.pop()
        else:
            buf = np.empty((self.chunk, self.patch, self.patch, 3), np.uint8)
            self.handed.append(buf)
        buf[...] = self.rng.integers(0, 256, buf.shape, dtype=np.uint8)
        self.lent[buf.ctypes.data] = buf
        return buf[:n]

    def give_back(self, arr: np.ndarray) -> None:
        buf = self.lent.pop(arr.ctypes.data)  # the yielded array is the one handed out
        buf[...] = self.rng.integers(0, 256, buf.shape, dtype=np.uint8)
        self.free.append(buf)


def _collect(slide, level, xy, patch, chunk, pool, ahead=None, recycler=None) -> np.ndarray:
    """Run iter_patch_chunks to the end, checking order and shapes; returns all patches."""
    n = len(xy)
    got = []
    expect = 0
    for s, arr in iter_patch_chunks(slide, level, xy, patch, patch, chunk, pool, ahead, recycler):
        assert s == expect, "chunks out of order"
        m = min(chunk, n - s)
        assert arr.shape == (m, patch, patch, 3) and arr.dtype == np.uint8
        got.append(arr.copy())
        if recycler is not None:
            recycler.give_back(arr)  # refilled with garbage and reused for later chunks
        expect += m
    assert expect == n
    if recycler is not None:
        assert not recycler.lent, "a buffer from get_buffer was never yielded"
    if not got:
        return np.zeros((0, patch, patch, 3), np.uint8)
    return np.concatenate(got)


def _reference(slide, level, xy, patch) -> np.ndarray:
    l0 = level_to_level0_xy(xy, slide.level_downsamples[level])
    return read_patches_from_slide(slide, l0, level, patch, patch)


class ReadSpy:
    """Wraps a real slide's ``read_tiles`` (what tiling reads tiles with): counts tiles read
    and reads in progress, can slow each tile."""

    def __init__(self, slide, delay: float = 0.0) -> None:
        self.slide, self.orig, self.delay = slide, slide.read_tiles, delay
        self.lock = threading.Lock()
        self.active = self.calls = 0
        self.threads: set[int] = set()
        slide.read_tiles = self

    def __call__(self, level, cols_rows, out=None):
        for col, row in cols_rows:
            with self.lock:
                self.active += 1
                self.calls += 1
                self.threads.add(threading.get_ident())
            try:
                if self.delay:
                    time.sleep(self.delay)
                tile = next(self.orig(level, [(col, row)], out))
            finally:
                with self.lock:
                    self.active -= 1
            yield tile

    def remove(self) -> None:
        del self.slide.read_tiles  # the class's again


#: ImageDescription that makes OpenSlide read a TIFF as Aperio SVS
APERIO = "Aperio Image Library v10.0.0\n332x204 (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"


def _pyramid_tiff(
    path: Path,
    img: np.ndarray,
    tile_hw: tuple[int, int],
    compression: str,
    description: str | None = None,
) -> Path:
    """Tiled pyramidal TIFF (levels as IFDs: OpenSlide's generic-tiff, or Aperio with
    ``description``) with ``tile_hw`` = (tile_h, tile_w) tiles, possibly non-square."""
    import tifffile

    kw = {"compressionargs": {"level": 90}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(pyramid_levels(img, N_LEVELS)):
            tw.write(
                lv,
                tile=tile_hw,
                photometric="rgb",
                compression=compression,
                subfiletype=1 if i else 0,
                metadata=None,
                description=description if i == 0 else None,
                resolution=(2e4 / 2**i, 2e4 / 2**i),
                resolutionunit="CENTIMETER",
                **kw,
            )
    return path


def _rechunk_zarr(path: Path, tile_h: int, tile_w: int) -> Path:
    """Re-store every level of a cyx OME-Zarr in (3, tile_h, tile_w) chunks (not clipped to
    the level, so a coarse level's chunk can be larger than the level)."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    for name in sorted(root.array_keys()):
        a = root[name]
        data = a[...]
        kw = {}
        if root.metadata.zarr_format == 3:
            kw["dimension_names"] = a.metadata.dimension_names
        z = root.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(3, tile_h, tile_w),
            overwrite=True,
            **kw,
        )
        z[...] = data
    return path


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return test_image(IMG_H, IMG_W, seed=11)


@pytest.fixture(scope="module")
def even_image() -> np.ndarray:
    return test_image(EVEN_H, EVEN_W, seed=12)


#: name -> (writer, backend, lossless); writer(dir, img) -> path; OpenSlide slides are
#: written from the even-sized image
SLIDES = {
    "tiff-zlib-64": (lambda d, im: _pyramid_tiff(d / "a.tif", im, (64, 64), "zlib"), "tiff", True),
    "tiff-zlib-64x96": (
        lambda d, im: _pyramid_tiff(d / "b.tif", im, (64, 96), "zlib"),
        "tiff",
        True,
    ),
    "tiff-jpeg-128": (
        lambda d, im: make_pyramidal_tiff(d / "c.tif", im, N_LEVELS, 128, 0.5, "jpeg"),
        "tiff",
        False,
    ),
    "tiff-jpeg-80x144": (
        lambda d, im: _pyramid_tiff(d / "d.tif", im, (80, 144), "jpeg"),
        "tiff",
        False,
    ),
    "ome-subifd-160": (
        lambda d, im: make_pyramidal_tiff(
            d / "e.ome.tif", im, N_LEVELS, 160, 0.5, "zlib", ome=True
        ),
        "tiff",
        True,
    ),
    "zarr04-96": (
        lambda d, im: make_ome_zarr(d / "f.ome.zarr", im, N_LEVELS, 96, 0.5, "0.4"),
        "zarr",
        True,
    ),
    "zarr05-64x160": (
        lambda d, im: _rechunk_zarr(
            make_ome_zarr(d / "g.ome.zarr", im, N_LEVELS, 160, 0.5, "0.5"), 64, 160
        ),
        "zarr",
        True,
    ),
    "openslide-zlib-128x64": (
        lambda d, im: _pyramid_tiff(d / "h.tif", im, (128, 64), "zlib"),
        "openslide",
        True,
    ),
    "openslide-jpeg-64": (
        lambda d, im: make_pyramidal_tiff(d / "i.tif", im, N_LEVELS, 64, 0.5, "jpeg"),
        "openslide",
        False,
    ),
    "openslide-aperio-jpeg-96x64": (
        lambda d, im: _pyramid_tiff(d / "k.svs", im, (64, 96), "jpeg", APERIO),
        "openslide",
        False,
    ),
    "tiff-zlib-16": (lambda d, im: _pyramid_tiff(d / "j.tif", im, (16, 16), "zlib"), "tiff", True),
}


@pytest.fixture(scope="module")
def slide_paths(tmp_path_factory, image, even_image) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scatter_slides")
    return {
        name: writer(d, even_image if backend == "openslide" else image)
        for name, (writer, backend, _) in SLIDES.items()
    }


@pytest.fixture(scope="module")
def pools():
    with ThreadPoolExecutor(1) as p1, ThreadPoolExecutor(3) as p3:
        yield {1: p1, 3: p3}


# ---------------------------------------------------------------- plan_scatter (pure)
@pytest.mark.parametrize("seed", range(12))
def test_plan_scatter_rebuilds_patches(seed):
    rng = np.random.default_rng(seed)
    for k in range(25):
        xy, patch, lw, lh, tw, th = _random_plan_case(rng)
        plan = plan_scatter(xy, patch, lw, lh, tw, th)
        _check_plan(plan, xy, patch, lw, lh, tw, th, seed=k)


@pytest.mark.parametrize(
    ("xy", "patch", "lw", "lh", "tw", "th"),
    [
        pytest.param(np.zeros((0, 2), np.int64), 32, 100, 80, 64, 64, id="empty"),
        pytest.param([[0, 0]], 64, 64, 64, 64, 64, id="one-tile-exact"),
        pytest.param([[-64, 5], [100, 0], [0, 80], [-1000, -1000]], 64, 100, 80, 64, 32, id="out"),
        pytest.param([[-10, -10]], 300, 100, 80, 64, 16, id="patch-covers-level"),
        pytest.param([[3, 2], [3, 2], [50, 40]], 40, 100, 80, 256, 512, id="tile-gt-level"),
        pytest.param([[63, 63], [64, 64], [1, 1]], 2, 130, 130, 64, 64, id="2px-at-corners"),
        pytest.param([[99, 79]], 1, 100, 80, 7, 9, id="last-pixel"),
    ],
)
def test_plan_scatter_edge_cases(xy, patch, lw, lh, tw, th):
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    _check_plan(plan_scatter(xy, patch, lw, lh, tw, th), xy, patch, lw, lh, tw, th)


def _mutations():
    """Ways to break a correct plan; the checker must reject each."""

    def bump(a, m, col, d=1):
        a = a.copy()
        a[m, col] += d
        return a

    return {
        "src-y+1": lambda p, m: {"src": bump(p.src, m, 0)},
        "src-x-1": lambda p, m: {"src": bump(p.src, m, 1, -1)},
        "h-1": lambda p, m: {"src": bump(p.src, m, 2, -1)},
        "dst-x+1": lambda p, m: {"dst": bump(p.dst, m, 1)},
        "patch-swap": lambda p, m: {"patch": (p.patch + 1) % (p.patch.max() + 1)},
        "drop-piece": lambda p, m: {"start": np.r_[p.start[:-1], p.start[-1] - 1]},
        "inside-flip": lambda p, m: {"inside": ~p.inside},
        "tile-order": lambda p, m: {"tile_col": p.tile_col[::-1], "tile_row": p.tile_row[::-1]},
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_plan_checker_rejects_broken_plans(mutation):
    """The checker above is not vacuous: each small corruption of a good plan fails it."""
    import dataclasses

    xy = np.array([[-5, 3], [40, 17], [90, 60], [10, 10]])
    patch, lw, lh, tw, th = 48, 120, 90, 32, 24
    plan = plan_scatter(xy, patch, lw, lh, tw, th)
    _check_plan(plan, xy, patch, lw, lh, tw, th)
    m = len(plan.patch) // 2
    bad = dataclasses.replace(plan, **_mutations()[mutation](plan, m))
    with pytest.raises(AssertionError):
        _check_plan(bad, xy, patch, lw, lh, tw, th)


# ---------------------------------------------------------------- iter_patch_chunks
def _coords(kind: str, lw: int, lh: int, patch: int, stride: int, seed: int) -> np.ndarray:
    xy = grid_level_xy(lw, lh, stride)
    rng = np.random.default_rng(seed)
    if kind == "sorted":
        return xy
    if kind == "offset":  # tile-sized patches not aligned to the tiles
        return xy + np.array([patch // 3, 7])
    # shuffled, sparse like a tissue filter, plus strays: negative, past the edge, duplicates
    xy = xy[rng.random(len(xy)) < 0.6]
    extra = np.array([[-patch // 2, 3], [lw - 1, lh - 1], [lw + 5, 0], [-patch - 9, -2], [0, 0]])
    xy = np.concatenate([xy, extra, xy[:2]])
    return xy[rng.permutation(len(xy))]


#: (id, level, patch, stride, coordinate kind); patch "tile" = the level's tile width,
#: "big" = larger than the tile in both directions
GEOMETRIES = [
    ("l0-small-overlap", 0, 40, 29, "sorted"),
    ("l0-tile-aligned", 0, "tile", "tile", "sorted"),
    ("l0-tile-offset", 0, "tile", "tile", "offset"),
    ("l0-big-sparse", 0, "big", 53, "sparse"),
    ("l1-overlap-sparse", 1, 48, 31, "sparse"),
    ("l2-small", 2, 30, 20, "sorted"),
]
#: (chunk, workers, max_blocks_ahead, recycle buffers, TILES_PER_TASK), rotated over cases
RUNS = [
    (7, 3, None, True, 16),
    (1, 1, 1, True, 1),
    (64, 3, 1, False, 3),
    (7, 1, None, False, 2),
    (1, 3, None, True, 16),
    (64, 1, None, True, 1),
    (7, 3, 1, True, 5),
]
CASES = [
    pytest.param(name, g, RUNS[(si * len(GEOMETRIES) + gi) % len(RUNS)], id=f"{name}-{g[0]}-r{k}")
    for si, name in enumerate(SLIDES)
    for gi, g in enumerate(GEOMETRIES)
    for k in [(si * len(GEOMETRIES) + gi) % len(RUNS)]
]


def _check_iter(
    monkeypatch, slide, level, xy, patch, run, level_img=None, force_scatter=False
) -> None:
    chunk, workers, ahead, recycle, tiles_per_task = run
    monkeypatch.setattr(read_mod, "TILES_PER_TASK", tiles_per_task)
    if force_scatter:
        monkeypatch.setattr(read_mod, "MIN_SCATTER_TILE_PX", 1)
    scattered = []
    real = read_mod._iter_scatter

    def spy(*a, **k):
        scattered.append(True)
        return real(*a, **k)

    monkeypatch.setattr(read_mod, "_iter_scatter", spy)
    grid = slide.tile_grid(level)
    expect_scatter = min(grid.tile_w, grid.tile_h) >= read_mod.MIN_SCATTER_TILE_PX and len(xy)
    recycler = Recycler(chunk, patch, seed=len(xy)) if recycle else None
    with ThreadPoolExecutor(workers) as pool:
        got = _collect(slide, level, xy, patch, chunk, pool, ahead, recycler)
    assert bool(scattered) == bool(expect_scatter), "wrong path taken"
    ref = _reference(slide, level, xy, patch)
    np.testing.assert_array_equal(got, ref)
    if level_img is not None:  # lossless: also equal to the source image itself
        np.testing.assert_array_equal(got, _padded_crops(level_img, xy, patch))


@pytest.mark.parametrize(("name", "geometry", "run"), CASES)
def test_chunks_equal_reference(monkeypatch, slide_paths, image, even_image, name, geometry, run):
    _, backend, lossless = SLIDES[name]
    if backend == "openslide":
        image = even_image
    gid, level, patch, stride, kind = geometry
    with open_slide(slide_paths[name], backend=backend) as slide:
        grid = slide.tile_grid(level)
        assert grid is not None
        lw, lh = slide.level_dimensions[level]
        if patch == "tile":
            patch = grid.tile_w
        elif patch == "big":
            patch = max(grid.tile_w, grid.tile_h) + 37
        stride = patch if stride == "tile" else stride
        xy = _coords(kind, lw, lh, patch, stride, seed=len(gid))
        assert len(xy) > 0
        level_img = pyramid_levels(image, N_LEVELS)[level] if lossless else None
        if level_img is not None:
            assert level_img.shape[:2] == (lh, lw)
        _check_iter(monkeypatch, slide, level, xy, patch, run, level_img)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("ahead", [1, None])
@pytest.mark.parametrize("recycle", [True, False])
def test_run_parameters(monkeypatch, slide_paths, image, chunk, workers, ahead, recycle):
    """Every combination of chunk size, workers, read-ahead and buffer recycling."""
    with open_slide(slide_paths["tiff-zlib-64"], backend="tiff") as slide:
        xy = _coords("sparse", *slide.level_dimensions[0], 70, 23, seed=chunk)
        run = (chunk, workers, ahead, recycle, 4)
        _check_iter(monkeypatch, slide, 0, xy, 70, run, image)


@pytest.mark.parametrize("patch", [8, 16, 40])
def test_small_tiles_forced_through_scatter(monkeypatch, slide_paths, image, patch):
    """16 px tiles go through the block path by default; forced through scatter they must
    give the same pixels (many tiny pieces per patch, many tasks)."""
    with open_slide(slide_paths["tiff-zlib-16"], backend="tiff") as slide:
        xy = _coords("sparse", *slide.level_dimensions[0], patch, patch + 5, seed=patch)
        _check_iter(monkeypatch, slide, 0, xy, patch, (7, 3, None, True, 16), image, True)


@pytest.mark.parametrize(
    ("xy", "patch"),
    [
        pytest.param(np.zeros((0, 2), np.int64), 64, id="empty"),
        pytest.param([[5, 9]], 64, id="single"),
        pytest.param([[IMG_W - 10, IMG_H - 3]], 64, id="single-corner"),
        pytest.param([[-70, 0], [IMG_W, 3], [0, IMG_H + 100]], 64, id="all-outside"),
        pytest.param([[-30, -30], [-30, -30], [500, 500], [1, 1]], 300, id="patch>level"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 64])
def test_empty_single_and_outside(monkeypatch, slide_paths, image, xy, patch, chunk):
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    with open_slide(slide_paths["tiff-zlib-64"], backend="tiff") as slide:
        _check_iter(monkeypatch, slide, 0, xy, patch, (chunk, 3, None, True, 16), image)
        if len(xy) == 0:
            with ThreadPoolExecutor(1) as pool:
                assert list(iter_patch_chunks(slide, 0, xy, patch, patch, 4, pool)) == []


@pytest.mark.parametrize("names", [("tiff-zlib-64", "zarr04-96"), ("tiff-zlib-64",) * 2])
def test_interleaved_generators_share_a_pool(slide_paths, pools, names):
    """Two iterations consumed in lockstep on one pool (worker threads' decode scratch
    shared between them, tile sizes equal or not)."""
    slides = [open_slide(slide_paths[n], backend=SLIDES[n][1]) for n in names]
    try:
        xys = [
            _coords("sparse", *s.level_dimensions[0], 56, 37, seed=i) for i, s in enumerate(slides)
        ]
        recs = [Recycler(5, 56, seed=i) for i in range(2)]
        gens = [
            iter_patch_chunks(s, 0, xy, 56, 56, 5, pools[3], 1, r)
            for s, xy, r in zip(slides, xys, recs, strict=True)
        ]
        got: list[list[np.ndarray]] = [[], []]
        live = [True, True]
        while any(live):
            for k in range(2):
                if live[k]:
                    try:
                        _, arr = next(gens[k])
                    except StopIteration:
                        live[k] = False
                        continue
                    got[k].append(arr.copy())
                    recs[k].give_back(arr)
        for s, xy, g in zip(slides, xys, got, strict=True):
            np.testing.assert_array_equal(np.concatenate(g), _reference(s, 0, xy, 56))
    finally:
        for s in slides:
            s.close()


@pytest.mark.parametrize("xy_type", ["list", "int32", "float"])
def test_coordinate_types(slide_paths, pools, xy_type):
    with open_slide(slide_paths["tiff-zlib-64"], backend="tiff") as slide:
        xy = _coords("sparse", *slide.level_dimensions[0], 64, 45, seed=3)
        ref = _reference(slide, 0, xy, 64)
        given = {"list": xy.tolist(), "int32": xy.astype(np.int32), "float": xy.astype(float)}
        got = _collect(slide, 0, given[xy_type], 64, 7, pools[3])
        np.testing.assert_array_equal(got, ref)


class _FlipOneTile:
    """Wraps a real slide's read_tiles and changes one pixel of one tile."""

    def __init__(self, slide) -> None:
        self.orig = slide.read_tiles

    def __call__(self, level, cols_rows, out=None):
        cols_rows = list(cols_rows)
        for (col, row), tile in zip(cols_rows, self.orig(level, cols_rows, out), strict=True):
            if (col, row) == (1, 1):
                tile = tile.copy()
                tile[5, 7] ^= 0xFF
            yield tile


@pytest.mark.parametrize("breakage", ["tile-pixel", "pad-value"])
def test_iteration_checker_is_not_vacuous(monkeypatch, slide_paths, image, breakage):
    """_check_iter fails when the pixels are wrong (one pixel of one tile, the padding)."""
    with open_slide(slide_paths["tiff-zlib-64"], backend="tiff") as slide:
        xy = _coords("sparse", *slide.level_dimensions[0], 70, 23, seed=1)
        _check_iter(monkeypatch, slide, 0, xy, 70, (7, 3, None, True, 16), image)
        if breakage == "tile-pixel":
            slide.read_tiles = _FlipOneTile(slide)
        else:
            monkeypatch.setattr(read_mod, "PAD_VALUE", 254)
        with pytest.raises(AssertionError):
            _check_iter(monkeypatch, slide, 0, xy, 70, (7, 3, None, True, 16), image)


def test_openslide_fractional_downsample(tmp_path, image, pools):
    """OpenSlide renders levels whose downsample is not an integer at sub-pixel offsets, so
    tile-aligned windows would differ from per-patch read_region: such levels are read
    patch by patch (Slide.windows_exact), and still equal read_region."""
    path = _pyramid_tiff(tmp_path / "odd.tif", image, (64, 64), "zlib")  # 331 -> 165 px
    with open_slide(path, backend="openslide") as slide:
        assert slide.level_downsamples[1] != 2.0
        assert not slide.windows_exact(1) and slide.windows_exact(0)
        xy = grid_level_xy(*slide.level_dimensions[1], 40)
        got = _collect(slide, 1, xy, 48, 7, pools[3])
        np.testing.assert_array_equal(got, _reference(slide, 1, xy, 48))


#: other sample layouts (no in-place JPEG decode: read_tile's general path)
VARIANTS = {
    "tiff-planar": lambda d, im: make_pyramidal_tiff(
        d / "p.tif", im, N_LEVELS, 64, 0.5, "zlib", planar=True
    ),
    "tiff-alpha-ome": lambda d, im: make_pyramidal_tiff(
        d / "q.ome.tif", im, N_LEVELS, 96, 0.5, "zlib", ome=True, extra_alpha=True
    ),
    "tiff-gray": lambda d, im: make_pyramidal_tiff(d / "r.tif", im[..., 1], N_LEVELS, 64),
    "zarr-tczyx": lambda d, im: make_ome_zarr(
        d / "s.ome.zarr", im, N_LEVELS, 80, 0.5, "0.5", axes="tczyx"
    ),
    "zarr-yxc": lambda d, im: make_ome_zarr(d / "t.ome.zarr", im, N_LEVELS, 64, axes="yxc"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", [0, 1])
def test_sample_layouts(monkeypatch, tmp_path, image, variant, level):
    path = VARIANTS[variant](tmp_path, image)
    with open_slide(path) as slide:
        assert slide.tile_grid(level) is not None
        xy = _coords("sparse", *slide.level_dimensions[level], 64, 41, seed=level)
        _check_iter(monkeypatch, slide, level, xy, 64, (7, 3, None, True, 3))


def _replace_tile(path: Path, page_index: int, tile_index: int, data: bytes) -> Path:
    """Point tile ``tile_index`` of page ``page_index`` of a classic TIFF at ``data``
    (appended to the file); empty ``data``: a sparse (missing) tile."""
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tf:
        assert not tf.is_bigtiff
        page = tf.pages[page_index]
        at = [page.tags[k].valueoffset + 4 * tile_index for k in ("TileOffsets", "TileByteCounts")]
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, at[0], len(raw) if data else 0)
    struct.pack_into("<I", raw, at[1], len(data))
    path.write_bytes(bytes(raw + data))
    return path


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
@pytest.mark.parametrize("tile", ["sparse", "rgb-coded"])
def test_odd_jpeg_tiles(tmp_path, even_image, pools, backend, tile):
    """A missing tile (white) and a tile JPEG-coded as RGB in a YCbCr page: equal to
    read_region (the in-place decoder and the general decoder must agree)."""
    import imagecodecs

    path = make_pyramidal_tiff(tmp_path / "o.tif", even_image, N_LEVELS, 64, 0.5, "jpeg")
    # level 0: 6 x 4 tiles of 64 px; tile 8 = (col 2, row 1)
    data = b""
    if tile == "rgb-coded":
        data = imagecodecs.jpeg_encode(even_image[64:128, 128:192], level=90, colorspace="rgb")
    _replace_tile(path, 0, 8, data)
    with open_slide(path, backend=backend) as slide:
        xy = grid_level_xy(*slide.level_dimensions[0], 40)
        got = _collect(slide, 0, xy, 64, 7, pools[3], recycler=Recycler(7, 64))
        np.testing.assert_array_equal(got, _reference(slide, 0, xy, 64))
        if tile == "sparse":  # the missing tile is white
            assert (got[np.flatnonzero((xy == [120, 80]).all(1))[0], :8, 8:16] == PAD_VALUE).all()


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_jpeg_tile_of_the_wrong_size(tmp_path, even_image, pools, backend):
    """A tile whose JPEG is 48 px high in a 64 px grid: the in-place decoder refuses it and
    the general path reports a SlideError naming the file (both backends)."""
    import imagecodecs

    path = make_pyramidal_tiff(tmp_path / "w.tif", even_image, N_LEVELS, 64, 0.5, "jpeg")
    _replace_tile(path, 0, 8, imagecodecs.jpeg_encode(even_image[64:112, 128:192], level=90))
    with open_slide(path, backend=backend) as slide:
        xy = grid_level_xy(*slide.level_dimensions[0], 64)
        with pytest.raises(SlideError, match=str(path)):
            _collect(slide, 0, xy, 64, 7, pools[1])


@pytest.mark.parametrize("ahead", [1, None])
def test_open_buffers_bounded_for_row_major_coords(many_tiles_slide, pools, ahead):
    """Row-major coordinates (what tiling passes): chunk buffers open at once stay about
    two rows of patches plus the read-ahead, not the whole slide."""
    with open_slide(many_tiles_slide, backend="tiff") as slide:
        lw, lh = slide.level_dimensions[0]
        xy = grid_level_xy(lw, lh, 32)  # 24 patches per row, 576 in all
        rec = Recycler(8, 64)
        _collect(slide, 0, xy, 64, 8, pools[3], ahead, rec)
        per_row = -(-lw // 32)
        ahead_tiles = ahead or read_mod.AHEAD_TILES_PER_WORKER * 3
        tile_rows_ahead = -(-ahead_tiles // (lw // 64)) + 1
        patch_rows = (tile_rows_ahead + 1) * 2 + 2  # stride 32 = 2 patch rows per tile row
        bound = -(-patch_rows * per_row // 8) + 1
        assert len(rec.handed) <= bound, (len(rec.handed), bound)
        assert len(rec.handed) < len(xy) // 8


# ---------------------------------------------------------------- early close, errors
@pytest.fixture(scope="module")
def many_tiles_slide(tmp_path_factory) -> Path:
    """768 x 768 zlib TIFF in 64 px tiles: 144 level-0 tiles, so many tasks are in flight."""
    d = tmp_path_factory.mktemp("scatter_many")
    return _pyramid_tiff(d / "m.tif", test_image(768, 768, seed=4), (64, 64), "zlib")


@pytest.mark.parametrize("how", ["close", "break-close", "del"])
@pytest.mark.parametrize("workers", [1, 3])
def test_early_close_stops_all_tasks(monkeypatch, many_tiles_slide, how, workers):
    monkeypatch.setattr(read_mod, "TILES_PER_TASK", 4)
    with open_slide(many_tiles_slide, backend="tiff") as slide:
        xy = grid_level_xy(*slide.level_dimensions[0], 48)
        ref = _reference(slide, 0, xy, 64)
        spy = ReadSpy(slide, delay=0.002)
        rec = Recycler(3, 64)
        with ThreadPoolExecutor(workers) as pool:
            gen = iter_patch_chunks(slide, 0, xy, 64, 64, 3, pool, get_buffer=rec)
            if how == "break-close":
                for s, arr in gen:
                    first = (s, arr.copy())
                    break
                gen.close()
            else:
                s, arr = next(gen)
                first = (s, arr.copy())
                if how == "close":
                    gen.close()
                else:
                    del gen, arr  # the generator is closed when collected
            assert spy.active == 0, "a read task still runs after the generator closed"
            calls = spy.calls
            snap = [b.copy() for b in rec.handed]
            time.sleep(0.1)
            assert spy.calls == calls, "tiles still read after close"
            for b, before in zip(rec.handed, snap, strict=True):
                np.testing.assert_array_equal(b, before, err_msg="buffer written after close")
            assert calls < 144, "every tile was read: closed too late to test anything"
            np.testing.assert_array_equal(first[1], ref[:3])
            assert first[0] == 0
            # the pool is still usable, and a second full run is right
            assert pool.submit(lambda: 42).result() == 42
            spy.remove()
            np.testing.assert_array_equal(_collect(slide, 0, xy, 64, 7, pool), ref)


def test_get_buffer_failure_waits_for_tasks(monkeypatch, many_tiles_slide):
    """An exception from get_buffer (in the consuming thread) propagates, after every task
    that could still write into a handed-out buffer has stopped."""
    monkeypatch.setattr(read_mod, "TILES_PER_TASK", 2)
    with open_slide(many_tiles_slide, backend="tiff") as slide:
        xy = grid_level_xy(*slide.level_dimensions[0], 64)
        spy = ReadSpy(slide, delay=0.002)
        rec = Recycler(4, 64)

        def get_buffer(n):
            if len(rec.calls) == 5:
                raise MemoryError("no more buffers")
            return rec(n)

        with ThreadPoolExecutor(3) as pool:
            with pytest.raises(MemoryError):
                for _ in iter_patch_chunks(slide, 0, xy, 64, 64, 4, pool, get_buffer=get_buffer):
                    pass
            assert spy.active == 0
            calls = spy.calls
            time.sleep(0.05)
            assert spy.calls == calls
            assert pool.submit(lambda: 1).result() == 1


def _corrupt_tile(src: Path, dst: Path, page_index: int, tile_index: int) -> Path:
    """Copy of ``src`` with the bytes of one tile of one page overwritten (size kept)."""
    import tifffile

    with tifffile.TiffFile(src) as tf:
        page = tf.pages[page_index]
        off, cnt = int(page.dataoffsets[tile_index]), int(page.databytecounts[tile_index])
    data = bytearray(src.read_bytes())
    data[off : off + cnt] = bytes(cnt)  # no JPEG SOI marker: undecodable
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def jpeg_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(good, corrupt): 384 x 256 JPEG TIFF in 64 px tiles; the corrupt copy has level-1
    tile (1, 1) zeroed (level 0 intact, so a thumbnail read there still works)."""
    d = tmp_path_factory.mktemp("scatter_corrupt")
    good = make_pyramidal_tiff(d / "good.tif", test_image(256, 384, seed=9), 3, 64, 0.5, "jpeg")
    # level 1: 192 x 128 px -> 3 x 2 tiles; tile (col 1, row 1) = index 4
    return good, _corrupt_tile(good, d / "corrupt.tif", 1, 4)


#: a corrupt tile read through OpenSlide leaves the handle in OpenSlide's sticky error state,
#: so every later call fails too: each must still raise a SlideError naming the file
#: (was a raw OpenSlideError from tile_grid's property lookup; fixed by reading the tile
#: grids when the slide is opened)
CORRUPT_BACKENDS = ["tiff", "openslide"]


@pytest.mark.parametrize("backend", CORRUPT_BACKENDS)
@pytest.mark.parametrize("workers", [1, 3])
def test_corrupt_tile_raises_slide_error(monkeypatch, jpeg_pair, backend, workers):
    monkeypatch.setattr(read_mod, "TILES_PER_TASK", 1)
    good, corrupt = jpeg_pair
    with open_slide(good, backend=backend) as ok:
        xy = grid_level_xy(*ok.level_dimensions[1], 40)
        ref = _reference(ok, 1, xy, 64)
    with open_slide(corrupt, backend=backend) as slide:
        spy = ReadSpy(slide)
        got = []
        with ThreadPoolExecutor(workers) as pool:
            with pytest.raises(SlideError) as ei:
                for s, arr in iter_patch_chunks(slide, 1, xy, 64, 64, 2, pool):
                    got.append((s, arr.copy()))
            assert str(corrupt) in str(ei.value)
            assert spy.active == 0, "tasks still running after the error was raised"
            assert spy.threads and threading.get_ident() not in spy.threads  # read in the pool
            assert pool.submit(lambda: 1).result() == 1
    # the chunks yielded before the error are right
    for s, arr in got:
        np.testing.assert_array_equal(arr, ref[s : s + len(arr)])


def _pixel_reference(store_path: Path, slide_path: Path, backend: str) -> tuple:
    store = PatchStore.open(store_path)
    with open_slide(slide_path, backend=backend) as slide:
        ref = read_patches_from_slide(
            slide, store.coords, store.level, store.patch_size, store.patch_size_level
        )
    return store.pixels(0, len(store)), ref


@pytest.mark.parametrize("backend", CORRUPT_BACKENDS)
def test_cli_batch_with_corrupt_tile(tmp_path, cli, jpeg_pair, backend):
    """Real CLI: the slide with a corrupt tile fails (exit 1, failures.csv, no store), the
    good one is complete and equal to read_region."""
    good, corrupt = jpeg_pair
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path"])
        w.writerows([("bad", str(corrupt)), ("good", str(good))])
    work = tmp_path / "w"
    args = ["--tissue", "none", "--level", "1", "--patch-size", "64", "--stride", "40"]
    r = cli("tile", "--slides", str(table), "--work", str(work), "--backend", backend, *args)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    rows = list(csv.DictReader(open(work / "failures.csv")))
    assert [x["slide_id"] for x in rows] == ["bad"]
    assert str(corrupt) in rows[0]["reason"] and rows[0]["stage"] == "tile"
    assert not rows[0]["reason"].split(":")[0].endswith("Error"), rows[0]["reason"]
    patches = work / "patches"
    assert not (patches / "bad.zarr").exists()
    for tmp in patches.glob(".bad.zarr*"):
        with pytest.raises(Exception, match="incomplete|not|missing"):
            PatchStore.open(tmp)
    got, ref = _pixel_reference(patches / "good.zarr", good, backend)
    assert PatchStore.open(patches / "good.zarr").attrs["complete"] is True
    np.testing.assert_array_equal(got, ref)
