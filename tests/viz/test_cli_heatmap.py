"""`wsi-mil heatmap` end to end in a real subprocess on tiny real slides and attention files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from viz.viz_helpers import blueness, grid_coords, white_slide, write_attention_file

W, H, PS = 1024, 768, 128  # level-0 size, patch side


@pytest.fixture
def run_with_slides(tmp_path: Path) -> Path:
    """Two white slides; 'pos' has a marker where its attention peaks, 'neg' has none."""
    sdir = tmp_path / "slides"
    sdir.mkdir()
    coords = grid_coords(W, H, PS)  # 8 x 6 patches
    for sid, label in (("pos", 1), ("neg", 0)):
        white_slide(sdir / f"{sid}.tiff", W, H)
        att = np.full(len(coords), 1.0)
        hot = np.flatnonzero((coords[:, 0] == 512) & (coords[:, 1] == 256))[0]
        att[hot] = 20.0
        write_attention_file(
            tmp_path / "run" / "attention" / f"{sid}.h5",
            coords,
            att / att.sum(),
            slide_path=sdir / f"{sid}.tiff",
            patch_size_level0=PS,
            level0_size=(W, H),
            label=label,
            prob=0.9 if label else 0.1,
            split="test",
        )
    (sdir / "markers.csv").write_text(
        "slide_id,shape,x0,y0,x1,y1,colour,thickness,filled\npos,circle,540,280,600,340,red,4,0\n"
    )
    return tmp_path / "run"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_heatmap_end_to_end(cli, run_with_slides, processes):
    run = run_with_slides
    r = cli(
        "heatmap", "--run", str(run), "--style", "both", "--thumbnail-px", "512", "--top-k", "4",
        "--processes", processes,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    hm = run / "heatmaps"
    for sid in ("pos", "neg"):
        for suffix in ("", "_smooth", "_topk"):
            assert (hm / f"{sid}{suffix}.png").is_file()
    img = np.asarray(Image.open(hm / "pos.png").convert("RGB"))
    assert img.shape == (384, 512, 3)  # thumbnail of 1024 x 768 with longest side 512
    # hot patch (512, 256) at scale 1/2 -> box x [256, 320), y [128, 192): the bluest place
    b = blueness(img)
    assert b[128, 256] == b.max() > 200
    # true marker (540..600, 280..340) / 2 framed in green just outside it
    # (270..300, 140..170) in thumbnail px, 2 px frame outside it
    assert tuple(img[138, 285]) == (0, 200, 0) and tuple(img[171, 301]) == (0, 200, 0)
    assert tuple(img[155, 285]) == (255, 255, 255)
    strip = np.asarray(Image.open(hm / "pos_topk.png").convert("RGB"))
    assert strip.shape[1] > 4 * 150
    rep = json.loads((run / "localisation.json").read_text())
    assert rep["n_positive_with_markers"] == 1
    assert rep["top1_hit_rate"] == 1.0
    assert rep["mean_patch_auc"] > 0.9
    by = {s["slide_id"]: s for s in rep["slides"]}
    assert by["pos"]["top_patch_level0_xy"] == [512, 256]
    assert not by["neg"]["positive"]
    assert "top-attended patch on a marker: 100.0%" in r.stderr
    assert "localisation.json" in r.stderr
    # nothing left behind that looks like a half-written file
    assert not list(hm.glob(".*tmp*"))

    again = cli(
        "heatmap", "--run", str(run), "--style", "both", "--thumbnail-px", "512", "--top-k", "4"
    )
    assert again.returncode == 0
    assert "0 done, 2 up to date" in again.stderr
    changed = cli(
        "heatmap", "--run", str(run), "--style", "boxes", "--thumbnail-px", "256", "--top-k", "4"
    )
    assert "2 done, 0 up to date" in changed.stderr
    assert Image.open(hm / "pos.png").size == (256, 192)


def test_rewritten_identical_attention_is_up_to_date_changed_is_redrawn(cli, run_with_slides):
    """predict rewrites every attention file on each run: same content -> no redraw."""
    import os
    import shutil

    run = run_with_slides
    args = ("heatmap", "--run", str(run), "--thumbnail-px", "256", "--top-k", "2")
    assert cli(*args).returncode == 0
    att = run / "attention" / "pos.h5"
    copy = att.with_suffix(".bak")
    shutil.copyfile(att, copy)
    os.replace(copy, att)  # a new file (new inode and mtime), same bytes
    st = att.stat()
    os.utime(att, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert "0 done, 2 up to date" in cli(*args).stderr
    import h5py

    with h5py.File(att, "r+") as f:
        a = f["attention"][:]
        f["attention"][:] = a[::-1]  # other attention -> redrawn
    assert "1 done, 1 up to date" in cli(*args).stderr


def test_slide_id_shard_and_config_file(cli, run_with_slides, tmp_path):
    run = run_with_slides
    r = cli("-q", "heatmap", "--run", str(run), "--slide-id", "neg", "--top-k", "0")
    assert r.returncode == 0, r.stderr
    assert (run / "heatmaps" / "neg.png").is_file()
    assert not (run / "heatmaps" / "pos.png").exists()
    assert not (run / "heatmaps" / "neg_topk.png").exists()
    assert not (run / "localisation.json").exists()  # only for a whole run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"heatmap:\n  run: {run}\n  thumbnail-px: 300\n  top-k: 0\n")
    r = cli("heatmap", "--config", str(cfg), "--shard", "1/2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "1 done" in r.stderr  # shard 1 of 2 over sorted ids ['neg', 'pos'] -> pos
    assert Image.open(run / "heatmaps" / "pos.png").size == (300, 225)


def test_missing_slide_draws_on_blank_canvas_with_warning(cli, run_with_slides):
    run = run_with_slides
    (run.parent / "slides" / "pos.tiff").unlink()
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "256")
    assert r.returncode == 0, r.stderr
    assert "WARNING pos" in r.stderr and "not found" in r.stderr
    img = np.asarray(Image.open(run / "heatmaps" / "pos.png").convert("RGB"))
    assert img.shape == (192, 256, 3)
    assert blueness(img)[64, 128] > 200  # hot box at (512, 256) / 4 on white
    assert not (run / "heatmaps" / "pos_topk.png").exists()  # no pixels to crop
    assert (run / "heatmaps" / "neg_topk.png").is_file()
    # the markers file next to the (missing) slide is still found: localisation still works
    rep = json.loads((run / "localisation.json").read_text())
    assert rep["top1_hit_rate"] == 1.0


@pytest.mark.parametrize("processes", ["1", "2"])
def test_unreadable_slide_is_a_recorded_failure(cli, run_with_slides, processes):
    run = run_with_slides
    (run.parent / "slides" / "pos.tiff").write_bytes(b"not a tiff at all")
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "256", "--processes", processes)
    assert r.returncode == 1
    assert "FAILED pos" in r.stderr
    assert (run / "heatmaps" / "neg.png").is_file()
    assert not (run / "heatmaps" / "pos.png").exists()
    rows = list(csv.DictReader(open(run / "failures.csv")))
    assert [(x["stage"], x["slide_id"]) for x in rows] == [("heatmap", "pos")]


def test_slides_table_overrides_recorded_paths(cli, run_with_slides, tmp_path):
    run = run_with_slides
    moved = tmp_path / "moved"
    (run.parent / "slides").rename(moved)
    table = moved / "slides.csv"
    table.write_text("slide_id,path,label\npos,pos.tiff,1\nneg,neg.tiff,0\n")
    r = cli("heatmap", "--run", str(run), "--slides", str(table), "--thumbnail-px", "256")
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr
    assert (run / "heatmaps" / "pos_topk.png").is_file()
    assert json.loads((run / "localisation.json").read_text())["markers_csv"] == str(
        moved / "markers.csv"
    )


def _one_error_line(r) -> str:
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_clear_line(cli, run_with_slides, tmp_path):
    run = run_with_slides
    line = _one_error_line(cli("heatmap", "--run", str(tmp_path / "nope")))
    assert "does not exist" in line and "nope" in line
    (tmp_path / "empty_run").mkdir()
    line = _one_error_line(cli("heatmap", "--run", str(tmp_path / "empty_run")))
    assert "run 'wsi-mil predict" in line and "empty_run" in line
    line = _one_error_line(cli("heatmap", "--run", str(run), "--slide-id", "ghost"))
    assert "unknown slide id 'ghost'" in line and "neg, pos" in line
    line = _one_error_line(cli("heatmap", "--run", str(run), "--markers", str(tmp_path / "m.csv")))
    assert "m.csv" in line and "--markers" in line
    line = _one_error_line(cli("heatmap", "--run", str(run), "--max-alpha", "2"))
    assert "--max-alpha" in line
    line = _one_error_line(cli("heatmap", "--run", str(run), "--processes", "0"))
    assert "--processes must be >= 1" in line


def test_broken_attention_file_fails_that_slide_only(cli, run_with_slides):
    run = run_with_slides
    (run / "attention" / "bad.h5").write_bytes(b"\x89HDF garbage")
    markers = run.parent / "slides" / "markers.csv"
    r = cli(
        "heatmap",
        "--run",
        str(run),
        "--thumbnail-px",
        "128",
        "--top-k",
        "0",
        "--markers",
        str(markers),
    )
    assert r.returncode == 1
    assert "FAILED bad" in r.stderr and "bad.h5" in r.stderr
    assert (run / "heatmaps" / "pos.png").is_file()
    rep = json.loads((run / "localisation.json").read_text())
    assert "bad.h5" in rep["excluded"]["bad"] and rep["top1_hit_rate"] == 1.0


def test_bad_markers_table_given_explicitly_is_one_usage_error(cli, run_with_slides, tmp_path):
    run = run_with_slides
    bad = tmp_path / "badcols.csv"
    bad.write_text("slide_id,x,y\npos,1,2\n")
    r = cli("heatmap", "--run", str(run), "--markers", str(bad), "--overwrite", "-q")
    line = _one_error_line(r)  # not once per slide, and no batch summary
    assert "badcols.csv" in line and "not a markers table" in line
    assert not (run / "failures.csv").exists() and not (run / "heatmaps" / "pos.png").exists()


def test_bad_markers_table_found_next_to_the_slides_fails_its_slides_only(cli, run_with_slides):
    run = run_with_slides
    (run.parent / "slides" / "markers.csv").write_text("slide_id,x,y\npos,1,2\n")
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "256", "--top-k", "0")
    assert r.returncode == 1, r.stderr
    assert "FAILED pos" in r.stderr and "FAILED neg" in r.stderr
    assert "error:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    rows = list(csv.DictReader(open(run / "failures.csv")))
    assert sorted(x["slide_id"] for x in rows) == ["neg", "pos"]


def test_run_defaults_to_runs_default_like_train_and_predict(cli, run_with_slides, tmp_path):
    import shutil

    shutil.copytree(run_with_slides, tmp_path / "here" / "runs" / "default")
    r = cli("-q", "heatmap", "--slide-id", "neg", "--top-k", "0", cwd=tmp_path / "here")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "here" / "runs" / "default" / "heatmaps" / "neg.png").is_file()
    r = cli("-q", "heatmap", cwd=tmp_path)  # no run there: one clear line, exit 2
    assert r.returncode == 2 and "runs/default" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "coords_wh, offset, recorded, warns",
    [
        ((W - PS, H - 2 * PS), 0, (W - 2 * PS, H - 2 * PS), False),  # CLAM-like: patch extent only
        # CLAM pads edge patches: the extent predict records runs past the slide's edges
        ((W, H), PS // 2, (W + PS // 2, H + PS // 2), False),
        ((W - 2 * PS, H - PS), 0, (0, 0), False),  # no size recorded: inferred from the patches
        ((W, H), 0, (2 * W, H), True),  # recorded size larger than the slide
        ((2 * W, H), 0, (W, H), True),  # patches start outside the slide
    ],
)
def test_slide_size_check_warns_only_on_a_real_mismatch(
    cli, run_with_slides, coords_wh, offset, recorded, warns
):
    run = run_with_slides
    (run / "attention" / "neg.h5").unlink()
    coords = grid_coords(*coords_wh, PS) + offset
    write_attention_file(
        run / "attention" / "pos.h5",
        coords,
        np.full(len(coords), 1.0 / len(coords)),
        slide_path=run.parent / "slides" / "pos.tiff",
        patch_size_level0=PS,
        level0_size=recorded,
        label=1,
    )
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "128", "--top-k", "0")
    assert r.returncode == 0, r.stderr
    assert ("is it the same slide?" in r.stderr) == warns, r.stderr
    assert (run / "heatmaps" / "pos.png").is_file()


def test_localisation_summary_names_top_k_only_when_there_is_one(cli, run_with_slides):
    run = run_with_slides
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "128", "--top-k", "0")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "top-attended patch on a marker: 100.0%" in out, out
    assert "top-1" not in out and "any of top" not in out, out
    r = cli("heatmap", "--run", str(run), "--thumbnail-px", "128", "--top-k", "3")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "; any of top-3: 100.0%" in out, out
