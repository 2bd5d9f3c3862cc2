"""`wsi-mil synth` through a real subprocess: the seed preset and bad options."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from wsi_mil.slides import read_slide_table


def test_seed_preset_writes_jpegs_and_labels_csv(cli, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "seed"
    r = cli(
        "-q",
        "synth",
        str(out),
        "--preset",
        "seed",
        "-n",
        "4",
        "--width",
        "1024",
        "--height",
        "1024",
        "--seed",
        "3",
    )
    assert r.returncode == 0, r.stderr
    jpgs = sorted(p.name for p in out.glob("*.jpg"))
    assert jpgs == [f"synthetic_{i}.jpg" for i in range(4)]
    labels = pd.read_csv(out / "labels.csv", header=None, names=["filename", "label"])
    assert list(labels["filename"]) == jpgs and sorted(labels["label"]) == [0, 0, 1, 1]
    # our tables agree with the seed's
    entries = {e.path.name: e for e in read_slide_table(out / "slides.csv")}
    assert {k: e.label for k, e in entries.items()} == dict(
        zip(labels["filename"], labels["label"], strict=True)
    )
    seed_style = read_slide_table(out / "labels.csv")  # the seed's CSV is a valid slide table too
    assert len(seed_style) == 4
    markers = pd.read_csv(out / "markers.csv")
    for fn, lab in zip(labels["filename"], labels["label"], strict=True):
        n = (markers["slide_id"] == fn[:-4]).sum()
        assert (n >= 1) == (lab == 1) and n <= 12
    img = np.asarray(Image.open(out / "synthetic_0.jpg"))
    assert img.shape == (1024, 1024, 3)
    neg = next(fn for fn, lab in zip(labels["filename"], labels["label"], strict=True) if lab == 0)
    g = np.asarray(Image.open(out / neg)).astype(float)
    assert 110 < g.mean() < 145 and g.std() < 6  # the seed's mid-grey blurred noise
    assert "synth.yaml" in {p.name for p in out.iterdir()}


def test_seed_preset_cli_matches_python_api(cli, tmp_path) -> None:  # noqa: ANN001
    from wsi_mil.synth import SynthConfig, generate

    r = cli(
        "-q",
        "synth",
        str(tmp_path / "a"),
        "--preset",
        "seed",
        "-n",
        "2",
        "--width",
        "512",
        "--height",
        "512",
    )
    assert r.returncode == 0, r.stderr
    generate(
        SynthConfig(out=tmp_path / "b", preset="seed", n_slides=2, width_px=512, height_px=512)
    )
    assert (tmp_path / "a" / "markers.csv").read_bytes() == (
        tmp_path / "b" / "markers.csv"
    ).read_bytes()
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (
        tmp_path / "b" / "labels.csv"
    ).read_bytes()


def test_config_file_sets_options(cli, tmp_path) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "synth:\n  n-slides: 2\n  width-px: 512\n  height-px: 512\n  format: png\n  background: noise\n"
    )
    r = cli("-q", "synth", str(tmp_path / "o"), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == [
        "synth_000.png",
        "synth_001.png",
    ]


def _bad(cli, tmp_path, *args: str) -> str:  # noqa: ANN001
    r = cli("synth", str(tmp_path / "x"), *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "slides.csv").exists()
    return r.stderr


def test_jpeg_too_big_names_tiff_as_the_fix(cli, tmp_path) -> None:  # noqa: ANN001
    err = _bad(cli, tmp_path, "--format", "jpeg", "--width", "70000", "--height", "1000")
    assert "65500" in err and "--format tiff" in err


def test_bad_options_exit_2_with_one_clear_line(cli, tmp_path) -> None:  # noqa: ANN001
    assert "--splits" in _bad(cli, tmp_path, "--splits", "train=0.5,val=0.2")
    assert "--splits" in _bad(cli, tmp_path, "--splits", "train=0.5,bogus=0.5")
    assert "marker count" in _bad(cli, tmp_path, "--markers-min", "4", "--markers-max", "2")
    assert "--positive-fraction" in _bad(cli, tmp_path, "--positive-fraction", "1.5")
    assert "--tile-px" in _bad(cli, tmp_path, "--tile-px", "100")
    assert "do not fit" in _bad(
        cli, tmp_path, "--width", "256", "--height", "256", "--marker-size-max", "300"
    )
    assert "--format" in _bad(cli, tmp_path, "--format", "bmp")


def test_rerun_with_fewer_slides_warns_about_the_stale_ones(cli, tmp_path) -> None:  # noqa: ANN001
    opts = ("--width", "256", "--height", "256", "--format", "png", "-q")
    first = cli("synth", str(tmp_path / "S"), "-n", "3", *opts)
    assert first.returncode == 0 and "WARNING" not in first.stderr, first.stderr
    same = cli("synth", str(tmp_path / "S"), "-n", "3", *opts)
    assert same.returncode == 0 and "WARNING" not in same.stderr, same.stderr
    fewer = cli("synth", str(tmp_path / "S"), "-n", "2", *opts)
    assert fewer.returncode == 0, fewer.stderr
    (stale,) = sorted(set(p.name for p in (tmp_path / "S").glob("synth_*.png")) - {
        ln.split(",")[1] for ln in (tmp_path / "S" / "slides.csv").read_text().splitlines()[1:]
    })  # fmt: skip
    warning = [ln for ln in fewer.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warning) == 1 and "1 slide file(s) of an earlier synth run" in warning[0]
    assert stale in warning[0], warning
