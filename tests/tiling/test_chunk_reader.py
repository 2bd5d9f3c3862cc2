"""ChunkFileReader (PatchStore.pixels' direct path) reads what zarr reads, or steps aside."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_mil.errors import StoreError
from wsi_mil.tiling.patch_store import (
    COMPRESSIONS,
    ChunkFileReader,
    PatchStore,
    PatchStoreWriter,
    pixel_compressors,
)

P = 12
N = 70  # chunks of 16: four whole chunks and a short last one
ATTRS = {"level": 0, "downsample": 1.0, "patch_size": P, "level0_width": N * P,
         "level0_height": P, "slide_path": ""}  # fmt: skip
RANGES = [(0, N), (0, 16), (16, 48), (3, 5), (5, 37), (60, 70), (64, 70), (69, 70), (7, 7)]


def pixels(seed: int = 0) -> np.ndarray:
    """(N, P, P, 3) uint8: smooth ramps plus noise, so every codec has something to do."""
    rng = np.random.default_rng(seed)
    ramp = np.arange(N * P * P * 3, dtype=np.int64).reshape(N, P, P, 3) % 97
    return (ramp + rng.integers(0, 8, ramp.shape)).astype(np.uint8)


def write_ours(path: Path, compression: str, px: np.ndarray) -> PatchStore:
    coords = np.stack([np.arange(N) * P, np.zeros(N, np.int64)], 1)
    with PatchStoreWriter(path, coords, ATTRS, chunk_patches=16, compressors=compression) as w:
        w.write_pixels(0, px)
        w.commit()
    return PatchStore.open(path)


def write_with_zarr(path: Path, px: np.ndarray, **array_kw) -> PatchStore:
    """A complete store whose ``pixels`` zarr itself wrote, with ``array_kw`` layout options."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("coords", data=np.stack([np.arange(N) * P, np.zeros(N, np.int64)], 1))
    a = g.create_array("pixels", shape=px.shape, dtype="uint8", fill_value=255, **array_kw)
    a[:] = px
    g.attrs.update({**ATTRS, "complete": True})
    return PatchStore.open(path)


def zarr_read(store: PatchStore, a: int, b: int) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store.path), mode="r")["pixels"][a:b])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_our_stores_read_directly_equal_to_zarr(tmp_path, compression):
    px = pixels()
    store = write_ours(tmp_path / "s.zarr", compression, px)
    reader = ChunkFileReader.for_array(store.path / "pixels")
    assert reader is not None and reader.codec == {"lz4": "blosc"}.get(compression, compression)
    for a, b in RANGES:
        got = store.pixels(a, b)
        assert got.shape == (b - a, P, P, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, px[a:b], err_msg=f"{a}:{b}")
        np.testing.assert_array_equal(got, zarr_read(store, a, b))
    # threads share one reader
    with ThreadPoolExecutor(4) as ex:
        parts = list(ex.map(lambda s: store.pixels(s, s + 10), range(0, N, 10)))
    np.testing.assert_array_equal(np.concatenate(parts), px)


@pytest.mark.parametrize("separator", ["/", "."])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_stores_zarr_wrote_read_directly(tmp_path, compression, separator):
    """Either chunk-key separator, chunks zarr encoded itself (also of older wsi-mil stores)."""
    px = pixels(1)
    store = write_with_zarr(
        tmp_path / "z.zarr",
        px,
        chunks=(16, P, P, 3),
        compressors=pixel_compressors(compression),
        chunk_key_encoding={"name": "default", "separator": separator},
    )
    assert ChunkFileReader.for_array(store.path / "pixels") is not None
    for a, b in RANGES:
        np.testing.assert_array_equal(store.pixels(a, b), px[a:b], err_msg=f"{a}:{b}")


def test_missing_chunk_holds_the_fill_value(tmp_path):
    px = pixels()
    px[16:32] = 255  # zarr skips writing a chunk that is all fill value
    store = write_with_zarr(tmp_path / "f.zarr", px, chunks=(16, P, P, 3))
    reader = ChunkFileReader.for_array(store.path / "pixels")
    assert not reader.chunk_path(1).exists() and reader.chunk_path(0).exists()
    np.testing.assert_array_equal(store.pixels(10, 40), px[10:40])


@pytest.mark.parametrize(
    "layout",
    [
        {"chunks": (16, P, P, 3), "compressors": [zarr.codecs.GzipCodec()]},  # another codec
        {"chunks": (16, P // 2, P, 3)},  # chunks that split patches
        {"chunks": (16, P, P, 3), "shards": (32, P, P, 3)},  # sharded
    ],
)
def test_other_layouts_go_through_zarr(tmp_path, layout):
    px = pixels(2)
    store = write_with_zarr(tmp_path / "o.zarr", px, **layout)
    assert ChunkFileReader.for_array(store.path / "pixels") is None
    np.testing.assert_array_equal(store.pixels(5, 50), px[5:50])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_damaged_chunk_is_a_store_error_naming_the_file(tmp_path, compression):
    store = write_ours(tmp_path / "d.zarr", compression, pixels())
    chunk = store.path / "pixels" / "c.1.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"c\.1\.0\.0\.0: damaged chunk"):
        store.pixels(0, 40)
    np.testing.assert_array_equal(store.pixels(0, 16), pixels()[:16])  # other chunks still read


def test_unreadable_chunk_is_a_store_error_and_empty_ranges_read_nothing(tmp_path):
    store = write_ours(tmp_path / "u.zarr", "zstd", pixels())
    chunk = store.path / "pixels" / "c.0.0.0.0"
    chunk.write_bytes(b"garbage")
    assert store.pixels(5, 5).shape == (0, P, P, 3)  # chunk 0 is not read for nothing
    chunk.unlink()
    chunk.mkdir()  # not a file at all
    with pytest.raises(StoreError, match=r"c\.0\.0\.0\.0: damaged chunk"):
        store.pixels(0, 3)
