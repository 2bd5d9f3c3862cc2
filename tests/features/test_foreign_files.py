"""Near-miss feature files of other tools: each one read right, or refused with the reason.

Layouts as CLAM and TRIDENT write them (see ``test_feature_store.py``); the near misses are
files those tools (or forks, or a killed job) leave behind: CLAM's ``h5_files/<id>.h5`` is
appended batch by batch by ``extract_features_fp.compute_w_loader`` and ``pt_files/<id>.pt``
is saved only after the slide is done; TRIDENT's ``--save_features_as pt`` is
``torch.save(features)`` of a numpy array, pickled by whichever numpy TRIDENT ran with.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from features.tool_layouts import clam_save_hdf5

from wsi_mil.errors import StoreError
from wsi_mil.features import open_features, write_features


def _data(n: int = 12, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 features, (n, 2) int64 level-0 coords on a 256 px grid."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = (np.stack([np.arange(n) % 4, np.arange(n) // 4], 1) * 256).astype(np.int64)
    return feats, coords


@pytest.mark.parametrize(
    ("make", "msg"),
    [
        ("group", "'features' is an HDF5 group, not a dataset"),
        ("strings", "'features' holds dtype |S1"),
        ("scalar", "'features' holds a single value"),
        ("complex", "'features' holds dtype complex64"),
        ("coords_group", "'coords' is an HDF5 group"),
    ],
)
def test_features_that_are_not_numbers_per_patch(tmp_path, make, msg):
    """These raised TypeError/ValueError from h5py or numpy: an 'internal error', exit 1."""
    feats, coords = _data()
    p = tmp_path / "s.h5"
    with h5py.File(p, "w") as f:
        if make == "group":
            f.create_group("features").create_dataset("x", data=feats)
        elif make == "strings":
            f["features"] = np.array([b"a"] * len(coords))
        elif make == "scalar":
            f["features"] = np.float32(1.0)
        elif make == "complex":
            f["features"] = feats.astype(np.complex64)
        else:
            f["features"] = feats
        if make == "coords_group":
            f.create_group("coords").create_dataset("xy", data=coords)
        else:
            f["coords"] = coords
    with pytest.raises(StoreError, match=msg) as e:
        open_features(p)
    assert "CLAM/TRIDENT layout" in e.value.hint


def test_a_features_group_is_one_error_line_from_train(tmp_path, cli):
    """Through the CLI: exit 2, one 'error:' line naming the file, no traceback."""
    ids = [f"s{i}" for i in range(4)]
    table = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ids, "path": "", "label": [0, 1, 0, 1], "split": "train"}).to_csv(
        table, index=False
    )
    h5 = tmp_path / "CLAM" / "h5_files"
    h5.mkdir(parents=True)
    for i, sid in enumerate(ids):
        feats, coords = _data(seed=i)
        if sid == "s2":
            with h5py.File(h5 / f"{sid}.h5", "w") as f:
                f.create_group("features").create_dataset("x", data=feats)
                f["coords"] = coords
        else:
            clam_save_hdf5(h5 / f"{sid}.h5", {"features": feats, "coords": coords}, mode="w")
    r = cli("-q", "train", "--slides", str(table), "-w", str(tmp_path / "w"), "--run",
            str(tmp_path / "run"), "--features", str(h5), "--device", "cpu", "--epochs", "1",
            env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "s2.h5" in err[0] and "HDF5 group" in err[0], r.stderr


def test_transposed_features_say_so(tmp_path):
    """(D, N) features: the hint named another slide's coords file."""
    feats, coords = _data(n=12, d=8)
    p = tmp_path / "s.h5"
    clam_save_hdf5(p, {"features": feats.T.copy(), "coords": coords}, mode="w")
    with pytest.raises(StoreError, match="8 features but 12 coords") as e:
        open_features(p)
    assert "transposed" in e.value.hint and "(N, D)" in e.value.hint


def test_empty_features_without_a_width_are_an_empty_bag(tmp_path):
    """TRIDENT's extract_patch_features saves a slide without patches as features
    ``np.empty((0,))`` (when the encoder has no embedding_dim) and coords (0, 2): it was
    refused as 'one vector per slide' (a slide embedding) instead of being an empty bag."""
    p = tmp_path / "s.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.zeros((0,), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    bag = open_features(p)
    assert len(bag) == 0 and bag.coords.shape == (0, 2)


def _as_numpy1_pickle(path: Path) -> None:
    """Rewrite a ``torch.save`` of a numpy array as numpy 1.x pickles it: the array's
    reconstructor is ``numpy.core.multiarray._reconstruct`` (numpy 2: ``numpy._core``)."""
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            z.writestr(info, data)


