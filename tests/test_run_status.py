"""`wsi-mil run`'s one line per stage says 'up to date' when a stage found nothing to do."""

from __future__ import annotations


def test_rerun_says_up_to_date_for_a_stage_with_every_slide_current(cli, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "slides: s/slides.csv\nwork: W\nsynth:\n  out: s\n  n-slides: 2\n  width: 256\n"
        "  height: 256\n  format: png\n  background: noise\n  workers: 1\n"
        "tile:\n  patch-size: 64\n  tissue: none\n  workers: 1\n"
    )
    args = ("-q", "run", "--config", "c.yaml", "--stages", "synth,tile")
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (tile,) = [ln for ln in first.stdout.splitlines() if ln.startswith("[run] tile ")]
    assert " ok " in tile and "up to date" not in tile, tile
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    (tile,) = [ln for ln in again.stdout.splitlines() if ln.startswith("[run] tile ")]
    assert "up to date" in tile and " ok " not in tile, tile
    # a changed option redoes the work: 'ok' again
    (tmp_path / "c.yaml").write_text(
        (tmp_path / "c.yaml").read_text().replace("patch-size: 64", "patch-size: 32")
    )
    third = cli(*args, cwd=tmp_path)
    (tile,) = [ln for ln in third.stdout.splitlines() if ln.startswith("[run] tile ")]
    assert " ok " in tile, tile
