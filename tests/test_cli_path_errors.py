"""Output folders that cannot be made or written, and a --work without patch stores: one
``error:`` line and exit 2 from every command (never an internal error or a failure per
slide), a traceback only with --debug. Real CLI calls on tiny inputs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from bag_factory import make_bags, write_bags, write_table

from wsi_mil.errors import path_error

ENV = {"OMP_NUM_THREADS": "1"}
#: a folder the kernel refuses to make anything in, even for root
PROC = Path("/proc")
needs_proc = pytest.mark.skipif(
    not (PROC / "self").exists(), reason="needs Linux /proc (no folders can be made in it)"
)


def _one_error(r, *says: str) -> str:
    """Exit 2 and one short ``error:`` line on stderr (after warnings, if any) that says ``says``."""
    err = r.stderr
    assert r.returncode == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "ERROR" not in err and "FAILED" not in err, err  # no failure per slide
    line = errors[0]
    assert len(line) < 300, line
    for s in says:
        assert s in line, line
    return line


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "table.csv"
    f.write_text("not a folder\n")
    return f


def _slides(tmp_path: Path, ids=("a", "b")) -> Path:
    t = tmp_path / "s.csv"
    t.write_text("slide_id,path\n" + "".join(f"{i},{i}.tiff\n" for i in ids))
    return t


def _patch_store(path: Path) -> None:
    """A tiny complete patch store (4 random 16 px patches)."""
    from wsi_mil.tiling.patch_store import PatchStoreWriter

    coords = np.array([[0, 0], [16, 0], [0, 16], [16, 16]], np.int64)
    attrs = {
        "level": 0, "downsample": 1.0, "patch_size": 16, "patch_size_level": 16, "stride": 16,
        "level0_width": 32, "level0_height": 32, "mpp": 0.5, "slide_path": "",
    }  # fmt: skip
    pix = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with PatchStoreWriter(path, coords, attrs) as w:
        w.write_pixels(0, pix)
        w.commit()


# ---------------------------------------------------------------- tile, extract, synth
def test_tile_with_a_work_folder_under_a_file(cli, tmp_path):
    f = _file(tmp_path)
    r = cli("tile", "--slides", str(_slides(tmp_path)), "--work", str(f / "W"), env=ENV)
    _one_error(r, f"cannot create/write {f / 'W'}", "Not a directory", f"{f} is a file", "--work")
    r = cli("tile", "--slides", str(_slides(tmp_path)), "--work", str(f / "W"), "--debug", env=ENV)
    assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr  # --debug still shows it
    assert f.read_text() == "not a folder\n"


@needs_proc
def test_tile_with_a_work_folder_that_cannot_be_made(cli, tmp_path):
    r = cli("tile", "--slides", str(_slides(tmp_path)), "--work", "/proc/nope", env=ENV)
    _one_error(r, "cannot create/write /proc/nope", "--work")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_tile_with_a_read_only_work_folder(cli, tmp_path):
    ro = tmp_path / "ro"
    (ro / "W").mkdir(parents=True)
    ro.chmod(0o555)
    (ro / "W").chmod(0o555)
    try:
        r = cli("tile", "--slides", str(_slides(tmp_path)), "--work", str(ro / "W"), env=ENV)
        _one_error(r, "cannot create/write", "Permission denied", "--work")
        r = cli("tile", "--slides", str(_slides(tmp_path)), "--work", str(ro / "new"), env=ENV)
        _one_error(r, f"cannot create/write {ro / 'new'}", "Permission denied")
    finally:
        (ro / "W").chmod(0o755)
        ro.chmod(0o755)


def test_extract_with_a_work_folder_under_a_file(cli, tmp_path):
    f = _file(tmp_path)
    r = cli("extract", "--slides", str(_slides(tmp_path)), "--work", str(f / "W"),
            "--feature-dim", "8", "--device", "cpu", env=ENV)  # fmt: skip
    _one_error(r, f"cannot create/write {f / 'W'}", f"{f} is a file", "--work")


def test_extract_without_patch_stores_is_one_usage_error(cli, tmp_path):
    work = tmp_path / "wbad" / "nowork"
    args = ("extract", "--slides", str(_slides(tmp_path)), "--feature-dim", "8", "--device", "cpu")
    r = cli(*args, "--work", str(work), env=ENV)
    _one_error(r, "none of the 2 slides has a patch store", str(work / "patches"), "wsi-mil tile")
    assert not (tmp_path / "wbad").exists()  # no features/, no failures.csv
    # --patches DIR: that folder is named
    (tmp_path / "P").mkdir()
    r = cli(*args, "--work", str(work), "--patches", str(tmp_path / "P"), env=ENV)
    _one_error(r, f"has a patch store in {tmp_path / 'P'}", "--patches")
    assert not (tmp_path / "wbad").exists()
    # decided over all slides of the call: shard 1/2 holds only 'b' (no store) while 'a'
    # has one, so b is a failed slide (exit 1), as without --shard
    _patch_store(work / "patches" / "a.zarr")
    r = cli("-q", *args, "--work", str(work), "--shard", "1/2", env=ENV)
    assert r.returncode == 1, r.stderr
    assert "patch store not found" in r.stderr and "Traceback" not in r.stderr
    assert "b" in (work / "failures.csv").read_text()


def test_synth_into_a_folder_under_a_file(cli, tmp_path):
    f = _file(tmp_path)
    r = cli("synth", str(f / "S"), "-n", "1", "--width", "256", "--height", "256", env=ENV)
    _one_error(r, f"cannot create/write {f / 'S'}", f"{f} is a file", "OUT folder")


# ---------------------------------------------------------------- train, predict, run
@pytest.fixture
def bags(tmp_path):
    """6 labelled feature stores in feats/ and their table."""
    b = make_bags(6, dim=8, n_min=5, n_max=9)
    write_bags(b, tmp_path / "feats")
    return write_table(b, tmp_path / "slides.csv")


def test_train_with_a_run_folder_under_a_file(cli, tmp_path, bags):
    f = _file(tmp_path)
    args = ("--slides", str(bags), "--features", str(tmp_path / "feats"), "--run", str(f / "R"),
            "--epochs", "1", "--device", "cpu", "--val-frac", "0")  # fmt: skip
    r = cli("-q", "train", *args, env=ENV)
    _one_error(r, f"cannot create/write {f / 'R'}", f"{f} is a file", "--run")
    r = cli("-q", "train", *args, "--debug", env=ENV)
    assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr


def test_predict_into_an_out_dir_under_a_file_is_one_error(cli, tmp_path, bags):
    from wsi_mil.config import TrainConfig
    from wsi_mil.slides.table import read_slide_table
    from wsi_mil.train import train

    run = tmp_path / "run"
    cfg = TrainConfig(
        work=tmp_path / "w", run=run, features=tmp_path / "feats", epochs=1, device="cpu",
        val_frac=0.0,
    )  # fmt: skip
    train(cfg, read_slide_table(bags), progress=False)
    # another cohort (ids not in the run: no warning about them)
    cohort = make_bags(6, dim=8, n_min=5, n_max=9, seed=1)
    for i, b in enumerate(cohort):
        b.slide_id = f"other{i}"
    write_bags(cohort, tmp_path / "feats2")
    table = write_table(cohort, tmp_path / "cohort.csv")
    f = _file(tmp_path)
    r = cli("predict", "--slides", str(table), "--features", str(tmp_path / "feats2"),
            "--run", str(run), "--out-dir", str(f / "O"), "--work", str(tmp_path / "w2"),
            "--device", "cpu", env=ENV)  # fmt: skip
    _one_error(r, f"cannot create/write {f / 'O'}", f"{f} is a file", "--out-dir")
    assert not (tmp_path / "w2").exists()  # no failures.csv: no slide was tried
    assert not list(tmp_path.rglob("predictions.csv"))


def test_run_stops_on_a_stage_output_folder_under_a_file(cli, tmp_path, bags):
    """'wsi-mil run' has its own per-stage handler: the same one line and exit 2."""
    f = _file(tmp_path)
    (tmp_path / "c.yaml").write_text(
        f"slides: {bags}\nfeatures: feats\ndevice: cpu\n"
        f"train:\n  run: {f / 'R'}\n  epochs: 1\n  val-frac: 0\n"
    )
    r = cli("-q", "run", "--config", "c.yaml", "--stages", "train", cwd=tmp_path, env=ENV)
    _one_error(r, f"cannot create/write {f / 'R'}", f"{f} is a file")
    assert "STOPPED (error)" in r.stdout, r.stdout


# ---------------------------------------------------------------- the mapping itself
@pytest.mark.parametrize(
    "exc, says",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "cannot write the output: No space"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/y"), "cannot create/write /x/y: Read"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x"), "/x: Permission denied"),
        (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "/d"), "/d: Is a directory"),
    ],
)
def test_path_oserrors_become_usage_errors(exc, says):
    err = path_error(exc, "check the --work path and its permissions")
    assert err is not None and err.exit_code == 2
    assert says in str(err) and str(err).endswith("(check the --work path and its permissions)")


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EIO, "I/O error"), PermissionError(errno.EACCES, "denied"), ValueError("x")],
)
def test_other_errors_stay_internal(exc):
    """Errors about no path (a read error, a refusal without a file name) are not the
    user's path: they stay internal errors, with a traceback under --debug."""
    assert path_error(exc, "fix") is None
