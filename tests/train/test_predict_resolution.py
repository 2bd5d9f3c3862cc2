"""`wsi-mil predict` refuses stores tiled at another resolution than the run was trained at:
the checkpoint records it (``extra["output_mpp"]``, ``extra["downsample"]``), a store at
another one fails its slide, a cohort all at another one is a usage error. Tiny 0.25 mpp
(40x) slides tiled through the real tiler at --mpp 0.5 (the runs' resolution) and at level 0
(0.25 mpp), extracted, trained (e2e and cached) and predicted through the real CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from slide_factory import make_pyramidal_tiff, test_image

from wsi_mil.config import ExtractConfig, ModelConfig, TileConfig, TrainConfig
from wsi_mil.features.extract import extract_slides
from wsi_mil.slides.table import read_slide_table
from wsi_mil.tiling import tile_slides
from wsi_mil.train import train
from wsi_mil.train.predict import Resolution, training_resolution

ENV = {"OMP_NUM_THREADS": "1"}
IDS = ["s0", "s1", "s2", "s3"]
ODD = "s2"  # the slide of the mixed cohorts tiled at level 0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Slides tiled at 0.5 mpp (``w05``) and at level 0, 0.25 mpp (``w025``), with features;
    ``wmix``/``fmix``: the 0.5 mpp stores but ``s2``'s at 0.25 mpp; an e2e and a cached run
    trained on the 0.5 mpp stores."""
    d = tmp_path_factory.mktemp("resolution")
    rows = []
    for i, sid in enumerate(IDS):
        path = make_pyramidal_tiff(d / f"{sid}.tiff", test_image(96, 96, seed=i), n_levels=2,
                                   tile_px=64, mpp=0.25, compression="zlib")  # fmt: skip
        rows.append({"slide_id": sid, "path": str(path), "label": i % 2})
    table = d / "slides.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    entries = read_slide_table(table)
    for name, kw in (("w05", {"mpp": 0.5}), ("w025", {"level": 0})):
        cfg = TileConfig(work=d / name, patch_size=16, tissue="none", workers=1, **kw)
        assert tile_slides(cfg, entries, progress=False).exit_code == 0
        ecfg = ExtractConfig(work=d / name, feature_dim=8, batch_size=64, workers=0,
                             device="cpu", features=d / name / "feats")  # fmt: skip
        assert extract_slides(ecfg, entries, progress=False).exit_code == 0
    for sid in IDS:
        src = "w025" if sid == ODD else "w05"
        shutil.copytree(d / src / "patches" / f"{sid}.zarr", d / "wmix" / "patches" / f"{sid}.zarr")
        (d / "fmix").mkdir(exist_ok=True)
        shutil.copy(d / src / "feats" / f"{sid}.h5", d / "fmix" / f"{sid}.h5")
    common = dict(epochs=1, device="cpu", early_stop="none", val_frac=0.0)
    e2e = TrainConfig(work=d / "w05", run=d / "e2e", mode="e2e", feature_dim=8, chunk_size=16,
                      model=ModelConfig(pos_dim=4, attn_dim=4, hidden_dim=4), encoder_width=4,
                      **common)  # fmt: skip
    train(e2e, entries, progress=False)
    cached = TrainConfig(work=d / "w05", run=d / "cached", features=d / "w05" / "feats", **common)
    train(cached, entries, progress=False)
    return d, table


def _predict(cli, table: Path, run: Path, work: Path, out: Path, *args: str):
    r = cli("-q", "predict", "--device", "cpu", "--slides", str(table), "--run", str(run),
            "--work", str(work), "--out-dir", str(out), *map(str, args), env=ENV)  # fmt: skip
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r


def _extra(run: Path, which: str = "best") -> dict:
    return torch.load(run / "checkpoints" / f"{which}.pt", weights_only=True)["extra"]


def _failures(work: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(work / "failures.csv")))


def _scored(out: Path) -> list[str]:
    return sorted(pd.read_csv(out / "predictions.csv").slide_id)


