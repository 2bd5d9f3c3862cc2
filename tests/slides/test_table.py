"""Slide tables: contract CSV, the seed's labels.csv, paths and globs."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.slides.table import (
    SlideEntry,
    check_slide_id,
    read_slide_table,
    slide_id_from_path,
    write_slide_table,
)


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
        # two columns: errors name the file's row
        # header row 1, slides on rows 2-3: the bad label is on row 3
        ("filename,label\na.tiff,1\nb.tiff,2\n", "row 3: label '2' is not 0 or 1"),
        ("id,file\na.tiff,yes\nb.tiff,0\n", "row 2: label 'yes' is not 0 or 1"),
        # no header: data row i is file row i + 1
        ("a.tiff,1\nb.tiff,2\n", "row 2: label '2' is not 0 or 1"),
        ("a.tiff,1\n,0\n", "row 2: empty slide_id"),
        # a first slide with a bad label is reported, not dropped as a header
        ("a.tiff,yes\nb.tiff,1\n", "row 1: label 'yes' is not 0 or 1"),
        ("name,2\nb.tiff,1\n", "row 1: label '2' is not 0 or 1"),
        # an extra field is named, not read with the columns shifted (or a parser error)
        ("slide_id,path,label\nx1,a,b,c\n", "row 2: 4 fields where row 1 has 3"),
        ("filename,label\na,b.tiff,1\n", "row 2: 3 fields where row 1 has 2"),
        ("a.tiff,1\nb.tiff,1\nc.tiff,0,\n", "row 3: 3 fields where row 1 has 2"),
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


TWO_COLUMN_ROWS = "a.tiff,1\nsub/b.svs,0\nc.ome.zarr,\n"


@pytest.mark.parametrize("header", ["filename,label", "id,file", "image,label", "Path , Class"])
def test_two_column_table_with_or_without_a_header_gives_the_same_entries(tmp_path, header):
    """A header row of any names over filename,label rows was read as a slide whose label
    'label' is not 0 or 1; it is skipped, as '--slides' help and the error hints promise."""
    (tmp_path / "plain.csv").write_text(TWO_COLUMN_ROWS)
    (tmp_path / "headed.csv").write_text(f"{header}\n{TWO_COLUMN_ROWS}")
    plain = read_slide_table(tmp_path / "plain.csv")
    assert read_slide_table(tmp_path / "headed.csv") == plain
    assert plain == [
        SlideEntry("a", tmp_path / "a.tiff", 1),
        SlideEntry("b", tmp_path / "sub" / "b.svs", 0),
        SlideEntry("c", tmp_path / "c.ome.zarr", None),
    ]


def test_two_column_header_without_slides_says_how_a_header_is_read(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("filename,label\n")
    with pytest.raises(ConfigError, match="row 1: label 'label'") as e:
        read_slide_table(csv)
    assert "read as a header when a row under it" in e.value.hint


def test_tile_reads_a_two_column_table_with_a_header(cli, tmp_path):
    """The reported case through the real CLI: 'filename,label' over one slide row."""
    from slide_factory import make_image, test_image

    make_image(tmp_path / "synth_000.png", test_image(128, 128, seed=2))
    (tmp_path / "t.csv").write_text("filename,label\nsynth_000.png,1\n")
    args = ("tile", "--slides", "t.csv", "-w", "W", "--patch-size", "64", "--tissue", "none")
    r = cli("-q", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "W" / "patches" / "synth_000.zarr").is_dir()
    (tmp_path / "t.csv").write_text("filename,label\nsynth_000.png,1\nx.png,2\n")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "t.csv row 3: label '2' is not 0 or 1" in r.stderr


def test_a_slide_given_as_the_table_says_to_pass_it_as_an_argument(cli, tmp_path):
    """`--slides a.tiff` (a slide, not a CSV) is one usage error that names the fix."""
    from slide_factory import make_pyramidal_tiff, test_image

    make_pyramidal_tiff(tmp_path / "a.tiff", test_image(128, 128, seed=2), n_levels=1)
    with pytest.raises(ConfigError, match="looks like an image, not a slide table") as e:
        read_slide_table(tmp_path / "a.tiff")
    assert "pass slides as arguments" in e.value.hint
    with pytest.raises(ConfigError, match="is a folder, not a slide table"):
        read_slide_table(tmp_path)
    r = cli("tile", "--slides", "a.tiff", "-w", "W", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "looks like an image" in r.stderr and not (tmp_path / "W" / "patches").exists()


def test_tables_in_other_encodings_name_the_encoding(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes("slide_id,path\nrésumé,a.svs\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as e:
        read_slide_table(csv)
    assert "save it as UTF-8" in e.value.hint
    csv.write_text("slide_id,path\nrésumé,a.svs\n")
    assert read_slide_table(csv)[0].slide_id == "résumé"


def test_rows_with_fewer_fields_leave_the_last_values_empty(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("slide_id,path,label,split\na,a.svs\nb,b.svs,1\n")
    es = read_slide_table(csv)
    assert [(e.slide_id, e.label, e.split) for e in es] == [("a", None, None), ("b", 1, None)]


def test_hint_for_a_dot_slide_id_does_not_talk_about_separators():
    with pytest.raises(ConfigError, match="starts with '.'") as e:
        check_slide_id("..")
    assert "'/'" not in e.value.hint


def test_a_table_from_a_pipe_is_read_once(tmp_path):
    """`--slides <(make_table)`: the table is a pipe, which can be read only once."""
    import os
    import threading

    fifo = tmp_path / "t.csv"
    os.mkfifo(fifo)
    body = "slide_id,path,label\n" + "".join(f"s{i},/d/s{i}.svs,{i % 2}\n" for i in range(3))
    writer = threading.Thread(target=fifo.write_text, args=(body,))
    writer.start()
    es = read_slide_table(fifo)
    writer.join()
    assert [(e.slide_id, e.label) for e in es] == [("s0", 0), ("s1", 1), ("s2", 0)]
    assert read_slide_table(fifo) == es  # read twice (heatmap does): the same rows


def test_relative_paths_of_a_piped_table_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    import os
    import threading

    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    monkeypatch.chdir(tmp_path)
    writer = threading.Thread(target=fifo.write_text, args=("slide_id,path\na,d/a.svs\n",))
    writer.start()
    (e,) = read_slide_table(fifo)
    writer.join()
    assert e.path == tmp_path / "d" / "a.svs"


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
def test_compressed_tables_are_read_as_pandas_did(tmp_path, suffix):
    import bz2
    import gzip
    import lzma
    import zipfile

    body = b"slide_id,path,label\na,a.svs,1\n"
    csv = tmp_path / f"t.csv{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(csv, "w") as z:
            z.writestr("t.csv", body)
    else:
        csv.write_bytes({".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix].compress(body))
    (e,) = read_slide_table(csv)
    assert (e.slide_id, e.path, e.label) == ("a", tmp_path / "a.svs", 1)


def test_utf16_tables_are_told_to_be_saved_as_utf8(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("slide_id,path\na,a.svs\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="is not UTF-8 text") as e:
        read_slide_table(csv)
    assert "save it as UTF-8" in e.value.hint


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"\xef\xbb\xbfslide_id,path\na,a.svs\n")  # Excel's 'CSV UTF-8'
    assert read_slide_table(csv)[0].slide_id == "a"