@pytest.mark.skipif(not np.__version__.startswith("2"), reason="needs numpy 2")
def test_trident_pt_written_under_numpy1(tmp_path):
    """TRIDENT pt features saved with numpy 1.x (float16 from autocast): 'Unsupported global
    numpy.core.multiarray._reconstruct', refused under torch.load(weights_only=True)."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        pytest.skip("torch < 2.6 takes no (object, name) safe globals")
    feats, coords = _data()
    fdir = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    fdir.mkdir(parents=True)
    torch.save(feats.astype(np.float16), fdir / "s.pt")
    _as_numpy1_pickle(fdir / "s.pt")
    (fdir.parent / "patches").mkdir()
    with h5py.File(fdir.parent / "patches" / "s_patches.h5", "w") as f:
        f["coords"] = coords
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 256})
    bag = open_features(fdir / "s.pt")
    assert bag.features.dtype == np.float32
    assert np.allclose(bag.features, feats, atol=1e-2) and np.array_equal(bag.coords, coords)


def test_clam_pt_files_load_without_torch_safe_globals(tmp_path, monkeypatch):
    """torch 2.1-2.4 (allowed by pyproject) have no ``torch.serialization.safe_globals``:
    every pt_files/<id>.pt failed with 'cannot load'."""
    feats, _ = _data()
    torch.save(torch.from_numpy(feats), tmp_path / "s.pt")
    monkeypatch.delattr(torch.serialization, "safe_globals")
    bag = open_features(tmp_path / "s.pt")
    assert np.array_equal(bag.features, feats) and bag.coords is None


def test_clam_h5_without_its_pt_is_refused(tmp_path, monkeypatch):
    """A CLAM job killed (or still running) mid-slide leaves h5_files/<id>.h5 with the first
    batches and no pt_files/<id>.pt: it was read as a complete, smaller bag."""
    feats, coords = _data(n=12)
    root = tmp_path / "CLAM"
    (root / "h5_files").mkdir(parents=True)
    (root / "pt_files").mkdir()
    for sid, n in (("done", 12), ("part", 4)):  # part: killed after one batch of 4
        clam_save_hdf5(
            root / "h5_files" / f"{sid}.h5",
            {"features": feats[:n], "coords": coords[:n].astype(np.int32)},
            mode="w",
        )
    torch.save(torch.from_numpy(feats), root / "pt_files" / "done.pt")
    assert len(open_features(root / "h5_files" / "done.h5")) == 12
    with pytest.raises(StoreError, match=r"without its pt_files/part\.pt") as e:
        open_features(root / "h5_files" / "part.h5")
    assert "extract_features_fp.py" in e.value.hint
    monkeypatch.chdir(root / "h5_files")  # the bare file name, from inside h5_files/
    with pytest.raises(StoreError, match=r"without its pt_files/part\.pt"):
        open_features(Path("part.h5"))
    monkeypatch.chdir(tmp_path)
    # an h5_files folder of ours (written whole) needs no .pt twins
    write_features(root / "h5_files" / "ours.h5", feats, coords, {}, 256, 0)
    assert len(open_features(root / "h5_files" / "ours.h5")) == 12
    # no .pt at all: pt_files not in use, nothing to compare with
    (root / "pt_files" / "done.pt").unlink()
    assert len(open_features(root / "h5_files" / "part.h5")) == 4


@pytest.mark.parametrize(
    ("cattrs", "ps0"),
    [
        # TRIDENT coords without patch_size_level0: its own formula, 256 px at 20x of a 40x
        # scan -> 512 (the 448 px grid step of a 32 px overlap was taken for the patch size)
        ({"patch_size": 256, "level0_magnification": 40, "target_magnification": 20}, 512),
        # rounded as TRIDENT rounds it: 224 * 40 / 30 = 298.7 -> 299 (floor division gave 298)
        ({"patch_size": 224, "level0_magnification": 40, "target_magnification": 30}, 299),
        # "None" (TRIDENT's None) in one attr hid CLAM's patch_size * downsample
        ({"patch_size_level0": "None", "patch_size": 256, "downsample": [2.0, 2.0]}, 512),
    ],
)
def test_patch_size_from_magnifications_or_downsample(tmp_path, cattrs, ps0):
    feats, _ = _data(n=12)
    step = 448  # (256 - 32) px at 20x, in level-0 px of a 40x scan
    coords = (np.stack([np.arange(12) % 4, np.arange(12) // 4], 1) * step).astype(np.int64)
    p = tmp_path / "features_uni_v1" / "s.h5"
    p.parent.mkdir()
    with h5py.File(p, "w") as f:
        f["features"] = feats
        f["coords"] = coords
        f["coords"].attrs.update({"overlap": 32, **cattrs})
    bag = open_features(p)
    assert bag.attrs["patch_size_level0"] == ps0
    assert not bag.attrs.get("patch_size_level0_inferred")


def test_a_missing_features_dataset_names_what_is_there(tmp_path):
    """A near-miss name ('feats') and a patches/ coords file (CLAM create_patches_fp, TRIDENT
    patching, our tile --clam-h5) passed as features: both said only "no 'features' dataset"."""
    feats, coords = _data()
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f["feats"] = feats
        f["coords"] = coords
    with pytest.raises(StoreError, match=r"no 'features' dataset \(it holds 'coords', 'feats'\)"):
        open_features(tmp_path / "feats.h5")
    (tmp_path / "patches").mkdir()
    clam_save_hdf5(
        tmp_path / "patches" / "s.h5",
        {"coords": coords},
        {"coords": {"patch_size": 256, "patch_level": 0}},
        mode="w",
    )
    with pytest.raises(StoreError, match="no .features. dataset, a patch coordinates file") as e:
        open_features(tmp_path / "patches" / "s.h5")
    assert "not the patches/ folder" in e.value.hint
