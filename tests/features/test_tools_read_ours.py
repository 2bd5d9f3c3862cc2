"""Our ``tile --clam-h5`` coords file and our feature store, read the way CLAM and TRIDENT read
them (their loaders re-stated here in a few lines each, not imported: neither is installed).

- CLAM ``dataset_modules/dataset_h5.Whole_Slide_Bag_FP``: ``coords`` attrs ``patch_level`` and
  ``patch_size`` -> ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``.
- TRIDENT ``OpenSlideWSI.extract_patch_features``: ``IO.read_coords`` wants ``coords`` attrs
  ``patch_size``, ``level0_magnification``, ``target_magnification``; without them
  ``IO.read_coords_legacy`` (CLAM's ``patch_size``, ``patch_level``, ``custom_downsample``
  default 1) and ``target_magnification = int(mag / (level_downsamples[patch_level] *
  custom_downsample))``; patches cover ``patch_size * mag / target_magnification`` level-0 px.
  It then saves ``features`` with the coords file's ``coords`` attrs copied.
- TRIDENT ``extract_slide_features``: ``features``, ``coords`` and ``dict(coords.attrs)``;
  its slide encoders (TITAN, GigaPath, CARE) read ``attributes["patch_size_level0"]``.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from slide_factory import make_pyramidal_tiff
from slide_factory import test_image as synthetic_image

from wsi_mil.features import open_features
from wsi_mil.tiling import PatchStore

openslide = pytest.importorskip("openslide")


def test_clam_and_trident_read_our_coords_and_features(tmp_path, cli):
    """A 0.25 um/px slide tiled at 0.5 um/px (pyramid level 1, 64 px patches = 128 level-0 px)."""
    slide = make_pyramidal_tiff(
        tmp_path / "s.tif", synthetic_image(768, 1024), 3, 128, mpp=0.25, compression="zlib"
    )
    w = tmp_path / "W"
    env = {"OMP_NUM_THREADS": "1"}
    r = cli("-q", "tile", str(slide), "-w", str(w), "--mpp", "0.5", "--patch-size", "64",
            "--tissue", "none", "--clam-h5", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(w / "patches" / "s.zarr")
    assert store.level == 1 and store.patch_size_level0 == 128

    # CLAM's Whole_Slide_Bag_FP on patches/<id>.h5: the same pixels as our store
    with h5py.File(w / "patches" / "s.h5", "r") as f:
        coords, cattrs = f["coords"][:], dict(f["coords"].attrs)
    level, ps = int(cattrs["patch_level"]), int(cattrs["patch_size"])
    assert (level, ps) == (1, 64) and np.array_equal(coords, store.coords)
    osr = openslide.OpenSlide(str(slide))
    inside = np.flatnonzero((coords + 128 <= (1024, 768)).all(1))  # edge patches are padded
    for i in inside[:: max(1, len(inside) // 8)]:
        clam = np.asarray(osr.read_region(coords[i], level, (ps, ps)).convert("RGB"))
        assert np.array_equal(clam, store.read_patches(i, i + 1)[0]), coords[i]

    # TRIDENT's legacy reader (no level0/target magnification attrs): same patch extent
    assert "level0_magnification" not in cattrs
    mag = 40  # TRIDENT's OpenSlideWSI._fetch_magnification: mpp < 0.3 -> 40
    target = int(mag / (osr.level_downsamples[level] * cattrs.get("custom_downsample", 1)))
    assert round(ps * mag / target) == store.patch_size_level0

    # a TRIDENT features file made from those coords (their attrs copied): read by us
    fdir = tmp_path / "job" / "20x_64px_0px_overlap" / "features_conch_v15"
    fdir.mkdir(parents=True)
    with h5py.File(fdir / "s.h5", "w") as f:
        f["features"] = np.ones((len(coords), 8), np.float16)
        f["coords"] = coords
        f["coords"].attrs.update(cattrs)
    bag = open_features(fdir / "s.h5")
    assert bag.attrs["patch_size_level0"] == 128 and bag.level0_size == (1024, 768)

    # our feature store, as TRIDENT's extract_slide_features and CLAM's Generic_MIL_Dataset read it
    r = cli("-q", "extract", str(slide), "-w", str(w), "--feature-dim", "8", "--device", "cpu",
            "--features", str(tmp_path / "F"), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "F" / "s.h5", "r") as f:
        feats, fcoords, fattrs = f["features"][:], f["coords"][:], dict(f["coords"].attrs)
    assert feats.dtype == np.float32 and feats.shape == (len(coords), 8)
    assert fcoords.dtype == np.int64 and np.array_equal(fcoords, coords)
    assert int(fattrs["patch_size_level0"]) == 128
    assert (int(fattrs["patch_size"]), int(fattrs["patch_level"])) == (64, 1)
