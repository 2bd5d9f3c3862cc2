"""Heatmaps of 12-bit camera data in uint16 files tiled with ``--significant-bits 12``:
the background is read with the bits tiling used (it was nearly black), through the real
stages tile -> extract -> train -> predict -> heatmap (Python API)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_mil.config import ExtractConfig, HeatmapConfig, PredictConfig, TileConfig, TrainConfig
from wsi_mil.features.extract import extract_slides
from wsi_mil.slides import SlideEntry
from wsi_mil.tiling import PatchStore, tile_slides
from wsi_mil.train import train
from wsi_mil.train.predict import predict_slides, tiling_significant_bits
from wsi_mil.viz import make_heatmaps

W, H, PS = 320, 256, 64


def _twelve_bit_brightfield(seed: int) -> np.ndarray:
    """(H, W) uint16 grey brightfield in 12 bits (0..4095): bright glass ~3600, darker
    tissue ~1800 with darker nuclei; the file does not say how many bits are significant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    img = 3600 + rng.normal(0, 40, (H, W))
    img[(yy - H / 2) ** 2 / (0.4 * H) ** 2 + (xx - W / 2) ** 2 / (0.4 * W) ** 2 <= 1] = 1800
    for cy, cx in rng.integers(20, [H - 20, W - 20], (10, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 6**2] -= 1000
    return np.clip(img, 0, 4095).astype(np.uint16)


def _grey(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("L"), np.float64)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Four 12-bit slides tiled with --significant-bits 12, features, a 1-epoch cached run
    and its predictions."""
    import torch

    d = tmp_path_factory.mktemp("bits12")
    entries = []
    for i in range(4):
        p = d / "slides" / f"s{i}.ome.tif"
        p.parent.mkdir(exist_ok=True)
        tifffile.imwrite(
            p, _twelve_bit_brightfield(i), ome=True, tile=(128, 128), metadata={"axes": "YX"}
        )
        entries.append(SlideEntry(f"s{i}", p, i % 2, None))
    work, run = d / "w", d / "run"
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tile = TileConfig(work=work, patch_size=PS, tissue="none", significant_bits=12, workers=1)
        assert not tile_slides(tile, entries, progress=False).failed
        ext = ExtractConfig(work=work, device="cpu", workers=1, batch_size=32)
        assert not extract_slides(ext, entries, progress=False).failed
        train(
            TrainConfig(
                work=work, run=run, epochs=1, device="cpu", val_frac=0.0, early_stop="none"
            ),
            entries,
            progress=False,
        )
        out = predict_slides(
            PredictConfig(work=work, run=run, device="cpu"), entries, progress=False
        )
    finally:
        torch.set_num_threads(n_threads)
    assert len(out.batch.done) == 4
    return d, entries


def test_heatmap_background_uses_the_bits_tiling_used(pipeline, monkeypatch):
    d, entries = pipeline
    run = d / "run"  # not a copy: the attention files record the checkpoint's path
    att = run / "attention" / "s0.h5"
    with h5py.File(att, "r") as f:  # predict found the bits in the patch store
        assert int(f.attrs["significant_bits"]) == 12
    assert PatchStore.open(d / "w" / "patches" / "s0.zarr").attrs["significant_bits"] == 12
    (feats,) = (d / "w" / "features").glob("*/s0.h5")
    with h5py.File(feats, "r") as f:  # extract carries them on too
        assert int(f.attrs["significant_bits"]) == 12

    cfg = HeatmapConfig(run=run, thumbnail_px=W, top_k=2, max_alpha=0.5)
    res = make_heatmaps(cfg, progress=False)
    assert len(res.done) == 4 and not res.failed
    png = run / "heatmaps" / "s0.png"
    bright = _grey(png)
    assert bright.shape == (H, W)
    # tissue 1800 and glass 3600 of 4095: 112 and 225 with 12 bits, 7 and 14 as the top 8
    # of 16 bits (what heatmap drew before)
    assert np.median(bright) > 90, np.median(bright)
    assert _grey(run / "heatmaps" / "s0_topk.png").mean() > 100  # crops read the same way
    assert len(make_heatmaps(cfg, progress=False).skipped) == 4  # current: not redrawn

    # an attention file of an earlier version (no attr): drawn as before, nearly black;
    # the changed bits make the PNG out of date
    with h5py.File(att, "r+") as f:
        del f.attrs["significant_bits"]
    res = make_heatmaps(cfg, progress=False)
    assert res.done == ["s0"] and len(res.skipped) == 3
    dark = _grey(png)
    assert np.median(dark) < 20, np.median(dark)

    # predict (no --overwrite) puts the bits back without scoring again; the PNG follows
    import wsi_mil.train.predict as pred

    def boom(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(pred, "predict_bag", boom)
    again = predict_slides(
        PredictConfig(work=d / "w", run=run, device="cpu"), entries, progress=False
    )
    assert len(again.batch.skipped) == 4
    with h5py.File(att, "r") as f:
        assert int(f.attrs["significant_bits"]) == 12
    res = make_heatmaps(cfg, progress=False)
    assert res.done == ["s0"]
    np.testing.assert_array_equal(_grey(png), bright)


def test_predict_finds_the_bits_of_feature_stores_without_a_source_store(pipeline, tmp_path):
    """Feature stores made elsewhere (no ``source_store`` attr): the slide's store in
    ``W/patches``; none there: no bits (8-bit behaviour)."""
    d, _ = pipeline
    (fstore,) = (d / "w" / "features").glob("*/s1.h5")
    copy = tmp_path / "s1.h5"
    shutil.copy(fstore, copy)
    assert tiling_significant_bits(copy, "s1", None, e2e=False) == 12  # its own attr
    with h5py.File(copy, "r+") as f:  # a feature store of an earlier version: no such attr
        del f.attrs["significant_bits"]
    assert tiling_significant_bits(copy, "s1", d / "w", e2e=False) == 12  # via source_store
    with h5py.File(copy, "r+") as f:
        del f.attrs["source_store"]
    assert tiling_significant_bits(copy, "s1", d / "w", e2e=False) == 12  # via W/patches
    assert tiling_significant_bits(copy, "s1", tmp_path / "nowhere", e2e=False) is None
    with h5py.File(copy, "r+") as f:  # a feature store that records the bits itself
        f.attrs["significant_bits"] = 10
    assert tiling_significant_bits(copy, "s1", tmp_path / "nowhere", e2e=False) == 10
    patch_store = d / "w" / "patches" / "s1.zarr"
    assert tiling_significant_bits(patch_store, "s1", None, e2e=True) == 12
