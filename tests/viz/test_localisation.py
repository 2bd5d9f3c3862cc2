"""Localisation maths on hand-made cases, markers.csv parsing and the run-folder report."""

from __future__ import annotations

import numpy as np
import pytest
from viz.viz_helpers import write_attention_file

from wsi_mil.errors import ConfigError, StoreError
from wsi_mil.viz.localisation import (
    find_markers_csv,
    localisation_report,
    patch_auc,
    patch_marker_overlap,
    read_markers,
    slide_localisation,
    summarise,
    top_k_hit,
    top_k_indices,
)


def test_overlap_edges_are_exclusive_and_corners_count():
    # patches of side 10; marker [20, 30) x [20, 30)
    coords = np.array(
        [
            [10, 10],  # covers [10, 20): touches x0=20 only at the excluded edge -> no
            [11, 11],  # covers [11, 21): shares pixel (20, 20) -> yes
            [29, 29],  # covers [29, 39): shares pixel (29, 29) -> yes
            [30, 20],  # starts at x1=30 (exclusive) -> no
            [22, 22],  # inside -> yes
            [20, 40],  # below -> no
        ]
    )
    hit = patch_marker_overlap(coords, 10, np.array([[20, 20, 30, 30]]))
    assert hit.tolist() == [False, True, True, False, True, False]


def test_overlap_any_of_several_markers_and_none():
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    boxes = np.array([[5, 5, 6, 6], [150, 50, 160, 110]])
    assert patch_marker_overlap(coords, 50, boxes).tolist() == [True, False, False]
    assert patch_marker_overlap(coords, 60, boxes).tolist() == [True, True, False]
    assert not patch_marker_overlap(coords, 50, np.zeros((0, 4))).any()


def test_marker_bigger_than_patch_contains_it():
    assert patch_marker_overlap(np.array([[40, 40]]), 8, np.array([[0, 0, 100, 100]])).all()


def test_top_k_indices_order_and_ties():
    a = np.array([0.1, 0.4, 0.4, 0.05, 0.05])
    assert top_k_indices(a, 3).tolist() == [1, 2, 0]
    assert top_k_indices(a, 99).tolist() == [1, 2, 0, 3, 4]
    assert top_k_indices(a, 0).tolist() == []


def test_top_k_hit():
    a = np.array([0.5, 0.3, 0.2])
    assert top_k_hit(a, np.array([True, False, False]), 1)
    assert not top_k_hit(a, np.array([False, False, True]), 1)
    assert not top_k_hit(a, np.array([False, False, True]), 2)
    assert top_k_hit(a, np.array([False, False, True]), 3)


def test_patch_auc_perfect_reversed_ties_and_undefined():
    hit = np.array([False, False, True, True])
    assert patch_auc(np.array([0.1, 0.2, 0.3, 0.4]), hit) == 1.0
    assert patch_auc(np.array([0.4, 0.3, 0.2, 0.1]), hit) == 0.0
    assert patch_auc(np.full(4, 0.25), hit) == 0.5
    # one of two hits outranks one of two misses: 3 of 4 pairs ordered
    assert patch_auc(np.array([0.1, 0.3, 0.2, 0.4]), hit) == pytest.approx(0.75)
    assert patch_auc(np.array([0.1, 0.2]), np.array([True, True])) is None
    assert patch_auc(np.array([0.1, 0.2]), np.array([False, False])) is None


def test_slide_localisation_hand_case():
    coords = np.array([[0, 0], [10, 0], [20, 0], [30, 0]])
    att = np.array([0.1, 0.2, 0.6, 0.1])
    boxes = np.array([[22, 2, 25, 5]])  # inside patch 2 only
    r = slide_localisation(att, coords, 10, boxes, k=2)
    assert r["n_marker_patches"] == 1
    assert r["top1_hit"] and r["topk_hit"]
    assert r["patch_auc"] == 1.0
    assert r["top_patch_level0_xy"] == [20, 0]
    r2 = slide_localisation(np.array([0.6, 0.2, 0.1, 0.1]), coords, 10, boxes, k=2)
    assert not r2["top1_hit"] and not r2["topk_hit"]
    # patch 2 (0.1) ties with patch 3 (miss) and is below 0 and 1: 0.5 of 3 pairs
    assert r2["patch_auc"] == pytest.approx(0.5 / 3)


