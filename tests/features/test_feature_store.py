"""Feature store round trips: ours in plain h5py, CLAM and TRIDENT layouts through our reader.

The foreign files are written by hand with h5py/torch following the published layouts:
CLAM's ``utils/file_utils.save_hdf5`` (datasets chunked (1, ...) with maxshape (None, ...),
coords int32 from ``extract_features_fp.compute_w_loader``; ``pt_files/<id>.pt`` =
``torch.save(torch.from_numpy(features))``; patches h5 ``coords`` attrs patch_size,
patch_level, downsample, level_dim ...) and TRIDENT's feature writer (``features_<enc>/<id>.h5``:
``features`` + ``coords`` with ``coords`` attrs patch_size, patch_size_level0,
level0_magnification, target_magnification, overlap, name, savetodir; ``features`` attrs
name, savetodir, encoder).
"""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from features.tool_layouts import clam_save_hdf5

from wsi_mil.errors import StoreError
from wsi_mil.features import FeatureStoreWriter, find_feature_file, open_features, write_features


def _data(n=10, d=24, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = (np.stack([np.arange(n) % 5, np.arange(n) // 5], 1) * 256).astype(np.int64)
    return feats, coords


def test_ours_reads_as_clam_expects(tmp_path):
    feats, coords = _data()
    p = tmp_path / "s.h5"
    write_features(
        p,
        feats,
        coords,
        {"encoder": "x", "level0_width": 2000, "level0_height": 1000, "mpp": None},
        patch_size=256,
        patch_level=0,
    )
    with h5py.File(p, "r") as f:  # exactly what CLAM's Generic_MIL_Dataset (use_h5) does
        f_feats, f_coords = f["features"][:], f["coords"][:]
        assert f_feats.shape == (10, 24) and f_feats.dtype.kind == "f"
        assert f_coords.shape == (10, 2) and f_coords.dtype == np.int64
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0
    assert np.array_equal(f_feats, feats) and np.array_equal(f_coords, coords)
    bag = open_features(p)
    assert bag.dim == 24 and len(bag) == 10 and bag.level0_size == (2000, 1000)
    assert bag.attrs["mpp"] is None
    nc = bag.norm_coords()
    assert np.allclose(nc, coords / np.array([2000, 1000]))
    assert find_feature_file(tmp_path, "s") == p


def test_float16_store_reads_as_float32(tmp_path):
    feats, coords = _data()
    p = tmp_path / "h.h5"
    write_features(p, feats, coords, {}, 256, 0, dtype="float16")
    with h5py.File(p, "r") as f:
        assert f["features"].dtype == np.float16
    bag = open_features(p)
    assert bag.features.dtype == np.float32
    assert np.allclose(bag.features, feats, atol=1e-2)


def test_writer_without_commit_leaves_nothing(tmp_path):
    feats, coords = _data()
    p = tmp_path / "x.h5"
    with pytest.raises(RuntimeError), FeatureStoreWriter(p, 10, 24, coords, {}, 256, 0) as w:
        w.write(0, feats[:5])
        raise RuntimeError("killed")
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_clam_h5_files_layout(tmp_path):
    feats, coords = _data(n=9, d=1024)
    h5_dir = tmp_path / "FEATS" / "h5_files"
    h5_dir.mkdir(parents=True)
    p = h5_dir / "slideA.h5"
    mode = "w"
    for s in range(0, 9, 4):  # appended per batch, coords int32 as compute_w_loader writes them
        clam_save_hdf5(
            p,
            {"features": feats[s : s + 4], "coords": coords[s : s + 4].astype(np.int32)},
            mode=mode,
        )
        mode = "a"
    bag = open_features(p)
    assert bag.features.shape == (9, 1024) and np.array_equal(bag.features, feats)
    assert bag.coords.dtype == np.int64 and np.array_equal(bag.coords, coords)
    assert bag.attrs["patch_size_level0"] == 256 and bag.attrs["patch_size_level0_inferred"]
    assert bag.norm_coords().max() <= 1.0
    assert find_feature_file(tmp_path / "FEATS", "slideA") == p


def test_clam_pt_files_with_coords_from_h5_files_or_patches(tmp_path):
    feats, coords = _data(n=7, d=16)
    root = tmp_path / "FEATS"
    (root / "pt_files").mkdir(parents=True)
    pt = root / "pt_files" / "s1.pt"
    torch.save(torch.from_numpy(feats), pt)
    # without any coords file: features only, positional encoding off downstream
    bag = open_features(pt)
    assert bag.coords is None and np.array_equal(bag.features, feats) and bag.norm_coords() is None
    # CLAM's create_patches_fp output: DATA/patches/<id>.h5 with coords attrs
    patches = tmp_path / "DATA" / "patches"
    patches.mkdir(parents=True)
    attrs = {
        "coords": {
            "patch_size": 256,
            "patch_level": 1,
            "downsample": np.array([2.0, 2.0]),
            "level_dim": np.array([1000, 500]),
            "name": "s1",
            "save_path": str(patches),
        }
    }
    clam_save_hdf5(patches / "s1.h5", {"coords": coords}, attrs, mode="w")
    bag = open_features(pt, coords_path=patches / "s1.h5")
    assert np.array_equal(bag.coords, coords) and bag.attrs["patch_size_level0"] == 512
    # the h5_files twin next to pt_files is found automatically
    (root / "h5_files").mkdir()
    clam_save_hdf5(
        root / "h5_files" / "s1.h5",
        {"features": feats, "coords": coords.astype(np.int32)},
        mode="w",
    )
    bag = open_features(pt)
    assert np.array_equal(bag.coords, coords) and bag.attrs["coords_file"].endswith(
        "h5_files/s1.h5"
    )
    # h5_files is preferred by find_feature_file (it has coords), pt_files alone is found too
    assert find_feature_file(root, "s1") == root / "h5_files" / "s1.h5"
    (root / "h5_files" / "s1.h5").unlink()
    assert find_feature_file(root, "s1") == pt


def test_clam_coords_of_another_slide_are_refused(tmp_path):
    feats, coords = _data(n=7, d=16)
    pt = tmp_path / "pt_files" / "s.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats), pt)
    clam_save_hdf5(tmp_path / "other.h5", {"coords": coords[:5]}, mode="w")
    with pytest.raises(StoreError, match="7 features but 5 coords"):
        open_features(pt, coords_path=tmp_path / "other.h5")


def test_trident_layout(tmp_path):
    feats, coords = _data(n=12, d=1536)
    job = tmp_path / "job" / "20x_256px_0px_overlap"
    fdir = job / "features_uni_v2"
    fdir.mkdir(parents=True)
    p = fdir / "TCGA-01.h5"
    with h5py.File(p, "w") as f:  # TRIDENT save_h5(assets={features, coords}, attributes={...})
        d = f.create_dataset("features", data=feats)
        d.attrs.update({"name": "TCGA-01", "savetodir": str(fdir), "encoder": "uni_v2"})
        c = f.create_dataset("coords", data=coords)
        c.attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
                "overlap": 0,
                "name": "TCGA-01",
                "savetodir": str(job),
            }
        )
    bag = open_features(p)
    assert bag.features.shape == (12, 1536) and np.array_equal(bag.coords, coords)
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["features_encoder"] == "uni_v2"
    assert bag.level0_size is None and bag.norm_coords().max() < 1.0
    for d in (fdir, job, tmp_path / "job"):
        assert find_feature_file(d, "TCGA-01") == p
    assert find_feature_file(fdir, "missing") is None
    # TRIDENT .pt (torch.save of a numpy array) also loads with weights_only=True
    torch.save(feats, fdir / "TCGA-02.pt")
    assert np.array_equal(open_features(fdir / "TCGA-02.pt").features, feats)
    # two encoders holding the slide: ambiguous, ask for the folder
    (job / "features_conch_v15").mkdir()
    with h5py.File(job / "features_conch_v15" / "TCGA-01.h5", "w") as f:
        f["features"] = feats[:, :768]
    with pytest.raises(StoreError, match="several feature files"):
        find_feature_file(job, "TCGA-01")


def test_unreadable_and_wrong_files(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    with pytest.raises(StoreError, match="unreadable HDF5"):
        open_features(bad)
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(StoreError, match="no 'features'"):
        open_features(tmp_path / "nofeat.h5")
    with pytest.raises(StoreError, match="not found"):
        open_features(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "batched.h5", "w") as f:  # some tools store (1, N, D)
        f["features"] = np.ones((1, 4, 3), np.float32)
        f["coords"] = np.zeros((1, 4, 2), np.int64)
    assert open_features(tmp_path / "batched.h5").features.shape == (4, 3)


@pytest.mark.parametrize(
    ("coords", "msg", "hint"),
    [
        ("transposed", r"coords have shape \(2, 44\), expected \(N, 2\)", "transpose"),
        ("three", r"coords have shape \(44, 3\), expected \(N, 2\)", "one \\(x, y\\) row"),
        ("negative", "coords hold negative values", "level-0 pixels"),
    ],
)
def test_malformed_coords_are_refused_with_the_reason(tmp_path, coords, msg, hint):
    """(2, N) coords were reshaped into N scrambled pairs; (N, 3) said '66 coords'; negative
    coords were scored and then failed in heatmap as 'no patch coordinates'."""
    feats, xy = _data(n=44, d=16)
    bad = {"transposed": xy.T, "three": np.zeros((44, 3), np.int64), "negative": xy - 10**5}
    path = tmp_path / "s.h5"
    clam_save_hdf5(path, {"features": feats, "coords": bad[coords]}, mode="w")
    with pytest.raises(StoreError, match=msg) as e:
        open_features(path)
    assert re.search(hint, e.value.hint)
