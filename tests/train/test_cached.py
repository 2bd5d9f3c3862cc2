"""Cached training end to end on real HDF5 feature stores (train_cached + predict)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time

import h5py
import numpy as np
import pytest
import torch
import yaml
from bag_factory import make_bags, write_bags, write_table

from wsi_mil.config import ModelConfig, PredictConfig, TrainConfig
from wsi_mil.errors import ConfigError, DataError
from wsi_mil.features.feature_store import write_features
from wsi_mil.slides.table import read_slide_table
from wsi_mil.train import train
from wsi_mil.train.loop import Trainer
from wsi_mil.train.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path, n_bags=24, dim=8, n_min=20, n_max=40, splits=None, **kw):
    bags = make_bags(n_bags, dim=dim, n_min=n_min, n_max=n_max, **kw)
    write_bags(bags, tmp_path / "feats")
    entries = read_slide_table(write_table(bags, tmp_path / "slides.csv", splits))
    return bags, entries


def _cfg(tmp_path, run="run", **kw):
    base = dict(
        work=tmp_path / "w", run=tmp_path / run, features=tmp_path / "feats", epochs=4, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return torch.load(path, weights_only=True)


def test_mil_benchmark_auc_and_attention_localisation(tmp_path):
    """Positives hide 2-5 shifted instances among 50-200: held-out AUC >= 0.95 and the
    top-attended instance is a key instance in >= 90 % of held-out positive bags."""
    splits = ["train"] * 50 + ["val"] * 10 + ["test"] * 40
    bags, entries = _setup(
        tmp_path, n_bags=100, dim=32, n_min=50, n_max=200, shift=2.5, splits=splits
    )
    run = train(_cfg(tmp_path, epochs=12), entries, progress=False)
    res = predict(
        PredictConfig(work=tmp_path / "w", run=run, device="cpu"), entries, progress=False
    )
    test = res["splits"]["test"]
    assert test["n"] == 40
    assert test["auc"] >= 0.95, test
    hits = []
    for b in bags[60:]:
        if b.label == 1:
            with h5py.File(run / "attention" / f"{b.slide_id}.h5") as f:
                att = f["attention"][:]
                assert np.array_equal(f["coords"][:], b.coords)
            hits.append(bool(b.key[int(np.argmax(att))]))
    assert len(hits) == 20
    assert np.mean(hits) >= 0.9, hits


def test_features_with_a_large_common_offset_still_learn(tmp_path):
    """Encoder features often share a big offset and a small spread (here 40 + 0.2 f): the
    head's input standardisation (fitted on the training bags, saved in the checkpoint)
    makes this the same problem as the benchmark above."""
    bags = make_bags(100, dim=32, n_min=50, n_max=200, shift=2.5)
    for b in bags:
        b.features = (40.0 + 0.2 * b.features).astype(np.float32)
    write_bags(bags, tmp_path / "feats")
    splits = ["train"] * 50 + ["val"] * 10 + ["test"] * 40
    entries = read_slide_table(write_table(bags, tmp_path / "slides.csv", splits))
    run = train(_cfg(tmp_path, epochs=12), entries, progress=False)
    state = _weights(run / "checkpoints" / "best.pt")["model"]
    train_feats = np.concatenate([b.features for b in bags[:50]])
    np.testing.assert_allclose(state["feature_mean"].numpy(), train_feats.mean(0), atol=1e-3)
    np.testing.assert_allclose(state["feature_std"].numpy(), train_feats.std(0, ddof=1), rtol=1e-3)
    res = predict(
        PredictConfig(work=tmp_path / "w", run=run, device="cpu"), entries, progress=False
    )
    assert res["splits"]["test"]["auc"] >= 0.95, res["splits"]["test"]


def test_run_folder_contents(tmp_path):
    _, entries = _setup(tmp_path)
    run = train(_cfg(tmp_path), entries, progress=False)
    for p in (
        "config.yaml",
        "splits.csv",
        "metrics.csv",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/training.png",
    ):
        assert (run / p).is_file(), p
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["train_loss"]) > 0 and r["val_auc"] != "" for r in rows)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["in_dim"] == 8 and cfg["features"] == str(tmp_path / "feats")
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # contract: weights_only
    assert ck["epoch"] == 4 and len(ck["history"]) == 4
    assert ck["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert ck["optimizer"]["param_groups"][0]["weight_decay"] == 0.05

    res = predict(
        PredictConfig(work=tmp_path / "w", run=run, device="cpu"), entries, progress=False
    )
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    assert len(preds) == 24 and set(preds[0]) == {"slide_id", "label", "prob", "split"}
    assert {r["split"] for r in preds} == {"train", "val"}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["threshold"] == 0.5 and set(saved["splits"]) == {"train", "val"}
    assert saved["overall"]["n"] == 24 and res["overall"] == saved["overall"]
    for k in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        assert k in saved["overall"]
    assert (run / "plots" / "roc.png").stat().st_size > 1000
    with h5py.File(run / "attention" / "bag003.h5") as f:
        assert f["coords"].dtype == np.int64 and f["attention"].dtype == np.float32
        assert f["attention"].shape == (len(f["coords"]),)
        assert f.attrs["slide_id"] == "bag003" and f.attrs["label"] == 1
        assert f.attrs["patch_size_level0"] == 256 and f.attrs["level0_width"] > 0
        assert f.attrs["split"] in ("train", "val") and 0 <= f.attrs["prob"] <= 1
        assert f["attention"][:].sum() == pytest.approx(1.0, abs=1e-5)


def test_same_seed_same_weights(tmp_path):
    _, entries = _setup(tmp_path)
    model = ModelConfig(dropout=0.2)
    a = _weights(
        train(_cfg(tmp_path, "a", model=model), entries, progress=False) / "checkpoints" / "last.pt"
    )
    b = _weights(
        train(_cfg(tmp_path, "b", model=model), entries, progress=False) / "checkpoints" / "last.pt"
    )
    c = _weights(
        train(_cfg(tmp_path, "c", model=model, seed=1), entries, progress=False)
        / "checkpoints"
        / "last.pt"
    )
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["scheduler"] == b["scheduler"]
    assert a["early_stopping"] == b["early_stopping"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    """Stop after epoch 3 of 7 (dropout on, so RNG state matters), resume: equal to one run."""
    _, entries = _setup(tmp_path)
    kw = dict(epochs=7, model=ModelConfig(dropout=0.25), bags_per_step=2, patience=0)
    full = train(_cfg(tmp_path, "full", **kw), entries, progress=False)

    original = Trainer.end_epoch

    def end_epoch_then_die(self, *a, **k):
        original(self, *a, **k)
        if self.epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "cut", **kw), entries, progress=False)
    monkeypatch.setattr(Trainer, "end_epoch", original)
    assert _weights(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 3
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(tmp_path, "cut", **kw), entries, progress=False)
    train(_cfg(tmp_path, "cut", resume=True, **kw), entries, progress=False)
    for name in ("last.pt", "best.pt"):
        _assert_same_state(
            _weights(full / "checkpoints" / name), _weights(tmp_path / "cut" / "checkpoints" / name)
        )
    assert (
        (full / "metrics.csv").read_text().count("\n")
        == (tmp_path / "cut" / "metrics.csv").read_text().count("\n")
        == 8
    )


def test_resume_of_a_finished_run_does_nothing(tmp_path, caplog):
    _, entries = _setup(tmp_path)
    run = train(_cfg(tmp_path, epochs=2), entries, progress=False)
    before = _weights(run / "checkpoints" / "last.pt")
    train(_cfg(tmp_path, epochs=2, resume=True), entries, progress=False)
    after = _weights(run / "checkpoints" / "last.pt")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_early_stopping_stops(tmp_path):
    _, entries = _setup(tmp_path, shift=0.0)  # nothing to learn: val loss stops improving
    run = train(_cfg(tmp_path, epochs=40, patience=2, lr=1e-2), entries, progress=False)
    ck = _weights(run / "checkpoints" / "last.pt")
    assert ck["early_stopping"]["stopped"] and ck["epoch"] < 40
    best = _weights(run / "checkpoints" / "best.pt")
    assert best["epoch"] == ck["early_stopping"]["best_epoch"] == ck["epoch"] - 2


def test_kfold_through_training(tmp_path):
    _, entries = _setup(tmp_path)
    val_sets = []
    for fold in range(3):
        run = train(
            _cfg(tmp_path, f"f{fold}", epochs=1, folds=3, fold=fold), entries, progress=False
        )
        rows = list(csv.DictReader(open(run / "splits.csv")))
        val_sets.append({r["slide_id"] for r in rows if r["split"] == "val"})
    assert sum(len(v) for v in val_sets) == 24 and len(set().union(*val_sets)) == 24


def test_stores_without_coords_switch_pos_off(tmp_path, caplog):
    bags = make_bags(8, dim=8, n_min=5, n_max=9)
    (tmp_path / "feats").mkdir()
    for b in bags:
        with h5py.File(tmp_path / "feats" / f"{b.slide_id}.h5", "w") as f:
            f["features"] = b.features
    entries = read_slide_table(write_table(bags, tmp_path / "slides.csv"))
    with caplog.at_level(logging.WARNING):
        run = train(_cfg(tmp_path, epochs=1, val_frac=0.0), entries, progress=False)
    assert "positional encoding off" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["use_pos"] is False
    predict(PredictConfig(run=run, device="cpu"), entries, progress=False)
    with h5py.File(run / "attention" / "bag000.h5") as f:
        assert not f.attrs["has_coords"] and f["coords"].shape == (len(bags[0].features), 2)


def test_pos_model_on_bag_without_coords_is_a_clear_error(tmp_path):
    bags, entries = _setup(tmp_path, n_bags=8)
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    (tmp_path / "nocoords").mkdir()
    with h5py.File(tmp_path / "nocoords" / "bag000.h5", "w") as f:
        f["features"] = bags[0].features
    with pytest.raises(DataError, match="bag000.*no coordinates.*--no-pos"):
        predict(
            PredictConfig(run=run, features=tmp_path / "nocoords", device="cpu"),
            entries,
            progress=False,
        )


def test_training_split_with_one_class(tmp_path):
    splits = ["val" if b % 2 else "train" for b in range(24)]  # odd (positive) bags all in val
    _, entries = _setup(tmp_path, splits=splits)
    with pytest.raises(DataError, match="only label 0"):
        train(_cfg(tmp_path), entries, progress=False)


def test_predict_checks_dims_against_the_model(tmp_path):
    _, entries = _setup(tmp_path, n_bags=8)
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    write_bags(make_bags(8, dim=4, n_min=5, n_max=9), tmp_path / "other")
    with pytest.raises(DataError, match="D=4.*trained on D=8"):
        predict(
            PredictConfig(run=run, features=tmp_path / "other", device="cpu"),
            entries,
            progress=False,
        )


def test_store_with_no_patches_is_skipped_with_a_warning(tmp_path, caplog):
    _, entries = _setup(tmp_path, n_bags=8)
    with h5py.File(tmp_path / "feats" / "blank.h5", "w") as f:
        f["features"] = np.zeros((0, 8), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    from wsi_mil.slides.table import SlideEntry

    with caplog.at_level(logging.WARNING):
        run = train(
            _cfg(tmp_path, epochs=1), [*entries, SlideEntry("blank", None, 1, None)], progress=False
        )
    assert "1 slides have 0 patches" in caplog.text and "blank" in caplog.text
    assert "blank" not in (run / "splits.csv").read_text()


def test_resume_refuses_other_options_and_names_them(tmp_path):
    """--resume (which 'wsi-mil run' passes by itself) continues only the same training:
    more epochs are fine, another lr or model shape is refused before config.yaml changes."""
    _, entries = _setup(tmp_path, n_bags=8)
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"lr: 0\.001 -> 0\.5"):
        train(_cfg(tmp_path, epochs=1, resume=True, lr=0.5), entries, progress=False)
    with pytest.raises(ConfigError, match=r"model\.hidden_dim"):
        model = ModelConfig(hidden_dim=16)
        train(_cfg(tmp_path, epochs=1, resume=True, model=model), entries, progress=False)
    assert (run / "config.yaml").read_text() == saved  # refused before anything was rewritten
    train(_cfg(tmp_path, epochs=2, resume=True, device="cpu"), entries, progress=False)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def _write_extracted(bags, folder, source_digest):
    """Feature stores as 'wsi-mil extract' writes them: ``source_digest`` names the patches."""
    for b in bags:
        attrs = {
            "encoder": "synthetic",
            "encoder_tag": "synthetic-d8",
            "level0_width": 4096,
            "level0_height": 4096,
            "patch_size_level0": 256,
            "slide_path": "",
            "source_digest": source_digest(b),
        }
        write_features(folder / f"{b.slide_id}.h5", b.features, b.coords, attrs, 256, 0)


def test_resume_refuses_changed_feature_stores_before_rewriting_the_run(tmp_path):
    """A run records a digest of every feature store it read; --resume (which 'wsi-mil run'
    passes by itself) on features that changed since, e.g. re-extracted from re-tiled
    slides, is refused before config.yaml, splits.csv or a checkpoint changes."""
    bags, entries = _setup(tmp_path, n_bags=8)
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    recorded = _weights(run / "checkpoints" / "last.pt")["inputs"]
    assert sorted(recorded) == [b.slide_id for b in bags]
    saved = {n: (run / n).read_bytes() for n in ("config.yaml", "splits.csv", "metrics.csv")}
    ckpts = {n: (run / "checkpoints" / n).read_bytes() for n in ("last.pt", "best.pt")}
    write_bags(make_bags(8, dim=8, n_min=20, n_max=40, seed=1)[3:4], tmp_path / "feats")
    with pytest.raises(
        ConfigError, match=r"other feature stores: those of 1 of 8 slides changed since \(bag003\)"
    ) as e:
        train(_cfg(tmp_path, epochs=2, resume=True), entries, progress=False)
    assert "--overwrite" in str(e.value) and "another --run" in str(e.value)
    assert {n: (run / n).read_bytes() for n in saved} == saved
    assert {n: (run / "checkpoints" / n).read_bytes() for n in ckpts} == ckpts
    # starting afresh (--overwrite wins over a config's resume: true) trains on the new
    # features and records them
    train(_cfg(tmp_path, epochs=1, resume=True, overwrite=True), entries, progress=False)
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1
    now = _weights(run / "checkpoints" / "last.pt")["inputs"]
    assert [s for s in now if now[s] != recorded[s]] == ["bag003"]
    train(_cfg(tmp_path, epochs=2, resume=True), entries, progress=False)


def test_resume_refuses_changed_labels(tmp_path):
    """A label flipped in the slide table since the checkpoint: --resume is refused (the
    model learnt the old label), before the run folder changes."""
    bags, entries = _setup(tmp_path, n_bags=8, splits=["train"] * 6 + ["val"] * 2)
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    recorded = _weights(run / "checkpoints" / "last.pt")["labels"]
    assert recorded == {b.slide_id: b.label for b in bags}
    last = (run / "checkpoints" / "last.pt").read_bytes()
    flipped = [
        dataclasses.replace(e, label=1 - e.label) if e.slide_id == "bag002" else e for e in entries
    ]
    with pytest.raises(ConfigError, match=r"other labels for 1 slide\(s\) \(bag002\)") as e:
        train(_cfg(tmp_path, epochs=2, resume=True), flipped, progress=False)
    assert "--overwrite" in str(e.value)
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    train(_cfg(tmp_path, epochs=2, resume=True), entries, progress=False)  # same labels: on


def test_resume_goes_on_when_stores_are_rewritten_alike(tmp_path):
    """Stores of 'wsi-mil extract' are compared by what they were made from (source digest,
    encoder, shape), not by file time: re-extracting the same patches keeps the run
    resumable; a store made from other patches does not."""
    bags = make_bags(8, dim=8, n_min=20, n_max=40)
    _write_extracted(bags, tmp_path / "feats", lambda b: f"patches-of-{b.slide_id}")
    entries = read_slide_table(write_table(bags, tmp_path / "slides.csv"))
    run = train(_cfg(tmp_path, epochs=1), entries, progress=False)
    time.sleep(0.01)
    _write_extracted(bags, tmp_path / "feats", lambda b: f"patches-of-{b.slide_id}")
    train(_cfg(tmp_path, epochs=2, resume=True), entries, progress=False)
    assert _weights(run / "checkpoints" / "last.pt")["epoch"] == 2
    _write_extracted(bags[2:3], tmp_path / "feats", lambda b: "re-tiled")
    with pytest.raises(ConfigError, match=r"1 of 8 slides changed since \(bag002\)"):
        train(_cfg(tmp_path, epochs=3, resume=True), entries, progress=False)


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    """config.yaml must not claim fewer epochs than metrics.csv and the checkpoints hold."""
    _, entries = _setup(tmp_path, n_bags=8)
    run = train(_cfg(tmp_path, epochs=3, early_stop="none"), entries, progress=False)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"already trained 3 epochs, more than --epochs 2.*--epochs 3 or more"
    ):
        train(_cfg(tmp_path, epochs=2, resume=True, early_stop="none"), entries, progress=False)
    assert (run / "config.yaml").read_text() == saved
    assert yaml.safe_load(saved)["epochs"] == 3
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    train(_cfg(tmp_path, epochs=3, resume=True, early_stop="none"), entries, progress=False)


def test_resume_compares_paths_as_folders_and_leaves_features_to_the_digests(tmp_path, monkeypatch):
    """Paths are compared as the folders they name (older runs recorded them relative); the
    feature folder may move (a project copied elsewhere): the checkpoint's digests of the
    stores decide whether the features changed."""
    import dataclasses

    from wsi_mil.config import save_resolved
    from wsi_mil.train.cached import check_resume_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    cfg = TrainConfig(
        run=run, resume=True, features=tmp_path / "w" / "t", weights=tmp_path / "e.pt"
    )
    save_resolved(dataclasses.replace(cfg, features="w/t", weights="e.pt"), run / "config.yaml")
    check_resume_options(cfg, cfg)  # same files, other spelling: resumes
    moved = dataclasses.replace(cfg, features=tmp_path / "elsewhere" / "t")
    check_resume_options(moved, moved)
    other = dataclasses.replace(cfg, weights=tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="weights"):
        check_resume_options(other, other)


def test_overwrite_removes_only_a_runs_outputs(tmp_path):
    """--overwrite deletes the previous model's outputs, never files of a folder that is not
    a run, nor other files in attention/ and heatmaps/."""
    from wsi_mil.train.cached import prepare_run_dir

    folder = tmp_path / "figures"  # not a run: no config.yaml, no checkpoints/
    (folder / "heatmaps").mkdir(parents=True)
    for f in ("predictions.csv", "encoder.pt", "heatmaps/figure1.png"):
        (folder / f).write_text("mine")
    prepare_run_dir(TrainConfig(run=folder, overwrite=True))
    assert all(
        (folder / f).exists() for f in ("predictions.csv", "encoder.pt", "heatmaps/figure1.png")
    )
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "attention").mkdir()
    (run / "heatmaps").mkdir()
    for f in (
        "checkpoints/last.pt",
        "predictions.csv",
        "encoder.pt",
        "attention/a.h5",
        "heatmaps/a.png",
        "heatmaps/notes.txt",
    ):
        (run / f).write_text("x")
    prepare_run_dir(TrainConfig(run=run, overwrite=True))  # cached mode: encoder.pt is not its
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == ["encoder.pt", "heatmaps/notes.txt"]
    assert not (run / "attention").exists()
