"""CLAM / TRIDENT feature stores through the real CLI (train -> predict -> heatmap), and ours
read the way CLAM's and TRIDENT's loaders read.

The foreign files are written by hand, laid out as the tools write them:

- CLAM ``extract_features_fp.py``: ``<feat_dir>/h5_files/<id>.h5`` appended batch by batch
  with ``utils/file_utils.save_hdf5`` (chunks (1, ...), maxshape (None, ...)), ``features``
  float32 (N, D) and ``coords`` **int32** (N, 2), no attributes at all; then
  ``<feat_dir>/pt_files/<id>.pt`` = ``torch.save(torch.from_numpy(features))``.
  ``create_patches_fp.py``: ``<data>/patches/<id>.h5`` with ``coords`` int64 and attrs
  patch_size, patch_level, downsample (2 floats), downsampled_level_dim, level_dim, name,
  save_path.
- TRIDENT ``WSI.extract_patch_features`` (``IO.save_h5``):
  ``<job>/<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/<id>.h5`` with ``features`` (N, D)
  (attrs name, savetodir) and ``coords`` int64 (N, 2) carrying the patcher's attrs
  patch_size, patch_size_level0, level0_magnification, target_magnification, overlap, name,
  savetodir, level0_width, level0_height.

Coordinates are level-0 top-left (x, y) in all three tools. The slides are small synthetic
TIFFs tiled and extracted by us, then converted, so the attention heatmaps of a foreign store
can be compared pixel for pixel with those of our own store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from features.tool_layouts import clam_save_hdf5
from PIL import Image

ENV = {"OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE"}
PATCH = 64
DIM = 16


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wsi_mil", "-q", *args],
        cwd=cwd,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------ writers (as the tools do)
def read_ours(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def to_clam(
    ours: Path,
    feat_dir: Path,
    data_dir: Path | None = None,
    feat_dtype: str = "float32",
    batch_dim: bool = False,
    batch: int = 16,
) -> Path:
    """Our store -> CLAM ``feat_dir/{h5_files,pt_files}`` (+ ``data_dir/patches``)."""
    (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    for p in sorted(ours.glob("*.h5")):
        feats, coords, attrs = read_ours(p)
        feats = feats.astype(feat_dtype)
        out = feat_dir / "h5_files" / p.name
        if batch_dim:  # some forks keep the loader's batch axis: (1, N, D) / (1, N, 2)
            with h5py.File(out, "w") as f:
                f["features"] = feats[None]
                f["coords"] = coords.astype(np.int32)[None]
        else:
            mode = "w"
            for s in range(0, len(feats), batch):  # compute_w_loader: one call per batch
                clam_save_hdf5(
                    out,
                    {
                        "features": feats[s : s + batch],
                        "coords": coords[s : s + batch].astype(np.int32),
                    },
                    mode=mode,
                )
                mode = "a"
        torch.save(torch.from_numpy(feats), feat_dir / "pt_files" / f"{p.stem}.pt")
        if data_dir is not None:
            (data_dir / "patches").mkdir(parents=True, exist_ok=True)
            w, h = int(attrs["level0_width"]), int(attrs["level0_height"])
            coords_attrs = {
                "coords": {
                    "patch_size": PATCH,
                    "patch_level": 0,
                    "downsample": (1.0, 1.0),
                    "downsampled_level_dim": (w, h),
                    "level_dim": (w, h),
                    "name": p.stem,
                    "save_path": str(data_dir / "patches"),
                }
            }
            clam_save_hdf5(
                data_dir / "patches" / p.name, {"coords": coords}, coords_attrs, mode="w"
            )
    return feat_dir


def to_trident(ours: Path, job: Path, encoder: str = "uni_v1") -> Path:
    """Our store -> TRIDENT ``job/20x_64px_0px_overlap/features_<encoder>/<id>.h5``."""
    sub = job / f"20x_{PATCH}px_0px_overlap"
    fdir = sub / f"features_{encoder}"
    fdir.mkdir(parents=True, exist_ok=True)
    (sub / "patches").mkdir(exist_ok=True)
    for p in sorted(ours.glob("*.h5")):
        feats, coords, attrs = read_ours(p)
        cattrs = {
            "patch_size": PATCH,
            "patch_size_level0": PATCH * 20 // 20,
            "level0_magnification": 20,
            "target_magnification": 20,
            "overlap": 0,
            "name": p.stem,
            "savetodir": str(sub / "patches"),
            "level0_width": int(attrs["level0_width"]),
            "level0_height": int(attrs["level0_height"]),
        }
        with h5py.File(sub / "patches" / f"{p.stem}_patches.h5", "w") as f:
            f.create_dataset(
                "coords", data=coords.astype(np.int64), chunks=(1, 2), maxshape=(None, 2)
            )
            f["coords"].attrs.update(cattrs)
        with h5py.File(fdir / p.name, "w") as f:
            d = f.create_dataset(
                "features", data=feats, chunks=(1, feats.shape[1]), maxshape=(None, feats.shape[1])
            )
            d.attrs.update({"name": p.stem, "savetodir": str(fdir)})
            c = f.create_dataset(
                "coords", data=coords.astype(np.int64), chunks=(1, 2), maxshape=(None, 2)
            )
            c.attrs.update(cattrs)
    return fdir


# ------------------------------------------------------------------ our own store, once
@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> dict:
    """12 synthetic 768x512 slides (6 positive), tiled at 64 px and extracted (D=16) by us."""
    root = tmp_path_factory.mktemp("interop")
    _ok(_cli("synth", str(root / "S"), "-n", "12", "--width", "768", "--height", "512",
             "--marker-size-min", "40", "--marker-size-max", "80", "--seed", "1"))  # fmt: skip
    table = root / "S" / "slides.csv"
    df = pd.read_csv(table)
    df["split"] = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    df.to_csv(table, index=False)
    _ok(_cli("tile", "--slides", str(table), "-w", str(root / "W"), "--patch-size", str(PATCH)))
    _ok(_cli("extract", "--slides", str(table), "-w", str(root / "W"), "--feature-dim", str(DIM),
             "--device", "cpu", "--features", str(root / "ours")))  # fmt: skip
    assert len(list((root / "ours").glob("*.h5"))) == 12
    inner = [
        sid
        for sid in df.slide_id
        if tuple(read_ours(root / "ours" / f"{sid}.h5")[1].max(0) + PATCH) != (768, 512)
    ]
    assert inner, "every slide's patches reach the right and bottom edges: change the seed"
    return {
        "root": root,
        "table": table,
        "feats": root / "ours",
        "ids": list(df.slide_id),
        "inner": inner[0],
    }


def _pipeline(ours: dict, features: Path, run: Path, *train_extra: str) -> Path:
    """train (cached, 2 epochs) -> predict -> heatmap through the CLI; the run folder."""
    t, w = str(ours["table"]), str(run.parent / f"{run.name}-work")
    _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run), "--features", str(features),
             "--device", "cpu", "--epochs", "2", "--seed", "0", *train_extra))  # fmt: skip
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run), "--device", "cpu"))
    _ok(_cli("heatmap", "--run", str(run), "--slides", t, "--top-k", "0"))
    assert len(list((run / "attention").glob("*.h5"))) == 12
    return run


def _attention(run: Path, sid: str) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(run / "attention" / f"{sid}.h5", "r") as f:
        return f["coords"][:], f["attention"][:], dict(f.attrs)


def _png(run: Path, sid: str) -> np.ndarray:
    return np.asarray(Image.open(run / "heatmaps" / f"{sid}.png").convert("RGB"), np.int16)


# ------------------------------------------------------------------ tests
def test_ours_read_as_clam_and_trident_read(ours):
    """CLAM's Generic_MIL_Dataset (h5 and pt) and TRIDENT's read_coords on our files."""
    for p in sorted(ours["feats"].glob("*.h5"))[:3]:
        with h5py.File(p, "r") as f:
            feats = torch.from_numpy(f["features"][:])  # CLAM use_h5
            coords = f["coords"][:]
            cattrs = dict(f["coords"].attrs)
        assert feats.dtype == torch.float32 and feats.ndim == 2 and feats.shape[1] == DIM
        assert coords.dtype == np.int64 and coords.shape == (len(feats), 2)
        # level-0 top-left corners on the 64 px grid, inside the 768x512 slide
        assert (coords % PATCH == 0).all() and (coords >= 0).all()
        assert (coords[:, 0] + PATCH <= 768).all() and (coords[:, 1] + PATCH <= 512).all()
        # CLAM's heatmaps / TRIDENT's legacy reader: patch_size, patch_level;
        # TRIDENT's slide encoders: patch_size_level0
        assert cattrs["patch_size"] == PATCH and cattrs["patch_level"] == 0
        assert cattrs["patch_size_level0"] == PATCH
        # the docs' recipe for CLAM pt_files, read back the way CLAM reads them
        pt = p.with_suffix(".pt")
        torch.save(torch.from_numpy(h5py.File(p, "r")["features"][:]), pt)
        t = torch.load(pt)
        assert isinstance(t, torch.Tensor) and t.shape == feats.shape
        assert torch.equal(t, feats)
        pt.unlink()


@pytest.fixture(scope="module")
def runs(ours) -> dict:
    """The same training (no positional encoding) on our store and on a CLAM copy of it
    (``--features`` at the CLAM root holding h5_files/ and pt_files/)."""
    clam = to_clam(ours["feats"], ours["root"] / "CLAM")
    return {
        "clam_root": clam,
        "ours": _pipeline(ours, ours["feats"], ours["root"] / "ours-run", "--no-pos"),
        "clam": _pipeline(ours, clam, ours["root"] / "clam-run", "--no-pos"),
    }


def test_clam_root_same_heatmaps_as_ours(ours, runs):
    """Without the positional encoding the model sees the same features, so a CLAM copy of
    our store must give the same attention, on the same coords, drawn at the same pixels."""
    a, b = runs["ours"], runs["clam"]
    pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    assert np.allclose(pa.prob, pb.prob, atol=1e-5)
    for sid in ours["ids"]:
        ca, aa, _ = _attention(a, sid)
        cb, ab, attrs = _attention(b, sid)
        assert np.array_equal(ca, cb) and np.allclose(aa, ab, atol=1e-5)
        assert attrs["patch_size_level0"] == PATCH
        assert np.abs(_png(a, sid) - _png(b, sid)).max() <= 2, sid
    # the CLAM run read h5_files (coords), not pt_files
    with h5py.File(b / "attention" / f"{ours['ids'][0]}.h5", "r") as f:
        assert "h5_files" in f.attrs["feature_store"]


def test_heatmap_boxes_are_where_the_patches_are(ours, runs, tmp_path):
    """Attention all on one patch of a CLAM store: the box is drawn over that patch's
    level-0 top-left (x, y) .. (x + size, y + size) (not transposed, not shifted), nowhere else."""
    sid = ours["ids"][0]
    run = tmp_path / "run"
    shutil.copytree(runs["clam"], run)
    coords, _, _ = _attention(run, sid)
    # two patches far apart, off the diagonal (a transposed box would land elsewhere)
    k = int(np.argmax(coords[:, 0] - coords[:, 1]))
    j = int(np.argmax(coords[:, 1] - coords[:, 0]))
    assert coords[k, 0] != coords[k, 1]

    def draw_one_hot(i: int) -> np.ndarray:
        with h5py.File(run / "attention" / f"{sid}.h5", "r+") as f:
            f["attention"][...] = (np.arange(len(coords)) == i).astype(np.float32)
        _ok(_cli("heatmap", "--run", str(run), "--slides", str(ours["table"]), "--top-k", "0",
                 "--slide-id", sid, "--overwrite", "--thumbnail-px", "768"))  # fmt: skip
        return _png(run, sid)

    a, b = draw_one_hot(k), draw_one_hot(j)
    assert a.shape[:2] == (512, 768)  # PNG px = level-0 px here
    diff = np.abs(a - b).max(-1) > 8
    inside = np.zeros_like(diff)
    for i in (k, j):
        x, y = (int(v) for v in coords[i])
        inside[max(0, y - 2) : y + PATCH + 2, max(0, x - 2) : x + PATCH + 2] = True
        # the box covers the patch: its corners are drawn
        assert (
            diff[y : y + 4, x : x + 4].any()
            and diff[y + PATCH - 4 : y + PATCH, x + PATCH - 4 : x + PATCH].any()
        ), i
    assert diff.any() and not (diff & ~inside).any()


def test_clam_h5_variants_train(ours, tmp_path):
    """h5_files of other vintages: float16 features, a leading batch axis (1, N, D)."""
    clam = to_clam(ours["feats"], tmp_path / "CLAM")
    half = to_clam(ours["feats"], tmp_path / "CLAM16", feat_dtype="float16")
    batched = to_clam(ours["feats"], tmp_path / "CLAMB", batch_dim=True)
    for i, sid in enumerate(ours["ids"]):
        src = (half, batched)[i % 2] / "h5_files" / f"{sid}.h5"
        shutil.copy(src, clam / "h5_files" / f"{sid}.h5")
    t, w, run = str(ours["table"]), str(tmp_path / "w"), tmp_path / "run"
    r = _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run), "--features",
                 str(clam / "h5_files"), "--device", "cpu", "--epochs", "2"))  # fmt: skip
    assert "positional encoding off" not in r.stderr
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run), "--device", "cpu"))
    for sid in ours["ids"][:2]:
        coords, att, _ = _attention(run, sid)
        assert np.array_equal(coords, read_ours(ours["feats"] / f"{sid}.h5")[1])
        assert np.isclose(att.sum(), 1.0, atol=1e-4)


def test_clam_pt_files(ours, tmp_path):
    """pt_files with coords from the h5_files twin (pos encoding on); pt_files alone
    (no coords anywhere): train with the positional encoding off, heatmap fails clearly."""
    clam = to_clam(ours["feats"], tmp_path / "CLAM")
    t, w = str(ours["table"]), str(tmp_path / "w")
    run = tmp_path / "run"
    r = _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run), "--features",
                 str(clam / "pt_files"), "--device", "cpu", "--epochs", "2"))  # fmt: skip
    assert "positional encoding off" not in r.stderr
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run), "--device", "cpu"))
    coords, _, attrs = _attention(run, ours["ids"][0])
    assert attrs["has_coords"] and attrs["feature_store"].endswith(".pt")
    assert np.array_equal(coords, read_ours(ours["feats"] / f"{ours['ids'][0]}.h5")[1])

    shutil.rmtree(clam / "h5_files")  # now nothing has coords
    run2 = tmp_path / "run2"
    r = _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run2), "--features",
                 str(clam), "--device", "cpu", "--epochs", "2"))  # fmt: skip
    assert "positional encoding off" in r.stderr
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run2), "--device", "cpu"))
    r = _cli("heatmap", "--run", str(run2), "--slides", t, "--top-k", "0")
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "coord" in r.stderr


def test_clam_pt_files_coords_from_patches(ours, tmp_path):
    """CLAM's create_patches_fp output next to pt_files: coords (and patch size) from there."""
    clam = to_clam(ours["feats"], tmp_path / "CLAM", data_dir=tmp_path / "CLAM")
    shutil.rmtree(clam / "h5_files")
    t, w, run = str(ours["table"]), str(tmp_path / "w"), tmp_path / "run"
    r = _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run), "--features", str(clam),
                 "--device", "cpu", "--epochs", "2"))  # fmt: skip
    assert "positional encoding off" not in r.stderr
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run), "--device", "cpu"))
    sid = ours["inner"]  # patches short of the right/bottom edge: the size is not their extent
    coords, _, attrs = _attention(run, sid)
    assert np.array_equal(coords, read_ours(ours["feats"] / f"{sid}.h5")[1])
    assert attrs["patch_size_level0"] == PATCH
    assert (attrs["level0_width"], attrs["level0_height"]) == (768, 512)


