"""`wsi-mil tile` through the real CLI: batches with bad slides, resumption, skipping, sharding."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from slide_factory import make_pyramidal_tiff
from tiling.tiling_images import tissue_slide_image

from wsi_mil.errors import StoreError
from wsi_mil.tiling import PatchStore


def _table(path: Path, rows: list[tuple[str, Path]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path"])
        w.writerows([(sid, str(p)) for sid, p in rows])
    return path


def _same_store(a: Path, b: Path) -> None:
    sa, sb = PatchStore.open(a), PatchStore.open(b)
    np.testing.assert_array_equal(sa.coords, sb.coords)
    np.testing.assert_array_equal(sa.tissue, sb.tissue)
    assert sa.has_pixels == sb.has_pixels
    if sa.has_pixels:
        np.testing.assert_array_equal(sa.pixels(0, len(sa)), sb.pixels(0, len(sb)))
    assert sa.attrs == sb.attrs


@pytest.mark.parametrize("processes", ["1", "2"])
def test_batch_with_corrupt_and_empty_slides(tmp_path, cli, make_slide, processes):
    good = make_slide("good", "tissue", 600, 800)
    empty = make_slide("empty", "blank", 512, 512)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated copy
    table = _table(
        tmp_path / "slides.csv", [("good", good), ("corrupt", corrupt), ("empty", empty)]
    )
    work = tmp_path / "w"
    r = cli(
        "tile", "--slides", str(table), "--work", str(work), "--patch-size", "64",
        "--processes", processes,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    # the good slide is done, with patches only where the tissue is
    s = PatchStore.open(work / "patches" / "good.zarr")
    assert 0 < len(s) < (800 // 64 + 1) * (600 // 64 + 1)
    assert (s.tissue >= 0.1).all() and s.has_pixels
    assert (work / "masks" / "good.png").stat().st_size > 0
    # the corrupt one is recorded with its reason
    rows = list(csv.DictReader(open(work / "failures.csv")))
    assert [r_["slide_id"] for r_ in rows] == ["corrupt"]
    assert "truncated" in rows[0]["reason"] or "corrupt" in rows[0]["reason"]
    assert rows[0]["stage"] == "tile" and rows[0]["path"] == str(corrupt)
    assert not (work / "patches" / "corrupt.zarr").exists()
    # the empty one: a warning and an empty (complete) store
    assert "no tissue" in r.stderr and "empty" in r.stderr
    e = PatchStore.open(work / "patches" / "empty.zarr")
    assert len(e) == 0 and e.coords.shape == (0, 2)
    assert "1 failed" in r.stderr
    # resolved config saved beside the stores
    cfg = yaml.safe_load((work / "patches" / "config.yaml").read_text())
    assert cfg["patch_size"] == 64 and cfg["tissue"] == "otsu"
    assert cfg["processes"] == int(processes)
    if processes != "1":  # slides tiled in worker processes give the same stores
        ref = tmp_path / "ref"
        r1 = cli("-q", "tile", str(good), str(empty), "--work", str(ref), "--patch-size", "64")
        assert r1.returncode == 0, r1.stderr
        for sid in ("good", "empty"):
            _same_store(work / "patches" / f"{sid}.zarr", ref / "patches" / f"{sid}.zarr")
            assert (work / "masks" / f"{sid}.png").read_bytes() == (
                ref / "masks" / f"{sid}.png"
            ).read_bytes()


def test_skip_current_rebuild_on_change(tmp_path, cli, make_slide):
    slide = make_slide("a", "tissue", 512, 640)
    work = tmp_path / "w"
    args = ("-q", "tile", str(slide), "--work", str(work), "--patch-size", "64")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    store = work / "patches" / "a.zarr"
    mtime = (store / "zarr.json").stat().st_mtime_ns
    r = cli(*args)
    assert r.returncode == 0 and "1 up to date" in r.stderr
    assert (store / "zarr.json").stat().st_mtime_ns == mtime
    # a parameter change rebuilds
    r = cli(*args, "--min-tissue", "0.5")
    assert r.returncode == 0 and "1 done" in r.stderr
    assert PatchStore.open(store).attrs["min_tissue"] == 0.5
    # a changed slide file rebuilds
    os.utime(slide, ns=(time.time_ns(), time.time_ns()))
    r = cli(*args, "--min-tissue", "0.5")
    assert r.returncode == 0 and "1 done" in r.stderr


def test_changing_only_the_compression_keeps_the_store_until_overwrite(tmp_path, cli, make_slide):
    """Compressions are lossless: a store made with another one holds the same pixels, so a
    rerun with a new --compression (or a new default) keeps it; --overwrite rebuilds it."""
    slide = make_slide("a", "tissue", 512, 640)
    work = tmp_path / "w"
    args = ("tile", str(slide), "--work", str(work), "--patch-size", "64")
    r = cli("-q", *args, "--compression", "zstd")
    assert r.returncode == 0, r.stderr
    store = work / "patches" / "a.zarr"
    zstd_pixels = PatchStore.open(store).pixels(0, len(PatchStore.open(store)))
    mtime = (store / "zarr.json").stat().st_mtime_ns
    r = cli("-v", *args)  # the default, none; -v shows why the store is kept
    assert r.returncode == 0 and "1 up to date" in r.stderr, r.stderr
    assert "compression zstd" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert "compression zstd" not in cli(*args).stderr  # not at the default verbosity
    assert (store / "zarr.json").stat().st_mtime_ns == mtime
    r = cli("-q", *args, "--overwrite")
    assert r.returncode == 0, r.stderr
    again = PatchStore.open(store)
    assert again.attrs["compression"] == "none"
    np.testing.assert_array_equal(again.pixels(0, len(again)), zstd_pixels)
    # another parameter still rebuilds, whatever the compression
    r = cli("-q", *args, "--compression", "zstd", "--min-tissue", "0.5")
    assert r.returncode == 0, r.stderr
    assert PatchStore.open(store).attrs["compression"] == "zstd"


def test_exclude_pen_drops_patches_on_ink_and_is_a_tiling_parameter(tmp_path, cli):
    """A slide with a green marker stroke across the glass: by default the stroke's patches
    are kept as tissue; --exclude-pen keeps only the tissue's. The option rebuilds the
    store, and stores made without it keep their digest."""
    h, w = 512, 1024
    img = tissue_slide_image(h, w)
    img[:, 500:540] = (60, 150, 80)  # a vertical green stroke over the glass between blobs
    slide = make_pyramidal_tiff(tmp_path / "pen.tif", img, 3, 128, 0.5, "zlib")
    work = tmp_path / "w"
    args = ("-q", "tile", str(slide), "--work", str(work), "--patch-size", "32")
    assert cli(*args).returncode == 0
    store = work / "patches" / "pen.zarr"
    on_ink = lambda xy: ((xy[:, 0] + 32 > 500) & (xy[:, 0] < 540)).sum()  # noqa: E731
    default = PatchStore.open(store)
    assert on_ink(default.coords) >= h // 32  # the stroke's column of patches is "tissue"
    digest = default.attrs["params_digest"]
    r = cli(*args, "--exclude-pen", "green,black")
    assert r.returncode == 0 and "1 done" in r.stderr, r.stderr
    pen = PatchStore.open(store)
    assert on_ink(pen.coords) == 0 and pen.attrs["params"]["exclude_pen"] == ["green", "black"]
    assert len(pen) >= len(default) - on_ink(default.coords)  # the tissue's patches stay
    assert "exclude_pen" not in default.attrs["params"]
    r = cli(*args)  # without the option again: rebuilt, the earlier digest
    assert r.returncode == 0 and "1 done" in r.stderr
    assert PatchStore.open(store).attrs["params_digest"] == digest
    r = cli(*args, "--exclude-pen", "green,red")
    assert r.returncode == 2 and "red" in r.stderr and "Traceback" not in r.stderr
    # no mask to take ink out of: --tissue none ignores it (no rebuild)
    none = ("-q", "tile", str(slide), "--work", str(tmp_path / "w2"), "--tissue", "none")
    assert cli(*none).returncode == 0
    r = cli(*none[1:], "--exclude-pen", "all")
    assert r.returncode == 0 and "1 up to date" in r.stderr, r.stderr


def test_shards_are_disjoint_and_cover(tmp_path, cli, make_slide):
    slides = [make_slide(f"s{i}", "tissue", 256, 256) for i in range(3)]
    table = _table(tmp_path / "t.csv", [(f"s{i}", p) for i, p in enumerate(slides)])
    work = tmp_path / "w"
    for i in range(2):
        r = cli(
            "-q",
            "tile",
            "--slides",
            str(table),
            "--work",
            str(work),
            "--shard",
            f"{i}/2",
            "--patch-size",
            "64",
            "--tissue",
            "none",
        )
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (work / "patches").glob("*.zarr")) == [
        "s0.zarr",
        "s1.zarr",
        "s2.zarr",
    ]
    r = cli("tile", "--slides", str(table), "--work", str(work), "--shard", "2/2")
    assert r.returncode == 2 and "shard" in r.stderr


def test_clam_h5_and_no_pixels(tmp_path, cli, make_slide):
    slide = make_slide("c", "tissue", 512, 512)
    work = tmp_path / "w"
    r = cli(
        "-q",
        "tile",
        str(slide),
        "--work",
        str(work),
        "--patch-size",
        "64",
        "--level",
        "1",
        "--no-pixels",
        "--clam-h5",
    )
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(work / "patches" / "c.zarr")
    assert not store.has_pixels and store.level == 1 and store.patch_size_level0 == 128
    with h5py.File(work / "patches" / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], store.coords)
        assert f["coords"].dtype == np.int64
        assert f["coords"].attrs["patch_size"] == 64 and f["coords"].attrs["patch_level"] == 1
    # coords-only store reads its pixels from the slide
    px = store.read_patches(0, 2)
    assert px.shape == (2, 64, 64, 3)
    with pytest.raises(StoreError, match="no pixels"):
        store.pixels(0, 1)


def test_bad_options_exit_2(tmp_path, cli, make_slide):
    slide = make_slide("b", "tissue", 256, 256)
    for extra in (
        ["--level", "0", "--mpp", "0.5"],
        ["--min-tissue", "2"],
        ["--patch-size", "0"],
        ["--processes", "0"],
        ["--mpp", "nan"],
    ):
        r = cli("tile", str(slide), "--work", str(tmp_path / "w"), *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_sigkill_mid_slide_then_resume_is_identical(tmp_path, make_slide):
    """Kill the real CLI while it writes a store; the rerun finishes and equals a clean run."""
    slide = make_slide("big", "tissue", 1536, 1536, tile_px=256)
    args = [str(slide), "--patch-size", "32", "--tissue", "none", "--workers", "1"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "wsi_mil", "-q", "tile", *args, "--work", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    patches = killed / "patches"
    deadline = time.time() + 120
    caught = False
    while time.time() < deadline and proc.poll() is None:
        tmps = list(patches.glob(".big.zarr.tmp-*")) if patches.exists() else []
        if tmps and any((tmps[0] / "pixels").glob("c.*")):
            os.kill(proc.pid, signal.SIGKILL)
            caught = True
            break
        time.sleep(0.01)
    proc.wait()
    assert caught, "the run finished before it could be killed mid-slide"
    assert proc.returncode == -signal.SIGKILL
    # nothing that looks complete: no final store, and the temp store is refused
    assert not (patches / "big.zarr").exists()
    tmp_store = next(patches.glob(".big.zarr.tmp-*"))
    with pytest.raises(StoreError, match="incomplete"):
        PatchStore.open(tmp_store)
    env = {**os.environ}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(patches.glob(".big.zarr.tmp-*"))  # the stale temp store was cleaned up
    r = subprocess.run(
        [sys.executable, "-m", "wsi_mil", "-q", "tile", *args, "--work", str(clean)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    _same_store(patches / "big.zarr", clean / "patches" / "big.zarr")


def test_default_tissue_finds_cells_in_a_one_channel_fluorescence_image(tmp_path, cli):
    """Cell imaging: a uint16 one-channel OME-TIFF, bright nuclei on a dark field. The
    default mask (no saturation in grey images) keeps the patches with nuclei only."""
    import tifffile

    rng = np.random.default_rng(0)
    h, w, patch = 512, 768, 128
    yy, xx = np.mgrid[0:h, 0:w]
    img = 400 + rng.normal(0, 30, (h, w))  # camera offset + noise, 16-bit counts
    centres = [(64, 64), (70, 600), (300, 330), (450, 700)]
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 30**2] += 9000
    tifffile.imwrite(
        tmp_path / "cells.ome.tif", np.clip(img, 0, 65535).astype(np.uint16), ome=True,
        tile=(128, 128), metadata={"axes": "YX"},
    )  # fmt: skip
    table = _table(tmp_path / "s.csv", [("cells", tmp_path / "cells.ome.tif")])
    r = cli("-q", "tile", "--slides", str(table), "--work", str(tmp_path / "w"),
            "--patch-size", str(patch), "--no-pixels")  # fmt: skip
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(tmp_path / "w" / "patches" / "cells.zarr")
    kept = {(int(x) // patch, int(y) // patch) for x, y in store.coords}
    with_cells = {(cx // patch, cy // patch) for cy, cx in centres}
    assert with_cells <= kept and len(kept) <= 2 * len(with_cells), kept


def test_empty_store_of_older_tissue_scores_is_made_again(tmp_path, cli):
    """Stores tiled before grey images had a tissue score are empty for every grey image:
    a rerun makes such empty stores again; current ones (and stores with patches) stay."""
    import tifffile
    import zarr

    rng = np.random.default_rng(0)
    blank = np.clip(300 + rng.normal(0, 20, (256, 384)), 0, 65535).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "blank.ome.tif", blank, ome=True, tile=(128, 128), metadata={"axes": "YX"}
    )
    table = _table(tmp_path / "s.csv", [("blank", tmp_path / "blank.ome.tif")])
    args = ("tile", "--slides", str(table), "--work", str(tmp_path / "w"), "--patch-size", "64")
    r = cli(*args)
    assert r.returncode == 0 and "1 done" in r.stderr, r.stderr  # no tissue: empty + warning
    assert "0 done, 1 up to date" in cli(*args).stderr
    g = zarr.open_group(str(tmp_path / "w" / "patches" / "blank.zarr"), mode="r+")
    attrs = dict(g.attrs)
    del attrs["tissue_scores"]  # as an older version wrote it
    g.attrs.clear()
    g.attrs.update(attrs)
    assert "1 done, 0 up to date" in cli(*args).stderr


def test_clam_h5_follows_the_store(tmp_path, cli, make_slide):
    """A CLAM coords file of an older tiling was kept next to a rebuilt store and then
    taken as current: CLAM/TRIDENT would have read the wrong grid."""
    slide = make_slide("c", "tissue", 512, 512)
    work = tmp_path / "w"
    h5 = work / "patches" / "c.h5"
    base = ("-q", "tile", str(slide), "--work", str(work), "--tissue", "none", "--no-pixels")

    def h5_grid() -> tuple[int, int]:
        with h5py.File(h5, "r") as f:
            return len(f["coords"]), int(f["coords"].attrs["patch_size"])

    assert cli(*base, "--patch-size", "100", "--clam-h5").returncode == 0
    assert h5_grid() == (36, 100)
    assert cli(*base, "--patch-size", "64").returncode == 0  # rebuilt without --clam-h5
    assert not h5.exists()
    assert cli(*base, "--patch-size", "100", "--clam-h5").returncode == 0
    with h5py.File(h5, "r+") as f:  # an h5 edited by hand no longer matches the store
        f["coords"].attrs["patch_size"] = 50
    r = cli(*base, "--patch-size", "100", "--clam-h5")  # the store is current, the h5 is not
    assert r.returncode == 0, r.stderr
    assert h5_grid() == (36, 100)


def test_mpp_that_makes_one_patch_larger_than_the_slide_fails_the_slide(tmp_path, cli):
    """A small image at a huge --mpp (or a wrong recorded mpp) would read a window of
    gigabytes for one patch: the slide fails with the largest --mpp at which one patch
    covers it, the others finish. A patch somewhat larger than a small image is fine."""
    from slide_factory import test_image

    small = make_pyramidal_tiff(tmp_path / "small.tiff", test_image(300, 200, seed=1), mpp=0.5)
    big = make_pyramidal_tiff(tmp_path / "big.tiff", test_image(1200, 1000, seed=2), mpp=0.5)
    args = ("-q", "tile", str(small), str(big), "-w", "W", "--tissue", "none", "--patch-size", "64")
    r = cli(*args, "--mpp", "2000", cwd=tmp_path)  # 64 px patches of 256,000 level-0 px
    assert r.returncode == 1 and "Traceback" not in r.stderr
    rows = {
        r_["slide_id"]: r_["reason"] for r_ in csv.DictReader(open(tmp_path / "W" / "failures.csv"))
    }
    assert set(rows) == {"small", "big"}
    assert "spans 256,000 level-0 px, more than the whole slide (200 x 300 px" in rows["small"]
    assert "use --mpp 2.34 or less" in rows["small"]  # 64 px * 2.34 / 0.5 <= 300 px
    assert "use --mpp 9.37 or less" in rows["big"]  # rounded down: 9.375 would not fit
    r = cli(*args, "--mpp", "4", "--overwrite", cwd=tmp_path)  # 512 level-0 px: padded patches
    assert r.returncode == 0, r.stderr
    assert len(PatchStore.open(tmp_path / "W" / "patches" / "small.zarr")) == 1
    assert len(PatchStore.open(tmp_path / "W" / "patches" / "big.zarr")) == 3 * 2


@pytest.mark.parametrize(
    "field,value",
    [("mpp", float("nan")), ("mpp", float("inf")), ("slide_mpp", float("nan")),
     ("slide_mpp", float("inf")), ("slide_mpp", 0.0), ("mpp_tolerance", -1.0),
     ("mpp_tolerance", float("nan"))],
)  # fmt: skip
def test_non_finite_or_negative_resolutions_are_refused(tmp_path, field, value):
    from wsi_mil.config import TileConfig
    from wsi_mil.errors import ConfigError
    from wsi_mil.tiling.tile import validate_config

    validate_config(TileConfig(work=tmp_path, mpp=0.5, slide_mpp=0.25))  # fine
    cfg = TileConfig(work=tmp_path, **{"mpp": 0.5, field: value})
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        validate_config(cfg)


def test_mpp_far_finer_than_the_slide_fails_the_slide(tmp_path, cli):
    """Enlarging patches more than MAX_UPSAMPLE times (an --mpp in the wrong unit, or a
    wrong recorded mpp) fails the slide instead of filling the disk with blown-up pixels."""
    from slide_factory import test_image

    slide = make_pyramidal_tiff(tmp_path / "s.tiff", test_image(120, 100, seed=1), mpp=0.5)
    args = ("-q", "tile", str(slide), "-w", "W", "--tissue", "none", "--patch-size", "64")
    r = cli(*args, "--mpp", "0.05", cwd=tmp_path)  # 10x finer: 64 px patches from 6 px
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (row,) = list(csv.DictReader(open(tmp_path / "W" / "failures.csv")))
    assert "--mpp 0.05 is 10x finer than the slide's level 0 (0.5 mpp)" in row["reason"]
    assert "enlarged from 6 px" in row["reason"] and "use --mpp 0.0625 or more" in row["reason"]
    assert not (tmp_path / "W" / "patches" / "s.zarr").exists()
    r = cli(*args, "--mpp", "0.0625", cwd=tmp_path)  # 8x: allowed
    assert r.returncode == 0, r.stderr
    assert PatchStore.open(tmp_path / "W" / "patches" / "s.zarr").patch_size_level == 8
