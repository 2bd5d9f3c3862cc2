"""`wsi-mil predict` on the run folders it meets in practice: no checkpoint yet, a feature
folder recorded relative to train's folder, another cohort in its own --work, a training
killed part-way, an e2e run given patches of another size. Real stores, real CLI calls."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from bag_factory import make_bags, write_bags, write_table

from wsi_mil.config import ModelConfig, TrainConfig
from wsi_mil.features.extract import default_features_dir
from wsi_mil.slides.table import SlideEntry, read_slide_table
from wsi_mil.train import train

ENV = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _predict(cli, *args: str, cwd: Path | None = None):
    r = cli("-q", "predict", "--device", "cpu", *map(str, args), cwd=cwd, env=ENV)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r


# ---------------------------------------------------------------- checkpoints
def test_a_run_without_checkpoints_or_a_missing_checkpoint_is_a_usage_error(tmp_path, cli):
    bags = make_bags(6, dim=8, n_min=5, n_max=9)
    write_bags(bags, tmp_path / "feats")
    table = write_table(bags, tmp_path / "slides.csv")
    run = tmp_path / "run"
    cfg = TrainConfig(
        work=tmp_path / "w", run=run, features=tmp_path / "feats", epochs=1, device="cpu",
        val_frac=0.0,
    )  # fmt: skip
    train(cfg, read_slide_table(table), progress=False)
    common = ("--slides", table, "--work", tmp_path / "w", "--run", run)

    r = _predict(cli, *common, "--checkpoint", tmp_path / "nothere.pt", "--out-dir", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "nothere.pt not found" in r.stderr and "--checkpoint best, last" in r.stderr

    # killed before its first epoch ended: config.yaml, no checkpoints/
    shutil.rmtree(run / "checkpoints")
    r = _predict(cli, *common)
    assert r.returncode == 2, r.stderr
    assert f"{run / 'checkpoints' / 'best.pt'} not found" in r.stderr
    assert "train it first: wsi-mil train --run" in r.stderr and "--checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- feature folders
@pytest.fixture
def relative_run(tmp_path, monkeypatch):
    """A cached run trained like the README, from folder A with relative paths, on the
    default feature folder w/features/<tag>; and another cohort extracted into B/w."""
    a, b = tmp_path / "A", tmp_path / "B"
    tag = default_features_dir(Path("w"), TrainConfig(feature_dim=8)).name
    bags = make_bags(8, dim=8, n_min=5, n_max=9)
    write_bags(bags, a / "w" / "features" / tag)
    table = write_table(bags, a / "slides.csv")
    other = make_bags(4, dim=8, n_min=5, n_max=9, seed=1)
    for i, o in enumerate(other):
        o.slide_id = f"ext{i}"
    write_bags(other, b / "w" / "features" / tag)
    other_table = write_table(other, b / "slides.csv")
    monkeypatch.chdir(a)
    cfg = TrainConfig(
        work=Path("w"), run=Path("r"), feature_dim=8, epochs=1, device="cpu", val_frac=0.0
    )
    train(cfg, read_slide_table("slides.csv"), progress=False)
    monkeypatch.chdir(tmp_path)
    return a, b, tag, table, other_table


def test_train_records_an_absolute_feature_folder_predict_finds_from_anywhere(
    relative_run, tmp_path, cli
):
    a, _, tag, table, _ = relative_run
    recorded = yaml.safe_load((a / "r" / "config.yaml").read_text())["features"]
    assert recorded == str((a / "w" / "features" / tag).resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _predict(cli, "--slides", table, "--run", a / "r", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(a / "r" / "predictions.csv")) == 8


def test_a_relative_feature_folder_of_an_earlier_version_resolves_against_trains_folder(
    relative_run, tmp_path, cli
):
    a, _, tag, table, _ = relative_run
    cfg_path = a / "r" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["features"] = f"w/features/{tag}"  # as train recorded it before: relative to A
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _predict(cli, "--slides", table, "--run", a / "r", cwd=elsewhere)
    assert r.returncode == 0, r.stderr

    # nowhere to be found: a clear usage error naming the record and the fix
    shutil.move(a / "w", tmp_path / "moved")
    r = _predict(cli, "--slides", table, "--run", a / "r", cwd=elsewhere)
    assert r.returncode == 2, r.stderr
    assert f"w/features/{tag}" in r.stderr and "does not exist" in r.stderr
    assert "--features DIR" in r.stderr


def test_another_cohort_in_its_own_work_folder_reads_its_features(relative_run, tmp_path, cli):
    _, b, tag, _, other_table = relative_run
    run = tmp_path / "A" / "r"
    r = _predict(cli, "--slides", other_table, "--work", b / "w", "--run", run,
                 "--out-dir", b / "pred")  # fmt: skip
    assert r.returncode == 0, r.stderr
    preds = pd.read_csv(b / "pred" / "predictions.csv")
    assert sorted(preds.slide_id) == ["ext0", "ext1", "ext2", "ext3"]
    store = Path(_feature_store_attr(b / "pred" / "attention" / "ext0.h5"))
    assert store.resolve() == (b / "w" / "features" / tag / "ext0.h5").resolve()

    # --work given but not extracted into: its W/features/<tag>, not the training features
    (tmp_path / "empty").mkdir()
    r = _predict(cli, "--slides", other_table, "--work", tmp_path / "empty", "--run", run,
                 "--out-dir", tmp_path / "pred2")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"{tmp_path / 'empty' / 'features' / tag} does not exist" in r.stderr
    assert "wsi-mil extract" in r.stderr


def _feature_store_attr(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs["feature_store"])


# ---------------------------------------------------------------- unfinished runs
class _Killed(Exception):
    pass


def test_a_run_killed_part_way_warns_once_and_predicts(tmp_path, cli, monkeypatch):
    from wsi_mil.train.loop import Trainer

    bags = make_bags(8, dim=8, n_min=5, n_max=9)
    write_bags(bags, tmp_path / "feats")
    table = write_table(bags, tmp_path / "slides.csv")
    end_epoch = Trainer.end_epoch

    def killed_after_two(self, *a, **k):
        end_epoch(self, *a, **k)
        if self.epoch == 2:
            raise _Killed

    monkeypatch.setattr(Trainer, "end_epoch", killed_after_two)
    run = tmp_path / "run"
    cfg = TrainConfig(
        work=tmp_path / "w", run=run, features=tmp_path / "feats", epochs=5, device="cpu",
        val_frac=0.0, early_stop="none",
    )  # fmt: skip
    with pytest.raises(_Killed):
        train(cfg, read_slide_table(table), progress=False)
    common = ("--slides", table, "--work", tmp_path / "w", "--run", run)
    r = _predict(cli, *common)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("stopped at epoch 2 of 5 without an early stop") == 1, r.stderr
    assert "--resume" in r.stderr
    assert len(pd.read_csv(run / "predictions.csv")) == 8

    # an early stop at epoch 2 is a finished run: no warning
    last = run / "checkpoints" / "last.pt"
    ck = torch.load(last, weights_only=True)
    ck["early_stopping"]["stopped"] = True
    torch.save(ck, last)
    r = _predict(cli, *common, "--overwrite")
    assert r.returncode == 0 and "stopped at epoch" not in r.stderr, r.stderr


# ---------------------------------------------------------------- e2e patch sizes
def _patch_stores(work: Path, sizes: dict[str, int], seed: int = 0) -> None:
    from wsi_mil.tiling.patch_store import PatchStoreWriter

    rng = np.random.default_rng(seed)
    for sid, p in sizes.items():
        grid = 3
        coords = np.array([(x * p, y * p) for y in range(grid) for x in range(grid)], np.int64)
        attrs = {"level": 0, "downsample": 1.0, "patch_size": p, "level0_width": grid * p,
                 "level0_height": grid * p, "slide_path": ""}  # fmt: skip
        with PatchStoreWriter(work / "patches" / f"{sid}.zarr", coords, attrs) as w:
            w.write_pixels(0, rng.integers(0, 255, (len(coords), p, p, 3), dtype=np.uint8))
            w.commit()


def test_e2e_predict_refuses_patches_of_another_size(tmp_path, cli):
    ids = [f"s{i}" for i in range(4)]
    _patch_stores(tmp_path / "w", dict.fromkeys(ids, 16))
    rows = [{"slide_id": s, "path": "", "label": i % 2} for i, s in enumerate(ids)]
    table = tmp_path / "slides.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    entries = [SlideEntry(s, None, i % 2, None) for i, s in enumerate(ids)]
    run = tmp_path / "run"
    cfg = TrainConfig(work=tmp_path / "w", run=run, mode="e2e", epochs=1, feature_dim=8,
                      chunk_size=5, model=ModelConfig(pos_dim=4, attn_dim=4, hidden_dim=4),
                      device="cpu", early_stop="none", encoder_width=4, val_frac=0.0)  # fmt: skip
    train(cfg, entries, progress=False)

    # every store of another size: one usage error
    _patch_stores(tmp_path / "w24", dict.fromkeys(ids, 24), seed=1)
    r = _predict(cli, "--slides", table, "--work", tmp_path / "w24", "--run", run,
                 "--out-dir", tmp_path / "p24")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "hold 24 px patches" in r.stderr and "trained on 16 px patches" in r.stderr
    assert "--patch-size 16" in r.stderr

    # one store of another size among right ones: that slide fails, with the reason
    _patch_stores(tmp_path / "wmix", {**dict.fromkeys(ids, 16), "s2": 24}, seed=2)
    r = _predict(cli, "--slides", table, "--work", tmp_path / "wmix", "--run", run,
                 "--out-dir", tmp_path / "pmix")  # fmt: skip
    assert r.returncode == 1, r.stderr
    fails = list(csv.DictReader(open(tmp_path / "wmix" / "failures.csv")))
    assert [f["slide_id"] for f in fails] == ["s2"]
    assert "24 px patches" in fails[0]["reason"] and "16 px" in fails[0]["reason"]
    assert sorted(pd.read_csv(tmp_path / "pmix" / "predictions.csv").slide_id) == ["s0", "s1", "s3"]

    # the checkpoint records the size: the check holds with the training stores re-tiled
    # (or gone), where it used to be skipped
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert best["extra"]["patch_size"] == 16
    shutil.rmtree(tmp_path / "w" / "patches")
    r = _predict(cli, "--slides", table, "--work", tmp_path / "w24", "--run", run,
                 "--out-dir", tmp_path / "p24b")  # fmt: skip
    assert r.returncode == 2 and "trained on 16 px patches" in r.stderr, r.stderr