# ---------------------------------------------------------------- end to end
def test_e2e_records_its_resolution_and_predicts_stores_at_it(cohort, tmp_path, cli):
    d, table = cohort
    for which in ("best", "last"):
        extra = _extra(d / "e2e", which)
        assert extra["output_mpp"] == pytest.approx(0.5) and extra["downsample"] == 2.0
    r = _predict(cli, table, d / "e2e", d / "w05", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert _scored(tmp_path / "p") == IDS


def test_e2e_a_store_at_another_resolution_fails_its_slide(cohort, tmp_path, cli):
    d, table = cohort
    work = tmp_path / "wmix"
    shutil.copytree(d / "wmix", work)
    r = _predict(cli, table, d / "e2e", work, tmp_path / "p")
    assert r.returncode == 1, r.stderr
    fails = _failures(work)
    assert [f["slide_id"] for f in fails] == [ODD]
    reason = fails[0]["reason"]
    assert "holds patches at 0.25 microns/px" in reason and "trained at 0.5 microns/px" in reason
    assert "--mpp 0.5 (the run's resolution)" in reason, reason
    assert _scored(tmp_path / "p") == [s for s in IDS if s != ODD]
    assert not (tmp_path / "p" / "attention" / f"{ODD}.h5").exists()


def test_e2e_a_cohort_all_at_another_resolution_is_one_usage_error(cohort, tmp_path, cli):
    d, table = cohort
    r = _predict(cli, table, d / "e2e", d / "w025", tmp_path / "p")
    assert r.returncode == 2, r.stderr
    assert "hold patches at 0.25 microns/px" in r.stderr and "at 0.5 microns/px" in r.stderr
    assert "--mpp 0.5" in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not (tmp_path / "p" / "predictions.csv").exists()


# ---------------------------------------------------------------- cached features
def test_cached_checks_the_resolution_its_feature_stores_were_tiled_at(cohort, tmp_path, cli):
    d, table = cohort
    run = d / "cached"
    extra = _extra(run)
    assert extra["output_mpp"] == pytest.approx(0.5) and extra["downsample"] == 2.0
    r = _predict(
        cli, table, run, tmp_path / "w", tmp_path / "same", "--features", d / "w05" / "feats"
    )
    assert r.returncode == 0, r.stderr
    assert _scored(tmp_path / "same") == IDS

    r = _predict(cli, table, run, tmp_path / "w", tmp_path / "mix", "--features", d / "fmix")
    assert r.returncode == 1, r.stderr
    fails = _failures(tmp_path / "w")
    assert [f["slide_id"] for f in fails] == [ODD]
    assert "0.25 microns/px" in fails[0]["reason"] and "--mpp 0.5" in fails[0]["reason"]
    assert "then extract their features" in fails[0]["reason"]
    assert _scored(tmp_path / "mix") == [s for s in IDS if s != ODD]

    r = _predict(
        cli, table, run, tmp_path / "w", tmp_path / "all", "--features", d / "w025" / "feats"
    )
    assert r.returncode == 2, r.stderr
    assert "0.25 microns/px" in r.stderr and "trained at 0.5 microns/px" in r.stderr


def test_a_checkpoint_without_the_resolution_predicts_unchecked(cohort, tmp_path, cli):
    """Checkpoints of earlier versions record no resolution: predict scores as before."""
    d, table = cohort
    run = tmp_path / "run"
    shutil.copytree(d / "cached", run)
    for which in ("best", "last"):
        p = run / "checkpoints" / f"{which}.pt"
        ck = torch.load(p, weights_only=True)
        assert {"output_mpp", "downsample"} <= set(ck["extra"])
        for k in ("output_mpp", "downsample"):
            del ck["extra"][k]
        torch.save(ck, p)
    r = _predict(
        cli, table, run, tmp_path / "w", tmp_path / "p", "--features", d / "w025" / "feats"
    )
    assert r.returncode == 0, r.stderr
    assert _scored(tmp_path / "p") == IDS


# ---------------------------------------------------------------- the comparison
def test_resolution_compares_mpp_else_downsample_within_the_tolerance():
    run = Resolution(0.5, 2.0)
    assert Resolution.of_attrs({"mpp": 0.25, "downsample": 2.0}) == run  # a feature store
    assert Resolution.of_attrs({"output_mpp": 0.5, "downsample": 2.0}) == run  # a patch store
    assert Resolution.of_attrs({"mpp": "", "downsample": 2.0}) == Resolution(None, 2.0)
    assert Resolution.of_attrs({"coords_patch_level": 0}) == Resolution()  # CLAM, TRIDENT
    assert Resolution(0.54, 4.0).matches(run)  # mpp known on both sides: it decides
    assert not Resolution(0.25, 2.0).matches(run)
    assert not Resolution(None, 1.0).matches(run) and Resolution(None, 2.1).matches(run)
    assert Resolution().matches(run) and Resolution(0.25, 1.0).matches(Resolution())
    # the training stores' common value: their median when all agree within the tolerance
    agree = [{"output_mpp": v, "downsample": 2.0} for v in (0.48, 0.5, 0.52)]
    assert training_resolution(agree) == {"output_mpp": 0.5, "downsample": 2.0}
    mixed = [*agree, {"output_mpp": 0.25, "downsample": 1.0}, {"downsample": 2.0}]
    assert training_resolution(mixed) == {"output_mpp": None, "downsample": None}
    assert training_resolution(a for a in agree + [{"downsample": 2.0}]) == {
        "output_mpp": None,
        "downsample": 2.0,
    }