def test_trident_layout(ours, tmp_path):
    """TRIDENT job folder: --features at the job folder (train) or at features_<enc>/ (predict)."""
    fdir = to_trident(ours["feats"], tmp_path / "job")
    t, w, run = str(ours["table"]), str(tmp_path / "w"), tmp_path / "run"
    r = _ok(_cli("train", "--slides", t, "-w", w, "--run", str(run), "--features",
                 str(tmp_path / "job"), "--device", "cpu", "--epochs", "2"))  # fmt: skip
    assert "positional encoding off" not in r.stderr
    _ok(_cli("predict", "--slides", t, "-w", w, "--run", str(run), "--device", "cpu",
             "--features", str(fdir)))  # fmt: skip
    sid = ours["inner"]
    coords, _, attrs = _attention(run, sid)
    assert np.array_equal(coords, read_ours(ours["feats"] / f"{sid}.h5")[1])
    assert attrs["patch_size_level0"] == PATCH and attrs["feature_store"].startswith(str(fdir))
    # the slide size comes with TRIDENT's coords attrs: no "is it the same slide?" warning
    assert (attrs["level0_width"], attrs["level0_height"]) == (768, 512)
    r = _ok(_cli("heatmap", "--run", str(run), "--slides", t, "--top-k", "0"))
    assert "same slide" not in r.stderr, r.stderr
    assert len(list((run / "heatmaps").glob("*.png"))) == 12


