"""Pixel chunk writing: every compression, aligned or not, O_DIRECT or buffered, reads back exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_mil.config import TileConfig
from wsi_mil.slides import SlideEntry, open_slide
from wsi_mil.tiling import PatchStore, tile_slides
from wsi_mil.tiling.patch_store import (
    COMPRESSIONS,
    IO_ALIGN,
    aligned_empty,
    pixel_compressors,
    write_new_file,
)
from wsi_mil.tiling.read import read_patches_from_slide


# patch 32: a 64-patch chunk is a whole number of 4 KiB pages; 36: it is not (copied to an
# aligned buffer for O_DIRECT). 391 / 300 patches: several write groups and a short last chunk.
@pytest.mark.parametrize("patch", [32, 36])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_reads_back_equal_to_read_region(
    tmp_path, backend_slides, compression, patch
):
    path, backend = backend_slides["tiff-ome"]
    cfg = TileConfig(
        work=tmp_path / "w",
        tissue="none",
        backend=backend,
        workers=2,
        patch_size=patch,
        compression=compression,
    )
    res = tile_slides(cfg, [SlideEntry("s", path)], progress=False)
    assert res.exit_code == 0, res.summary()
    store = PatchStore.open(tmp_path / "w" / "patches" / "s.zarr")
    assert len(store) % 64 and len(store) > 256
    with open_slide(path, backend=backend) as slide:
        ref = read_patches_from_slide(slide, store.coords, 0, patch, patch)
    np.testing.assert_array_equal(store.pixels(0, len(store)), ref)
    # plain zarr (the contract), not only PatchStore, decodes the chunk files we wrote
    arr = zarr.open_group(str(store.path), mode="r")["pixels"]
    assert arr.chunks == (64, patch, patch, 3)
    want = [type(c).__name__ for c in pixel_compressors(compression)]
    assert [type(c).__name__ for c in arr.compressors] == want
    np.testing.assert_array_equal(arr[len(store) - 5 :], ref[-5:])


def _payload(n: int, seed: int = 0) -> np.ndarray:
    data = aligned_empty((n,))
    data[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    return data


@pytest.mark.parametrize("n", [100, IO_ALIGN, 3 * IO_ALIGN + 17])
def test_write_new_file_aligned_and_tail(tmp_path, n):
    data = _payload(n)
    assert data.ctypes.data % IO_ALIGN == 0
    p = tmp_path / "f"
    p.write_bytes(b"x" * (n + 999))  # an older, longer file is replaced, not patched
    write_new_file(p, data)
    assert p.read_bytes() == data.tobytes()


def test_write_new_file_unaligned_buffer_and_tmpfs(tmp_path):
    data = _payload(5 * IO_ALIGN + 1)
    write_new_file(tmp_path / "u", data[1:])  # not page-aligned: written buffered
    assert (tmp_path / "u").read_bytes() == data[1:].tobytes()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # tmpfs may refuse O_DIRECT: fallback
        p = shm / f"wsi_mil_test_{os.getpid()}"
        try:
            write_new_file(p, data)
            assert p.read_bytes() == data.tobytes()
        finally:
            p.unlink(missing_ok=True)


def test_aligned_chunks_request_o_direct(tmp_path, monkeypatch):
    """Page-aligned data is written with O_DIRECT (when available), the tail buffered."""
    from wsi_mil.tiling import patch_store

    if not patch_store.DIRECT_IO:
        pytest.skip("no O_DIRECT on this platform (or WSI_MIL_DIRECT_IO=0)")
    flags: list[int] = []
    real_open = os.open

    def spy(path, fl, *a):
        flags.append(fl)
        return real_open(path, fl, *a)

    monkeypatch.setattr(patch_store.os, "open", spy)
    data = _payload(2 * IO_ALIGN + 5)
    write_new_file(tmp_path / "d", data)
    assert flags and flags[0] & os.O_DIRECT
    assert (tmp_path / "d").read_bytes() == data.tobytes()
    flags.clear()
    write_new_file(tmp_path / "b", data[1:])  # unaligned: plain buffered open
    assert flags and not flags[0] & os.O_DIRECT


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("full_size", [False, True])
def test_short_last_chunk_files_equal_zarrs_own(tmp_path, compression, full_size):
    """The last chunk, given short or full size (padded with the fill value, as tiling hands
    it over), is stored byte for byte as zarr itself stores it."""
    from wsi_mil.tiling.patch_store import PatchStoreWriter

    n, p = 70, 8  # two chunks of 64: the second holds 6 patches
    px = np.random.default_rng(1).integers(0, 256, (n, p, p, 3), dtype=np.uint8)
    coords = np.stack([np.arange(n) * p, np.zeros(n, np.int64)], 1)
    attrs = {"patch_size": p}
    with PatchStoreWriter(
        tmp_path / "ours.zarr", coords, attrs, chunk_patches=64, compressors=compression
    ) as w:
        w.write_chunk_async(0, px[:64]).result()
        last = px[64:]
        if full_size:
            last = np.full((64, p, p, 3), w.fill_value, np.uint8)
            last[: n - 64] = px[64:]
        w.write_chunk_async(64, last).result()
        w.commit()
    ref = zarr.create_array(
        str(tmp_path / "ref.zarr"),
        shape=px.shape,
        chunks=(64, p, p, 3),
        dtype="uint8",
        fill_value=255,
        compressors=pixel_compressors(compression),
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    ref[:] = px
    for i in (0, 1):
        ours = (tmp_path / "ours.zarr" / "pixels" / f"c.{i}.0.0.0").read_bytes()
        assert ours == (tmp_path / "ref.zarr" / f"c.{i}.0.0.0").read_bytes()
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "ours.zarr"))["pixels"][:], px)


@pytest.mark.parametrize("n_patches", [1, 8, 10])
def test_a_store_smaller_than_one_chunk_has_one_chunk_file(tmp_path, n_patches):
    """Fewer patches than CHUNK_PATCHES: one chunk of n_patches rows, one file (the padded
    last-chunk buffer must not spill into chunk files past the end)."""
    from slide_factory import make_pyramidal_tiff, test_image

    img = test_image(32, 32 * n_patches, seed=n_patches)
    path = make_pyramidal_tiff(tmp_path / "s.tiff", img, 1, 16, compression="jpeg")
    for compression in ("none", "zstd"):
        work = tmp_path / compression
        cfg = TileConfig(
            work=work, tissue="none", patch_size=32, workers=2, compression=compression
        )
        assert tile_slides(cfg, [SlideEntry("s", path)], progress=False).exit_code == 0
        store = PatchStore.open(work / "patches" / "s.zarr")
        assert len(store) == n_patches
        assert sorted(p.name for p in (store.path / "pixels").iterdir()) == [
            "c.0.0.0.0",
            "zarr.json",
        ]
        with open_slide(path) as slide:
            want = read_patches_from_slide(slide, store.coords, 0, 32, 32)
        np.testing.assert_array_equal(store.pixels(0, n_patches), want)


def test_write_chunk_async_refuses_rows_that_are_not_one_chunk(tmp_path):
    from wsi_mil.tiling.patch_store import PatchStoreWriter

    px = np.zeros((70, 8, 8, 3), np.uint8)
    coords = np.zeros((70, 2), np.int64)
    with PatchStoreWriter(tmp_path / "s.zarr", coords, {"patch_size": 8}) as w:
        for start, rows in ((0, 10), (5, 64), (64, 7), (128, 6), (64, 63)):
            with pytest.raises(ValueError, match="not one chunk"):
                w.write_chunk_async(start, px[:rows])
        w.write_chunk_async(64, px[:6]).result()  # the short last chunk, as it is
