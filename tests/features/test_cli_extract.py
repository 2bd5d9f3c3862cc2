"""`wsi-mil extract` in real subprocesses: exit codes, failures.csv, and SIGKILL + re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest


def _slides_csv(path: Path, ids: list[str]) -> Path:
    path.write_text("slide_id,path\n" + "".join(f"{i},\n" for i in ids))
    return path


def _read_all(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    out = {}
    for p in sorted(folder.glob("*.h5")):
        with h5py.File(p, "r") as f:
            out[p.stem] = (f["features"][:], f["coords"][:], dict(f.attrs))
    return out


def test_cli_exit_codes_and_failures(tmp_path, fx, cli):
    work = tmp_path / "W"
    fx.write_random_store(work / "patches" / "a.zarr", n=5, patch_px=32)
    csv = _slides_csv(tmp_path / "slides.csv", ["a", "nostore"])
    r = cli(
        "-q",
        "extract",
        "--slides",
        str(csv),
        "--work",
        str(work),
        "--feature-dim",
        "8",
        "--batch-size",
        "4",
    )
    assert r.returncode == 1, r.stderr
    assert "nostore" in r.stderr and "patch store not found" in r.stderr
    assert "Traceback" not in r.stderr
    assert "randomly initialised" in r.stderr  # the untrained-encoder warning, once
    assert r.stderr.count("randomly initialised") == 1
    (tag_dir,) = (work / "features").iterdir()
    assert (tag_dir / "a.h5").is_file() and (tag_dir / "encoder.json").is_file()
    assert "nostore" in (work / "failures.csv").read_text()
    assert not list(work.rglob("*.lock")), "finished runs leave no lock files"
    # bad option values: exit 2, one line
    r = cli(
        "extract", "--slides", str(csv), "--work", str(work), "--weights", str(tmp_path / "none.pt")
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cli("extract", "--slides", str(csv), "--work", str(work), "--encoder", "timm:resnet18")
    assert r.returncode == 2 and "timm" in r.stderr
    # config file keys = long option names
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extract:\n  feature-dim: 8\n  batch-size: 2\n")
    r = cli(
        "-q", "extract", "--config", str(cfg), "--work", str(work), str(work / "patches" / "a.zarr")
    )
    assert r.returncode == 0, r.stderr
    assert "1 up to date" in r.stderr


def test_feature_store_records_an_absolute_slide_path(tmp_path, fx, cli):
    """Run from the table's folder with relative paths: the store still names the slide
    absolutely, so predict and heatmap find it from anywhere."""
    fx.write_random_store(tmp_path / "W" / "patches" / "a.zarr", n=3, patch_px=32)
    (tmp_path / "slides.csv").write_text("slide_id,path\na,img/a.tiff\n")
    r = cli("-q", "extract", "--slides", "slides.csv", "--work", "W", "--feature-dim", "8",
            cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (store,) = (tmp_path / "W" / "features").glob("*/a.h5")
    with h5py.File(store, "r") as f:
        assert f.attrs["slide_path"] == str((tmp_path / "img" / "a.tiff").resolve())


def _freeze_inside_a_slide(
    proc: subprocess.Popen, feat_root: Path, ids: list[str], timeout_s: float = 120
) -> str:
    """SIGSTOP ``proc`` while one of ``ids`` is half written; returns that slide id.

    Deterministic, whatever the machine's speed: the process is frozen first, then the
    state is checked (its temp file exists, its final file does not). If the slide
    finished between our look and the stop, the process resumes and we try the next one.
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        for sid in ids:
            if not list(feat_root.glob(f"*/.{sid}.h5.tmp-*")):
                continue
            os.kill(proc.pid, signal.SIGSTOP)
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once it is stopped
            if not os.WIFSTOPPED(status):
                proc.returncode = os.waitstatus_to_exitcode(status)
                raise AssertionError(f"extract exited ({proc.returncode}) before it was stopped")
            tmps = list(feat_root.glob(f"*/.{sid}.h5.tmp-*"))
            if tmps and not list(feat_root.glob(f"*/{sid}.h5")):
                return sid
            os.kill(proc.pid, signal.SIGCONT)  # lost the race: that slide just finished
        time.sleep(0.002)
    raise AssertionError("extract finished (or never started s1/s2) before it could be stopped")


@pytest.mark.slow  # ~8 s idle, ~30 s on a loaded 2-core machine (three CLI runs)
def test_sigkill_during_a_slide_then_rerun_completes_identically(tmp_path, fx):
    work = tmp_path / "W"
    ids = ["s0", "s1", "s2"]
    for i, sid in enumerate(ids):
        fx.write_random_store(
            work / "patches" / f"{sid}.zarr", n=240, patch_px=32, seed=i, chunk_patches=16
        )
    csv = _slides_csv(tmp_path / "slides.csv", ids)
    args = [
        sys.executable,
        "-m",
        "wsi_mil",
        "-q",
        "extract",
        "--slides",
        str(csv),
        "--work",
        str(work),
        "--feature-dim",
        "16",
        "--batch-size",
        "16",
    ]
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    feat_root = work / "features"
    try:
        killed = _freeze_inside_a_slide(proc, feat_root, ids[1:])
    finally:
        proc.kill()  # SIGKILL, which also ends a stopped process
        proc.wait(timeout=30)
    n_before = ids.index(killed)
    (tag_dir,) = feat_root.iterdir()
    for sid in ids[:n_before]:
        assert (tag_dir / f"{sid}.h5").is_file()
    for sid in ids[n_before:]:
        assert not (tag_dir / f"{sid}.h5").exists(), f"killed in {killed}: {sid} looks complete"
    assert list(tag_dir.glob(f".{killed}.h5.tmp-*")), "expected the killed run's temp file"

    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(ids) - n_before} done, {n_before} up to date" in r.stderr
    assert not list(tag_dir.glob(".*.tmp-*")), "temp files of the killed run are cleaned up"
    assert not list(work.rglob("*.lock")), "the killed run's lock file is removed too"
    after_kill = _read_all(tag_dir)

    r = subprocess.run(args + ["--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    clean = _read_all(tag_dir)
    assert sorted(after_kill) == sorted(clean) == ids
    for sid in ids:
        fa, ca, aa = after_kill[sid]
        fb, cb, ab = clean[sid]
        assert np.array_equal(fa, fb) and np.array_equal(ca, cb) and fa.shape == (240, 16)
        assert {k: str(v) for k, v in aa.items()} == {k: str(v) for k, v in ab.items()}