def test_mixed_dims_and_wrong_files_are_clear_errors(ours, runs, tmp_path):
    """Another encoder's store (D=8 among D=16) or TRIDENT slide features (D,): one error
    line (exit 2) from train; predict with the D=16 model: exit 2 or a recorded failure."""
    clam = to_clam(ours["feats"], tmp_path / "CLAM")
    t, w = str(ours["table"]), str(tmp_path / "w")
    bad_id = ours["ids"][3]
    p = clam / "h5_files" / f"{bad_id}.h5"
    feats, coords, _ = read_ours(ours["feats"] / f"{bad_id}.h5")
    p.unlink()
    clam_save_hdf5(
        p, {"features": feats[:, :8].copy(), "coords": coords.astype(np.int32)}, mode="w"
    )
    r = _cli("train", "--slides", t, "-w", w, "--run", str(tmp_path / "r2"), "--features",
             str(clam / "h5_files"), "--device", "cpu", "--epochs", "1")  # fmt: skip
    _one_error(r, "D=8", "D=16", bad_id)
    good = tmp_path / "good"
    shutil.copytree(runs["clam"], good)
    r = _cli("predict", "--slides", t, "-w", w, "--run", str(good), "--device", "cpu",
             "--features", str(clam / "h5_files"))  # fmt: skip
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    fails = Path(w) / "failures.csv"
    assert bad_id in r.stderr + (fails.read_text() if fails.exists() else "")
    # TRIDENT slide-level features (D,) where patch features were expected
    p.unlink()
    with h5py.File(p, "w") as f:
        f["features"] = feats.mean(0)
        f["coords"] = coords
    r = _cli("train", "--slides", t, "-w", w, "--run", str(tmp_path / "r3"), "--features",
             str(clam / "h5_files"), "--device", "cpu", "--epochs", "1")  # fmt: skip
    _one_error(r, bad_id)


def test_trident_pt_features_find_their_patches(ours, tmp_path):
    """TRIDENT ``--save_features_as pt``: features_<enc>/<id>.pt (torch.save of the array),
    coords and slide size from <mag folder>/patches/<id>_patches.h5."""
    from wsi_mil.features import find_feature_file, open_features

    fdir = to_trident(ours["feats"], tmp_path / "job")
    sid = ours["inner"]
    feats, coords, _ = read_ours(ours["feats"] / f"{sid}.h5")
    (fdir / f"{sid}.h5").unlink()
    torch.save(feats, fdir / f"{sid}.pt")
    for d in (fdir, fdir.parent, tmp_path / "job"):
        assert find_feature_file(d, sid) == fdir / f"{sid}.pt", d
    bag = open_features(fdir / f"{sid}.pt")
    assert np.array_equal(bag.features, feats) and np.array_equal(bag.coords, coords)
    assert bag.level0_size == (768, 512) and bag.attrs["patch_size_level0"] == PATCH
