"""extract_slides / extract_store: equality across sources, batch sizes and workers; skip logic; errors.

Tolerance: features agree to atol 1e-5 (float32, eval mode, CPU). Different batch sizes pick
different convolution kernels, so results differ in the last bits (~2e-6 seen) only.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr
from slide_factory import make_pyramidal_tiff, test_image

from wsi_mil.batch import file_fingerprint
from wsi_mil.config import ExtractConfig
from wsi_mil.errors import ConfigError
from wsi_mil.features import (
    PatchBatchLoader,
    create_encoder,
    default_features_dir,
    extract_slides,
    extract_store,
    open_features,
    prepare_model,
)
from wsi_mil.slides import SlideEntry, open_slide
from wsi_mil.tiling.patch_store import PatchStore, PatchStoreWriter
from wsi_mil.tiling.read import read_patches_from_slide

ATOL = 1e-5


def _model(dim=32):
    return prepare_model(create_encoder(feature_dim=dim, seed=0), "cpu")


def _feats(store_path, tmp_path, name, **kw):
    out = extract_store(PatchStore.open(store_path), _model(), tmp_path / f"{name}.h5", **kw)
    return open_features(out)


@pytest.mark.parametrize("level", [0, 1])
def test_pixel_store_equals_straight_from_slide(tmp_path, fx, level):
    slide_path = make_pyramidal_tiff(
        tmp_path / "s.tiff",
        test_image(384, 512, seed=1),
        n_levels=2,
        tile_px=128,
        compression="zlib",
    )
    slide = open_slide(slide_path)
    ds = slide.level_downsamples[level]
    patch_px = 48
    step0 = int(patch_px * ds)
    coords = fx.grid_coords(int(512 // step0), int(384 // step0), step0)
    attrs = fx.store_attrs(
        patch_px, slide.dimensions, level=level, downsample=ds, slide_path=str(slide_path)
    )
    pix = read_patches_from_slide(slide, coords, level, patch_px, patch_px)
    with PatchStoreWriter(tmp_path / "pix.zarr", coords, attrs, chunk_patches=8) as w:
        w.write_pixels(0, pix)
        w.commit()
    with PatchStoreWriter(tmp_path / "coords.zarr", coords, attrs, pixels=False) as w:
        w.commit()
    assert not PatchStore.open(tmp_path / "coords.zarr").has_pixels
    a = _feats(tmp_path / "pix.zarr", tmp_path, "a", batch_size=16, workers=1)
    b = _feats(
        tmp_path / "coords.zarr",
        tmp_path,
        "b",
        batch_size=16,
        workers=2,
        slide_opener=lambda: open_slide(slide_path),
    )
    assert len(a) == len(coords) > 10
    np.testing.assert_allclose(a.features, b.features, atol=ATOL, rtol=0)
    assert np.array_equal(a.coords, coords) and np.array_equal(b.coords, coords)


def test_same_features_for_any_batch_size_and_workers(tmp_path, fx):
    store = fx.write_random_store(tmp_path / "r.zarr", n=29, patch_px=32, chunk_patches=8)
    ref = _feats(store, tmp_path, "ref", batch_size=29, workers=0).features
    for bs, workers in [(1, 0), (7, 1), (8, 3), (64, 2)]:
        got = _feats(store, tmp_path, f"b{bs}w{workers}", batch_size=bs, workers=workers).features
        np.testing.assert_allclose(
            got, ref, atol=ATOL, rtol=0, err_msg=f"batch {bs} workers {workers}"
        )


def test_loader_rebatches_in_order(tmp_path, fx):
    path = fx.write_random_store(tmp_path / "r.zarr", n=29, patch_px=8, chunk_patches=4)
    store = PatchStore.open(path)
    full = store.pixels(0, 29)
    for bs, workers in [(5, 0), (5, 2), (4, 1), (30, 3)]:
        batches = list(PatchBatchLoader(store, bs, workers))
        assert [s for s, _ in batches] == list(range(0, 29, bs))
        assert all(len(b) == bs for _, b in batches[:-1])
        assert np.array_equal(np.concatenate([b.numpy() for _, b in batches]), full)


def test_extract_slides_outputs_skip_and_stale(tmp_path, fx):
    work = tmp_path / "W"
    for i, sid in enumerate(["a", "b"]):
        fx.write_random_store(work / "patches" / f"{sid}.zarr", n=12 + i, patch_px=32, seed=i)
    cfg = ExtractConfig(work=work, feature_dim=16, batch_size=5)
    entries = [SlideEntry("a", None), SlideEntry("b", None)]
    res = extract_slides(cfg, entries, progress=False)
    assert res.exit_code == 0 and sorted(res.done) == ["a", "b"]
    out = default_features_dir(work, cfg)
    assert out.parent == work / "features" and out.name.startswith("resnet-patch-cnn-d16-")
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["encoder"]["tag"] == out.name and meta["config"]["feature_dim"] == 16
    assert (out / "config.yaml").is_file()
    with h5py.File(out / "a.h5", "r") as f:
        for k in (
            "encoder",
            "encoder_weights_sha256",
            "level0_width",
            "level0_height",
            "mpp",
            "downsample",
            "wsi_mil_version",
            "patch_size_level0",
            "slide_path",
            "source_store",
            "source_digest",
        ):
            assert k in f.attrs, k
        assert f.attrs["encoder_tag"] == out.name and f["features"].shape == (12, 16)
    # second run: everything current
    res = extract_slides(cfg, entries, progress=False)
    assert sorted(res.skipped) == ["a", "b"] and not res.done
    # a re-tiled (changed) patch store is extracted again; the other stays
    fx.write_random_store(work / "patches" / "a.zarr", n=9, patch_px=32, seed=5)
    res = extract_slides(cfg, entries, progress=False)
    assert res.done == ["a"] and res.skipped == ["b"]
    assert len(open_features(out / "a.h5")) == 9
    # float16 output is a different product: re-extracted
    res = extract_slides(
        ExtractConfig(work=work, feature_dim=16, dtype="float16"), entries, progress=False
    )
    assert sorted(res.done) == ["a", "b"]
    with h5py.File(out / "b.h5", "r") as f:
        assert f["features"].dtype == np.float16
    # shards are disjoint and cover everything
    res0 = extract_slides(cfg, entries, shard=(0, 2), progress=False)
    res1 = extract_slides(cfg, entries, shard=(1, 2), progress=False)
    assert sorted(res0.done + res1.done) == ["a", "b"] and len(res0.done) == len(res1.done) == 1


def test_new_weights_or_dim_give_a_new_folder(tmp_path, fx):
    import torch

    work = tmp_path / "W"
    fx.write_random_store(work / "patches" / "a.zarr", n=6, patch_px=32)
    c1 = ExtractConfig(work=work, feature_dim=16)
    enc = create_encoder(feature_dim=16, seed=9)
    torch.save(
        {
            "encoder": "resnet-patch-cnn",
            "kwargs": {"feature_dim": 16, "norm": "bn"},
            "state_dict": enc.state_dict(),
        },
        tmp_path / "encoder.pt",
    )
    c2 = ExtractConfig(work=work, weights=tmp_path / "encoder.pt")
    c3 = ExtractConfig(work=work, feature_dim=8)
    dirs = {default_features_dir(work, c) for c in (c1, c2, c3)}
    assert len(dirs) == 3
    for c in (c1, c2, c3):
        assert extract_slides(c, [SlideEntry("a", None)], progress=False).done == ["a"]
    bag = open_features(default_features_dir(work, c2) / "a.h5")
    import hashlib

    assert (
        bag.attrs["encoder_weights_sha256"]
        == hashlib.sha256((tmp_path / "encoder.pt").read_bytes()).hexdigest()
    )
    assert bag.attrs["encoder_trained"] is True or bag.attrs["encoder_trained"] == 1


def test_foreign_tag_and_dim_mismatch_are_clear_errors(tmp_path, fx):
    work = tmp_path / "W"
    fx.write_random_store(work / "patches" / "a.zarr", n=6, patch_px=32)
    fx.write_random_store(work / "patches" / "b.zarr", n=6, patch_px=32)
    cfg = ExtractConfig(work=work, feature_dim=16)
    entries = [SlideEntry("a", None), SlideEntry("b", None)]
    assert extract_slides(cfg, entries, progress=False).exit_code == 0
    out = default_features_dir(work, cfg)
    with h5py.File(out / "a.h5", "r+") as f:
        f.attrs["encoder_tag"] = "some-other-encoder-d16-00000000"
    with h5py.File(out / "b.h5", "r+") as f:
        del f["features"]
        f["features"] = np.zeros((6, 99), np.float32)
    res = extract_slides(cfg, entries, progress=False)
    assert res.exit_code == 1
    assert "some-other-encoder" in res.failed["a"] and out.name in res.failed["a"]
    assert "feature dim 99" in res.failed["b"]
    failures = (work / "failures.csv").read_text()
    assert "extract,a," in failures and "extract,b," in failures
    # --overwrite replaces a store with the wrong dim
    res = extract_slides(
        ExtractConfig(work=work, feature_dim=16, overwrite=True),
        [SlideEntry("b", None)],
        progress=False,
    )
    assert res.done == ["b"] and open_features(out / "b.h5").dim == 16
    # a --features folder that belongs to another encoder is refused up front
    with pytest.raises(ConfigError, match="holds features of encoder"):
        extract_slides(
            ExtractConfig(work=work, feature_dim=8, features=out), entries, progress=False
        )


def test_bad_patch_stores(tmp_path, fx):
    work = tmp_path / "W"
    fx.write_random_store(work / "patches" / "ok.zarr", n=6, patch_px=32)
    fx.write_random_store(work / "patches" / "empty.zarr", n=0, patch_px=32)
    fx.write_random_store(work / "patches" / "incomplete.zarr", n=6, patch_px=32)
    zarr.open_group(str(work / "patches" / "incomplete.zarr"), mode="r+").attrs["complete"] = False
    fx.write_random_store(work / "patches" / "damaged.zarr", n=6, patch_px=32)
    chunk = next(
        p
        for p in (work / "patches" / "damaged.zarr" / "pixels").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(b"\x00garbage" * 10)
    with PatchStoreWriter(
        work / "patches" / "noslide.zarr",
        fx.grid_coords(2, 1, 32),
        fx.store_attrs(32, (64, 32)),
        pixels=False,
    ) as w:
        w.commit()
    ids = ["ok", "empty", "incomplete", "damaged", "missing", "noslide"]
    res = extract_slides(
        ExtractConfig(work=work, feature_dim=16), [SlideEntry(i, None) for i in ids], progress=False
    )
    assert res.done == ["empty", "ok"] or sorted(res.done) == ["empty", "ok"]
    assert "no patches" in res.warnings["empty"]
    assert "incomplete" in res.failed["incomplete"]
    assert "damaged.zarr/pixels/c.0.0.0.0: damaged chunk" in res.failed["damaged"]
    assert "not found" in res.failed["missing"] and "wsi-mil tile" in res.failed["missing"]
    assert "no pixels and no slide path" in res.failed["noslide"]
    out = default_features_dir(work, ExtractConfig(work=work, feature_dim=16))
    assert open_features(out / "empty.h5").features.shape == (0, 16)
    assert not (out / "damaged.h5").exists() and not list(out.glob(".damaged.h5.tmp-*"))


def test_wrong_slide_for_coords_only_store(tmp_path, fx):
    slide_path = make_pyramidal_tiff(
        tmp_path / "s.tiff", test_image(128, 128), n_levels=1, tile_px=64
    )
    work = tmp_path / "W"
    with PatchStoreWriter(
        work / "patches" / "s.zarr",
        fx.grid_coords(2, 2, 32),
        fx.store_attrs(32, (999, 999)),
        pixels=False,
    ) as w:
        w.commit()
    res = extract_slides(
        ExtractConfig(work=work, feature_dim=16), [SlideEntry("s", slide_path)], progress=False
    )
    assert "not the slide" in res.failed["s"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        extract_slides(ExtractConfig(work=tmp_path, dtype="int8"), [], progress=False)
    with pytest.raises(ConfigError, match="batch-size"):
        extract_slides(ExtractConfig(work=tmp_path, batch_size=0), [], progress=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            extract_slides(ExtractConfig(work=tmp_path, device="cuda"), [], progress=False)


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu_to_bf16_precision(tmp_path, fx):
    """On CUDA (bf16 autocast, channels_last, pinned host batches) extract_store gives the CPU
    float32 features to bf16 precision, in the same order."""
    store = fx.write_random_store(tmp_path / "r.zarr", n=70, patch_px=64, chunk_patches=16)
    ref = _feats(store, tmp_path, "cpu", batch_size=32, workers=1)
    model = prepare_model(create_encoder(feature_dim=32, seed=0), "cuda")
    out = extract_store(
        PatchStore.open(store), model, tmp_path / "cuda.h5", batch_size=32, workers=2, device="cuda"
    )
    got = open_features(out)
    assert np.array_equal(got.coords, ref.coords)
    err = np.linalg.norm(got.features - ref.features) / np.linalg.norm(ref.features)
    assert err < 2e-2, f"relative error {err:.3g}"


def test_same_size_image_swapped_in_for_a_coords_only_store_fails(tmp_path, fx):
    """Another image of the same pixel size at the tiled slide's path (a swapped table row, a
    re-scan) is caught by the recorded file size; a copy of the right file is fine."""
    slide_path = make_pyramidal_tiff(
        tmp_path / "s.tiff", test_image(128, 128, seed=1), n_levels=1, tile_px=64
    )
    other = make_pyramidal_tiff(
        tmp_path / "o.tiff", test_image(128, 128, seed=9), n_levels=1, tile_px=64
    )
    assert other.stat().st_size != slide_path.stat().st_size
    work = tmp_path / "W"
    attrs = {**fx.store_attrs(32, (128, 128)), "slide_path": str(slide_path)}
    attrs["slide_fingerprint"] = file_fingerprint(slide_path)
    with PatchStoreWriter(
        work / "patches" / "s.zarr", fx.grid_coords(2, 2, 32), attrs, pixels=False
    ) as w:
        w.commit()
    cfg = ExtractConfig(work=work, feature_dim=16)
    res = extract_slides(cfg, [SlideEntry("s", other)], progress=False)
    assert "o.tiff is not the slide s.zarr was tiled from" in res.failed["s"]
    copy = tmp_path / "copy" / "s.tiff"  # staged copy: same size, new mtime
    copy.parent.mkdir()
    copy.write_bytes(slide_path.read_bytes())
    res = extract_slides(cfg, [SlideEntry("s", copy)], progress=False)
    assert res.done == ["s"], res.summary()
