"""Stored pixels equal read_region of the same coordinates, on every backend, edge patches included."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tiling.tiling_images import BACKEND_CASES, MPP

from wsi_mil.config import TileConfig
from wsi_mil.slides import PAD_VALUE, SlideEntry, open_slide
from wsi_mil.tiling import PatchStore, tile_slides
from wsi_mil.tiling.read import iter_patch_chunks, read_patches_from_slide

# (level, mpp, patch, stride): level 0 with edges; level 1 overlapping; mpp between levels (resize)
GEOMETRIES = [
    pytest.param(None, None, 96, None, id="level0"),
    pytest.param(1, None, 64, 48, id="level1-overlap"),
    pytest.param(None, 0.75, 64, None, id="mpp-resize"),
]


def _tile(tmp_path, path, backend, **kw):
    cfg = TileConfig(work=tmp_path / "w", tissue="none", backend=backend, workers=2, **kw)
    res = tile_slides(cfg, [SlideEntry("s", path)], progress=False)
    assert res.exit_code == 0 and res.done == ["s"], res.summary()
    return PatchStore.open(tmp_path / "w" / "patches" / "s.zarr")


CASES = [
    pytest.param(case, *g.values, id=f"{case}-{g.id}")
    for case in BACKEND_CASES
    for g in GEOMETRIES
    if not (case == "image-png" and g.values[0] is not None)  # a PNG has one level
]


@pytest.mark.parametrize(("case", "level", "mpp", "patch", "stride"), CASES)
def test_store_pixels_equal_read_region(tmp_path, backend_slides, case, level, mpp, patch, stride):
    path, backend = backend_slides[case]
    store = _tile(
        tmp_path,
        path,
        backend,
        patch_size=patch,
        stride=stride,
        level=level,
        mpp=mpp,
        slide_mpp=MPP if case == "image-png" else None,
    )
    with open_slide(path, backend=backend, mpp=MPP) as slide:
        w0, h0 = slide.dimensions
        ref = read_patches_from_slide(
            slide, store.coords, store.level, store.patch_size, store.patch_size_level
        )
    got = store.pixels(0, len(store))
    assert got.shape == (len(store), patch, patch, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    # edge patches are kept (and padded white past the image)
    c = store.coords
    assert (c[:, 0] + store.patch_size_level0).max() >= w0
    assert (c[:, 1] + store.patch_size_level0).max() >= h0
    last = got[-1]
    assert (last == PAD_VALUE).all(axis=-1).any()  # bottom-right patch has padding
    assert store.attrs["level"] == store.level and store.attrs["complete"] is True
    if mpp is not None:
        assert store.patch_size_level != store.patch_size  # really resized
        assert store.downsample == pytest.approx(store.patch_size_level / patch)


def test_store_pixels_equal_source_image(tmp_path, backend_slides, tiling_image):
    """Independent of read_region: level-0 patches are crops of the source image."""
    path, backend = backend_slides["tiff-ome"]
    store = _tile(tmp_path, path, backend, patch_size=100)
    h, w = tiling_image.shape[:2]
    padded = np.full((h + 100, w + 100, 3), PAD_VALUE, np.uint8)
    padded[:h, :w] = tiling_image
    px = store.pixels(0, len(store))
    for i, (x, y) in enumerate(store.coords):
        np.testing.assert_array_equal(px[i], padded[y : y + 100, x : x + 100])
    assert len(store) == 6 * 8  # ceil(520/100) x ceil(712/100): right/bottom strips kept


@pytest.mark.parametrize("case", ["openslide", "tiff-ome", "zarr-0.5"])
@pytest.mark.parametrize("patch", [72, 40], ids=["same-size", "resized"])
def test_each_native_tile_read_once(backend_slides, case, patch):
    """Every native tile is decoded once, even with overlapping patches; also when the
    patches are read at another size and resized (the block path)."""
    path, backend = backend_slides[case]
    with open_slide(path, backend=backend) as slide:
        grid = slide.tile_grid(0)
        assert grid is not None
        tiles: list[tuple[int, int]] = []  # native tiles inside the image that were decoded
        w0, h0 = slide.dimensions
        orig_region, orig_tile, orig_tiles = (
            slide.read_level_region,
            slide.read_tile,
            slide.read_tiles,
        )

        in_tile = threading.local()  # the default read_tile(s) read their tile's window

        def spy_region(level, lx, ly, w, h):
            if getattr(in_tile, "on", False):
                return orig_region(level, lx, ly, w, h)
            assert lx % grid.tile_w == 0 and ly % grid.tile_h == 0
            assert w % grid.tile_w == 0 and h % grid.tile_h == 0
            for ty in range(ly, ly + h, grid.tile_h):
                for tx in range(lx, lx + w, grid.tile_w):
                    if tx < w0 and ty < h0:
                        tiles.append((tx, ty))
            return orig_region(level, lx, ly, w, h)

        def spy_tile(level, col, row, out=None):
            if getattr(in_tile, "on", False):  # called by the default read_tiles
                return orig_tile(level, col, row, out)
            tiles.append((col * grid.tile_w, row * grid.tile_h))
            in_tile.on = True
            try:
                return orig_tile(level, col, row, out)
            finally:
                in_tile.on = False

        def spy_tiles(level, cols_rows, out=None):
            cols_rows = list(cols_rows)
            tiles.extend((c * grid.tile_w, r * grid.tile_h) for c, r in cols_rows)
            in_tile.on = True
            try:
                yield from orig_tiles(level, cols_rows, out)
            finally:
                in_tile.on = False

        slide.read_level_region, slide.read_tile = spy_region, spy_tile
        slide.read_tiles = spy_tiles
        from wsi_mil.tiling.grid import grid_level_xy

        xy = grid_level_xy(*slide.dimensions, 40)  # patch 72, stride 40: heavy overlap
        with ThreadPoolExecutor(2) as pool:
            chunks = list(iter_patch_chunks(slide, 0, xy, 72, patch, 16, pool))
        slide.read_level_region, slide.read_tile = orig_region, orig_tile
        slide.read_tiles = orig_tiles
        got = np.concatenate([a for _, a in chunks])
        np.testing.assert_array_equal(got, read_patches_from_slide(slide, xy, 0, patch, 72))
    assert len(tiles) == len(set(tiles)), "a native tile was decoded twice"
    assert len(set(tiles)) == -(-w0 // grid.tile_w) * -(-h0 // grid.tile_h)


def test_lazy_slices_and_norm_coords(tmp_path, backend_slides):
    path, backend = backend_slides["tiff-ome"]
    store = _tile(tmp_path, path, backend, patch_size=128)
    n = len(store)
    assert store.pixels(3, 7).shape == (4, 128, 128, 3)
    np.testing.assert_array_equal(store.read_patches(3, 7), store.pixels(3, 7))
    nc = store.norm_coords
    assert nc.dtype == np.float32 and nc.shape == (n, 2)
    assert (nc >= 0).all() and (nc < 1).all()
    assert store.tissue is not None and store.tissue.shape == (n,)
    assert store.tissue.max() == 1.0 and store.tissue.min() < 1.0  # edge patches partly outside


@pytest.mark.parametrize("colour", ["ycbcr", "rgb"])
def test_jpeg_tiles_decoded_into_the_buffer(tmp_path, colour):
    """JPEG-tiled TIFFs: tiles are decoded straight into the caller's buffer, and the stored
    pixels equal OpenSlide's read_region (edge tiles, overlap and padding included)."""
    import tifffile
    from slide_factory import test_image

    img = test_image(600, 712, seed=5)
    path = tmp_path / f"{colour}.tif"
    args = {"level": 90}
    if colour == "rgb":  # RGB-coded JPEG without JFIF marker, as Aperio writes
        args["outcolorspace"] = "rgb"
    tifffile.imwrite(
        path, img, tile=(128, 128), photometric="rgb", compression="jpeg", compressionargs=args
    )
    with open_slide(path, backend="tiff") as slide:
        assert slide._levels[0].jpeg is not None  # the fast path applies
        buf = np.zeros((128, 128, 3), np.uint8)
        for col, row in [(0, 0), (5, 4)]:  # (5, 4): the corner tile, partly past the edge
            tile = slide.read_tile(0, col, row, out=buf)
            assert tile is buf
            h, w = min(128, 600 - 128 * row), min(128, 712 - 128 * col)
            np.testing.assert_array_equal(
                tile[:h, :w], slide.read_level_region(0, 128 * col, 128 * row, w, h)
            )
    store = _tile(tmp_path, path, "tiff", patch_size=100, stride=90)
    with open_slide(path, backend="openslide") as ref:
        want = read_patches_from_slide(ref, store.coords, 0, 100, 100)
    np.testing.assert_array_equal(store.pixels(0, len(store)), want)
    assert (want[-1] == PAD_VALUE).all(axis=-1).any()  # the last patch is padded


