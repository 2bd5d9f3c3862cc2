"""Slide tables: contract CSV, the seed's labels.csv, paths and globs."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.slides.table import SlideEntry, read_slide_table, slide_id_from_path, write_slide_table


def test_contract_csv_resolves_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    csv = tmp_path / "d" / "slides.csv"
    csv.write_text("slide_id,path,label,split\na,a.tif,1,train\nb,,0,val\nc,/abs/c.svs,,\n")
    es = read_slide_table(csv)
    assert es[0] == SlideEntry("a", tmp_path / "d" / "a.tif", 1, "train")
    assert es[1].path is None and es[1].label == 0 and es[1].split == "val"
    assert es[2].path == Path("/abs/c.svs") and es[2].label is None and es[2].split is None


def test_seed_labels_csv(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("synthetic_0.jpg,1\nsynthetic_1.jpg,0\n")
    es = read_slide_table(csv)
    assert [(e.slide_id, e.label) for e in es] == [("synthetic_0", 1), ("synthetic_1", 0)]
    assert es[0].path == tmp_path / "synthetic_0.jpg"


@pytest.mark.parametrize(
    "body,msg",
    [
        ("slide_id,path,label\na,a.tif,2\n", "not 0 or 1"),
        ("slide_id,path,label\na,a.tif,yes\n", "not 0 or 1"),
        ("slide_id,path,split\na,a.tif,holdout\n", "split"),
        ("slide_id,path\na,a.tif\na,b.tif\n", "appears twice"),
        ("x,y,z\n1,2,3\n", "slide_id"),
    ],
)
def test_bad_tables(tmp_path, body, msg):
    csv = tmp_path / "t.csv"
    csv.write_text(body)
    with pytest.raises(ConfigError, match=msg):
        read_slide_table(csv)


def test_paths_and_globs(tmp_path):
    for n in ("x.ome.tiff", "y.svs"):
        (tmp_path / n).write_bytes(b"")
    es = read_slide_table(None, [str(tmp_path / "*")])
    assert [e.slide_id for e in es] == ["x", "y"]
    with pytest.raises(ConfigError, match="no slides match"):
        read_slide_table(None, [str(tmp_path / "*.ndpi")])
    with pytest.raises(ConfigError, match="no slides given"):
        read_slide_table(None, [])
    assert slide_id_from_path("/a/b/s1.ome.zarr/") == "s1"


def test_write_roundtrip(tmp_path):
    es = [SlideEntry("a", tmp_path / "a.tif", 1, "train"), SlideEntry("b", None, None, None)]
    write_slide_table(es, tmp_path / "s.csv")
    assert read_slide_table(tmp_path / "s.csv") == es


@pytest.mark.parametrize(
    ("sid", "why"),
    [
        ("case/x", "path separator"),
        ("../../escaped", "path separator"),
        ("a\\b", "path separator"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
    ],
)
def test_slide_ids_that_cannot_name_files_are_refused(tmp_path, sid, why):
    """Ids name files (W/patches/<id>.zarr): '/' made nested files that heatmap missed, and
    '../' wrote outside --work."""
    csv = tmp_path / "t.csv"
    csv.write_text(f'slide_id,path\n"{sid}",a.tiff\nok id,b.tiff\n')
    with pytest.raises(ConfigError, match=why) as e:
        read_slide_table(csv)
    assert "rename it in the slide table" in e.value.hint


def test_unusual_but_valid_slide_ids(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("slide_id,path\nok id,a.tiff\nü-1,b.tiff\nx..y,c.tiff\n")
    assert [e.slide_id for e in read_slide_table(csv)] == ["ok id", "ü-1", "x..y"]