def test_summarise_counts_only_positives_with_markers():
    rows = [
        {"positive": True, "n_markers": 2, "top1_hit": True, "topk_hit": True, "patch_auc": 0.9},
        {"positive": True, "n_markers": 1, "top1_hit": False, "topk_hit": True, "patch_auc": 0.5},
        {"positive": True, "n_markers": 0, "top1_hit": False, "topk_hit": False, "patch_auc": None},
        {
            "positive": False,
            "n_markers": 0,
            "top1_hit": False,
            "topk_hit": False,
            "patch_auc": None,
        },
    ]
    s = summarise(rows, k=4)
    assert s["n_slides"] == 4
    assert s["n_positive"] == 3
    assert s["n_positive_with_markers"] == 2
    assert s["top1_hit_rate"] == 0.5
    assert s["topk_hit_rate"] == 1.0
    assert s["mean_patch_auc"] == pytest.approx(0.7)
    empty = summarise(rows[3:], k=4)
    assert empty["top1_hit_rate"] is None and empty["mean_patch_auc"] is None


def test_read_markers_synth_layout(tmp_path):
    p = tmp_path / "markers.csv"
    p.write_text(
        "slide_id,shape,x0,y0,x1,y1,colour,thickness,filled\n"
        "a,circle,10,20,30,40,red,3,0\n"
        "a,rectangle,50,60,70,80,blue,2,1\n"
        "b,ellipse,1,2,3,4,green,1,0\n"
    )
    m = read_markers(p)
    assert sorted(m) == ["a", "b"]
    assert m["a"].tolist() == [[10, 20, 30, 40], [50, 60, 70, 80]]
    assert m["a"].dtype == np.int64


def test_read_markers_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_markers(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,x,y\na,1,2\n")
    with pytest.raises(ConfigError, match="missing column"):
        read_markers(bad)
    bad.write_text("slide_id,x0,y0,x1,y1\na,1,2,x,4\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_markers(bad)


def test_find_markers_csv_order(tmp_path):
    (tmp_path / "table").mkdir()
    (tmp_path / "slides").mkdir()
    assert (
        find_markers_csv(None, tmp_path / "table" / "s.csv", tmp_path / "slides" / "a.tif") is None
    )
    (tmp_path / "slides" / "markers.csv").write_text("slide_id,x0,y0,x1,y1\n")
    got = find_markers_csv(None, tmp_path / "table" / "s.csv", tmp_path / "slides" / "a.tif")
    assert got == tmp_path / "slides" / "markers.csv"
    (tmp_path / "table" / "markers.csv").write_text("slide_id,x0,y0,x1,y1\n")
    got = find_markers_csv(None, tmp_path / "table" / "s.csv", tmp_path / "slides" / "a.tif")
    assert got == tmp_path / "table" / "markers.csv"
    explicit = tmp_path / "m.csv"
    explicit.write_text("slide_id,x0,y0,x1,y1\n")
    assert find_markers_csv(explicit, None, None) == explicit
    with pytest.raises(ConfigError, match="--markers"):
        find_markers_csv(tmp_path / "missing.csv")


def test_localisation_report_over_a_run(tmp_path):
    run = tmp_path / "run"
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100]])
    markers = tmp_path / "markers.csv"
    markers.write_text(
        "slide_id,shape,x0,y0,x1,y1,colour,thickness,filled\n"
        "hit,circle,120,120,150,150,red,3,0\n"  # in patch 3
        "miss,circle,10,10,40,40,red,3,0\n"  # in patch 0
        "unlabelled,circle,110,10,130,30,red,3,0\n"  # in patch 1
    )
    a = np.array([0.1, 0.2, 0.3, 0.4])
    write_attention_file(run / "attention" / "hit.h5", coords, a, patch_size_level0=100, label=1)
    write_attention_file(run / "attention" / "miss.h5", coords, a, patch_size_level0=100, label=1)
    write_attention_file(run / "attention" / "neg.h5", coords, a, patch_size_level0=100, label=0)
    write_attention_file(
        run / "attention" / "unlabelled.h5", coords, a[::-1], patch_size_level0=100, label=-1
    )
    rep = localisation_report(run, markers, k=2)
    by = {r["slide_id"]: r for r in rep["slides"]}
    assert by["hit"]["positive"] and by["hit"]["top1_hit"] and by["hit"]["patch_auc"] == 1.0
    assert by["miss"]["positive"] and not by["miss"]["top1_hit"]
    assert by["miss"]["patch_auc"] == 0.0
    assert not by["neg"]["positive"]
    # unknown label + markers counts as positive; attention 0.4, 0.3 -> patch 1 is 2nd
    assert by["unlabelled"]["positive"] and not by["unlabelled"]["top1_hit"]
    assert by["unlabelled"]["topk_hit"]
    assert rep["n_positive_with_markers"] == 3
    assert rep["top1_hit_rate"] == pytest.approx(1 / 3)
    assert rep["topk_hit_rate"] == pytest.approx(2 / 3)
    assert rep["mean_patch_auc"] == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)


def test_localisation_report_needs_attention(tmp_path):
    with pytest.raises(StoreError, match="wsi-mil predict"):
        localisation_report(tmp_path, None)