@pytest.mark.parametrize("case", ["openslide", "tiff-ome", "zarr-0.4"])
@pytest.mark.parametrize("subchunk_patches", [1, 4, 16])
def test_resized_patches_from_subchunks(monkeypatch, backend_slides, case, subchunk_patches):
    """Patches read larger and resized (--mpp between levels) are scattered into level-
    resolution sub-chunks and resized in the pool: every byte of the recycled (garbage-
    filled) output buffers is written, chunks come in order, pixels equal read_region."""
    import wsi_mil.tiling.read as read_mod

    path, backend = backend_slides[case]
    p_level, p_out, chunk = 50, 32, 16
    monkeypatch.setattr(read_mod, "RESIZE_SUBCHUNK_BYTES", subchunk_patches * 3 * p_level**2)
    pool_bufs = [np.full((chunk, p_out, p_out, 3), 77, np.uint8) for _ in range(64)]

    def get_buffer(n):
        buf = pool_bufs.pop()
        buf.fill(77)
        return buf[:n]

    with open_slide(path, backend=backend) as slide:
        from wsi_mil.tiling.grid import grid_level_xy

        xy = grid_level_xy(*slide.level_dimensions[0], 37)  # overlapping, edge patches
        with ThreadPoolExecutor(2) as pool:
            chunks = list(
                iter_patch_chunks(slide, 0, xy, p_level, p_out, chunk, pool, get_buffer=get_buffer)
            )
            assert [s for s, _ in chunks] == list(range(0, len(xy), chunk))
            got = np.concatenate([a for _, a in chunks])
            # closing the generator early leaves the pool usable
            gen = iter_patch_chunks(slide, 0, xy, p_level, p_out, chunk, pool)
            next(gen)
            gen.close()
            assert pool.submit(lambda: 1).result() == 1
        np.testing.assert_array_equal(got, read_patches_from_slide(slide, xy, 0, p_out, p_level))


def test_large_patches_get_fewer_patches_per_chunk(tmp_path, backend_slides):
    """Chunks stay under CHUNK_BYTES: 64 patches of 12,000 px would be a 27 GB chunk (and
    buffer); the pixels are the same as read_region's."""
    from wsi_mil.tiling.tile import CHUNK_PATCHES, chunk_patches

    assert chunk_patches(224) == chunk_patches(295) == CHUNK_PATCHES  # stores as before
    assert (chunk_patches(296), chunk_patches(1024), chunk_patches(12_000)) == (63, 5, 1)
    path, backend = backend_slides["tiff-ome"]
    store = _tile(tmp_path, path, backend, patch_size=600, stride=100)
    assert len(store) == 48 and store.attrs["params"]["chunk_patches"] == CHUNK_PATCHES  # digest
    assert len(list((store.path / "pixels").glob("c.*"))) == 4  # 48 patches in chunks of 15
    with open_slide(path, backend=backend) as slide:
        ref = read_patches_from_slide(slide, store.coords, 0, 600, 600)
    np.testing.assert_array_equal(store.pixels(0, len(store)), ref)
